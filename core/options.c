/*
 * options.c: the table of pool options (see options.h) and what follows
 * from it in the core: the defaults of wp_options_init and the checks of
 * wp_pool_new.  A new guard option is one row here, a field of
 * wp_options, and a row of the docs' table that test_options.c checks.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "options.h"

#define FIELD(f) offsetof(wp_options, f)
#define FOREVER DBL_MAX /* the largest finite number of seconds */

static const char *const on_full_words[] = {"reject", "block", NULL};

/* clang-format off */
const wp__option wp__options[] = {
  /* name, type, offset, min, max, default, flags, must, choices, docs */
  {"max_workers", WP__OPT_INT, FIELD(max_workers), 1, 10000, 1,
   WP__OPT_REQUIRED, "must be a positive integer", NULL, "required"},
  {"min_workers", WP__OPT_INT, FIELD(min_workers), 0, INT32_MAX, 0, 0,
   "must be an integer from 0 to max_workers", NULL, "0"},
  {"idle_timeout", WP__OPT_SECONDS, FIELD(idle_timeout), -HUGE_VAL, HUGE_VAL,
   2, 0, "must be a number of seconds (negative disables reaping)", NULL,
   "2"},
  {"queue_cap", WP__OPT_SIZE, FIELD(queue_cap), 1, 0x1p40, 0, 0,
   "must be a positive integer", NULL, "unbounded"},
  {"on_full", WP__OPT_CHOICE, FIELD(block_when_full), 0, 1, 0, 0,
   "must be \"reject\" or \"block\"", on_full_words, "`\"reject\"`"},
  {"submit_timeout", WP__OPT_SECONDS, FIELD(submit_timeout), 0, FOREVER, -1,
   0, "must be a non-negative number of seconds", NULL, "no limit"},
  {"task_timeout", WP__OPT_SECONDS, FIELD(task_timeout), 0, FOREVER, 0,
   WP__OPT_OPEN_MIN, "must be a positive number of seconds", NULL, "none"},
  {"stuck_grace", WP__OPT_SECONDS, FIELD(stuck_grace), 0, FOREVER, 5, 0,
   "must be a non-negative number of seconds", NULL, "5"},
  {"slow_task", WP__OPT_SECONDS, FIELD(slow_task), 0, FOREVER, 0,
   WP__OPT_OPEN_MIN, "must be a positive number of seconds", NULL, "off"},
  {"drop_log_interval", WP__OPT_SECONDS, FIELD(drop_log_interval), 0,
   FOREVER, 60, WP__OPT_OPEN_MIN, "must be a positive number of seconds",
   NULL, "60"},
  {"memory_limit", WP__OPT_SIZE, FIELD(memory_limit), 1, 0x1p48, 0, 0,
   "must be a positive integer (bytes)", NULL, "none"},
  {"max_tasks_per_worker", WP__OPT_INT, FIELD(max_tasks_per_worker), 1,
   INT32_MAX, 0, 0, "must be a positive integer", NULL, "none"},
  {"tenant_label_limit", WP__OPT_INT, WP__OPT_NOFIELD, 0, INT32_MAX, 100, 0,
   "must be a non-negative integer", NULL, "100"},
  {"name", WP__OPT_STRING, FIELD(name), 0, 0, 0, 0, "must be a string", NULL,
   "`\"pool-N\"`"},
  {"init", WP__OPT_STRING, FIELD(init), 0, 0, 0, 0, "must be a string", NULL,
   "none"},
  {"init_file", WP__OPT_STRING, WP__OPT_NOFIELD, 0, 0, 0, 0,
   "must be a string", NULL, "none"},
  {NULL, WP__OPT_INT, 0, 0, 0, 0, 0, NULL, NULL, NULL}};
/* clang-format on */

const wp__option *wp__option_find(const char *name) {
  const wp__option *d;
  for (d = wp__options; d->name; d++)
    if (strcmp(d->name, name) == 0) return d;
  return NULL;
}

int wp__option_in_range(const wp__option *d, double v) {
  if (d->flags & WP__OPT_OPEN_MIN) return v > d->min && v <= d->max;
  return v >= d->min && v <= d->max;
}

/* The value of numeric option d in opts, as a double. */
static double value_of(const wp_options *opts, const wp__option *d) {
  const char *at = (const char *)opts + d->offset;
  switch (d->type) {
  case WP__OPT_SIZE:
    return (double)*(const size_t *)at;
  case WP__OPT_SECONDS:
    return *(const double *)at;
  default: /* WP__OPT_INT, WP__OPT_CHOICE */
    return *(const int *)at;
  }
}

void wp_options_init(wp_options *opts) {
  const wp__option *d;
  memset(opts, 0, sizeof *opts);
  for (d = wp__options; d->name; d++) {
    char *at;
    if (d->offset == WP__OPT_NOFIELD) continue;
    at = (char *)opts + d->offset;
    switch (d->type) {
    case WP__OPT_SIZE:
      *(size_t *)at = (size_t)d->def;
      break;
    case WP__OPT_SECONDS:
      *(double *)at = d->def;
      break;
    case WP__OPT_STRING:
      break; /* NULL */
    default:
      *(int *)at = (int)d->def;
    }
  }
}

static int bad(char *errbuf, size_t errlen, const char *name,
               const char *must) {
  if (errlen) snprintf(errbuf, errlen, "%s %s", name, must);
  return WP_EINVAL;
}

int wp__options_check(const wp_options *o, char *errbuf, size_t errlen) {
  const wp__option *d;
  for (d = wp__options; d->name; d++) {
    double v;
    if (d->offset == WP__OPT_NOFIELD || d->type == WP__OPT_STRING) continue;
    v = value_of(o, d);
    if (v != d->def && !wp__option_in_range(d, v))
      return bad(errbuf, errlen, d->name, d->must);
  }
  if (o->min_workers > o->max_workers)
    return bad(errbuf, errlen, "min_workers",
               wp__option_find("min_workers")->must);
  if (o->name && o->name[0] == '\0')
    return bad(errbuf, errlen, "name", "must not be empty");
  if (o->name && strlen(o->name) > 255)
    return bad(errbuf, errlen, "name", "must be at most 255 bytes");
  if (o->block_when_full && o->queue_cap == 0)
    return bad(errbuf, errlen, "on_full", "needs a queue_cap");
  return 0;
}
