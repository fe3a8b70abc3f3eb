/*
 * test_options.c: Criterion tests of the table of pool options
 * (core/options.c): it gives wp_options_init its defaults and wp_pool_new
 * its checks, and the option tables of docs/api.md and docs/guards.md say
 * exactly what it says (one row per option, the same type and default),
 * so the docs cannot drift from the code.
 */
#include <criterion/criterion.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "options.h"
#include "wpool.h"

/* ---- the core side -------------------------------------------------- */

Test(options, defaults_come_from_the_table) {
  wp_options o;
  const wp__option *d;
  int n = 0;
  memset(&o, 0x5a, sizeof o);
  wp_options_init(&o);
  cr_assert_eq(o.max_workers, 1);
  cr_assert_eq(o.idle_timeout, 2.0);
  cr_assert_eq(o.submit_timeout, -1.0);
  cr_assert_eq(o.stuck_grace, 5.0);
  cr_assert_eq(o.drop_log_interval, 60.0);
  cr_assert_eq(o.queue_cap, 0);
  cr_assert_eq(o.block_when_full, 0);
  cr_assert_null(o.name);
  cr_assert_null(o.init);
  cr_assert_eq(wp__options_check(&o, NULL, 0), 0);
  for (d = wp__options; d->name; d++) {
    n++;
    cr_assert(d->must && strncmp(d->must, "must ", 5) == 0, "%s", d->name);
    cr_assert_not_null(d->doc_default, "%s", d->name);
  }
  cr_assert_lt(n, WP__OPT_MAX);
  cr_assert_eq(wp__option_find("queue_cap")->max, 0x1p40);
  cr_assert_null(wp__option_find("nope"));
}

/* The binding's caps hold for C hosts too, with the binding's words. */
Test(options, wp_pool_new_checks_every_row) {
  static const struct {
    const char *field;
    double v;
    const char *err;
  } bad[] = {
      {"max_workers", 10001, "max_workers must be a positive integer"},
      {"max_workers", 0, "max_workers must be a positive integer"},
      {"queue_cap", 0x1p40 + 1, "queue_cap must be a positive integer"},
      {"memory_limit", 0x1p48 + 1,
       "memory_limit must be a positive integer (bytes)"},
      {"max_tasks_per_worker", -1,
       "max_tasks_per_worker must be a positive integer"},
      {"task_timeout", -1, "task_timeout must be a positive number of seconds"},
      {"task_timeout", INFINITY,
       "task_timeout must be a positive number of seconds"},
      {"stuck_grace", NAN,
       "stuck_grace must be a non-negative number of seconds"},
      {"submit_timeout", -2,
       "submit_timeout must be a non-negative number of seconds"},
      {"idle_timeout", NAN,
       "idle_timeout must be a number of seconds (negative disables "
       "reaping)"},
      {"on_full", 2, "on_full must be \"reject\" or \"block\""},
  };
  size_t i;
  for (i = 0; i < sizeof bad / sizeof *bad; i++) {
    const wp__option *d = wp__option_find(bad[i].field);
    wp_options o;
    wp_pool *p = NULL;
    char err[256];
    char *at;
    wp_options_init(&o);
    o.max_workers = 2;
    at = (char *)&o + d->offset;
    if (d->type == WP__OPT_SIZE)
      *(size_t *)at = (size_t)bad[i].v;
    else if (d->type == WP__OPT_SECONDS)
      *(double *)at = bad[i].v;
    else
      *(int *)at = (int)bad[i].v;
    cr_assert_eq(wp_pool_new(&o, &p, err, sizeof err), WP_EINVAL, "%s",
                 bad[i].field);
    cr_assert_null(p);
    cr_assert_str_eq(err, bad[i].err);
  }
}

Test(options, cross_checks) {
  wp_options o;
  wp_pool *p = NULL;
  char err[256];
  wp_options_init(&o);
  o.block_when_full = 1;
  cr_assert_eq(wp_pool_new(&o, &p, err, sizeof err), WP_EINVAL);
  cr_assert_str_eq(err, "on_full needs a queue_cap");
  wp_options_init(&o);
  o.max_workers = 2;
  o.min_workers = 3;
  cr_assert_eq(wp_pool_new(&o, &p, err, sizeof err), WP_EINVAL);
  cr_assert_str_eq(err, "min_workers must be an integer from 0 to max_workers");
  /* The defaults themselves pass, "off" values included. */
  wp_options_init(&o);
  o.max_workers = 10000;
  cr_assert_eq(wp_pool_new(&o, &p, err, sizeof err), 0, "%s", err);
  wp_pool_release(p);
}

/* ---- the docs side -------------------------------------------------- */

typedef struct row {
  char name[64], type[256], def[128];
  int seen;
} row;

static row rows[64];
static int nrows;

static char *read_doc(const char *name) {
  char path[1024];
  const char *slash = strrchr(__FILE__, '/');
  FILE *f;
  char *buf;
  long n;
  /* __FILE__ is tests/core/test_options.c under the source tree. */
  snprintf(path, sizeof path, "%.*s/../../docs/%s",
           (int)(slash ? slash - __FILE__ : 1), slash ? __FILE__ : ".", name);
  f = fopen(path, "rb");
  cr_assert_not_null(f, "cannot open %s", path);
  fseek(f, 0, SEEK_END);
  n = ftell(f);
  fseek(f, 0, SEEK_SET);
  buf = malloc((size_t)n + 1);
  cr_assert_not_null(buf);
  cr_assert_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
  buf[n] = '\0';
  fclose(f);
  return buf;
}

/* Copies cell `col` (0-based) of the table line into out, trimmed. */
static void cell(const char *line, int col, char *out, size_t cap) {
  const char *p = line, *end;
  size_t len;
  int c;
  for (c = 0; c <= col; c++) {
    p = strchr(p, '|');
    cr_assert_not_null(p, "%s", line);
    p++;
  }
  end = strchr(p, '|');
  cr_assert_not_null(end, "%s", line);
  while (*p == ' ')
    p++;
  while (end > p && end[-1] == ' ')
    end--;
  len = (size_t)(end - p);
  cr_assert_lt(len, cap, "%s", line);
  memcpy(out, p, len);
  out[len] = '\0';
}

/* Adds the rows of the option table of doc, the table whose head starts
 * with "| Option | Type | Default |" (in any case). */
static void collect(const char *doc) {
  char *text = read_doc(doc), *line, *save = NULL;
  int in = 0;
  for (line = strtok_r(text, "\n", &save); line;
       line = strtok_r(NULL, "\n", &save)) {
    if (strncasecmp(line, "| option | type | default |", 27) == 0) {
      in = 1;
      continue;
    }
    if (in && strncmp(line, "|---", 4) == 0) continue;
    if (in && line[0] != '|') in = 0;
    if (!in) continue;
    row *r = &rows[nrows++];
    char name[80];
    cr_assert_lt(nrows, 64);
    cell(line, 0, name, sizeof name);
    cr_assert(name[0] == '`' && name[strlen(name) - 1] == '`', "%s", line);
    snprintf(r->name, sizeof r->name, "%.*s", (int)strlen(name) - 2, name + 1);
    cell(line, 1, r->type, sizeof r->type);
    cell(line, 2, r->def, sizeof r->def);
  }
  free(text);
}

/* A bound as the docs write it: 2^40, 2^31 − 1, or digits. */
static void bound(double v, char *out, size_t cap) {
  int k;
  for (k = 16; k < 63; k++) {
    if (v == ldexp(1, k)) {
      snprintf(out, cap, "2^%d", k);
      return;
    }
    if (v == ldexp(1, k) - 1) {
      snprintf(out, cap, "2^%d \u2212 1", k);
      return;
    }
  }
  snprintf(out, cap, "%.0f", v);
}

/* The type column the row of d must have; NULL: not checked (strings,
 * whose column says what they hold). */
static const char *type_text(const wp__option *d, char *out, size_t cap) {
  char lo[32], hi[32];
  int i;
  switch (d->type) {
  case WP__OPT_INT:
  case WP__OPT_SIZE:
    /* min_workers's bound is another option (wp__options_check). */
    if (strcmp(d->name, "min_workers") == 0)
      return "integer, 0 to `max_workers`";
    bound(d->min, lo, sizeof lo);
    bound(d->max, hi, sizeof hi);
    snprintf(out, cap, "integer, %s to %s", lo, hi);
    return out;
  case WP__OPT_SECONDS:
    if (isinf(d->min)) return "number, seconds";
    cr_assert_eq(d->min, 0, "%s", d->name);
    return d->flags & WP__OPT_OPEN_MIN ? "number > 0" : "number \u2265 0";
  case WP__OPT_CHOICE:
    out[0] = '\0';
    for (i = 0; d->choices[i]; i++)
      snprintf(out + strlen(out), cap - strlen(out), "%s`\"%s\"`",
               i == 0              ? ""
               : d->choices[i + 1] ? ", "
                                   : " or ",
               d->choices[i]);
    return out;
  default:
    return NULL;
  }
}

Test(options, docs_tables_say_what_the_table_says) {
  const wp__option *d;
  int i;
  nrows = 0;
  collect("api.md");
  collect("guards.md");
  cr_assert_gt(nrows, 10);
  for (d = wp__options; d->name; d++) {
    char buf[256];
    const char *want = type_text(d, buf, sizeof buf);
    row *r = NULL;
    for (i = 0; i < nrows; i++)
      if (strcmp(rows[i].name, d->name) == 0) r = &rows[i];
    cr_assert_not_null(r, "no docs row for option %s", d->name);
    r->seen++;
    cr_assert_str_eq(r->def, d->doc_default, "default of %s", d->name);
    if (want) cr_assert_str_eq(r->type, want, "type of %s", d->name);
  }
  for (i = 0; i < nrows; i++)
    cr_assert_eq(rows[i].seen, 1, "docs row %s: not an option, or twice",
                 rows[i].name);
}
