/*
 * test_drop_summary.c: Criterion tests of the drop summaries
 * (WP_EV_DROPPED) fed by wp_pool_count_drop_tenant: one event per reason
 * and tenant, the plain drops apart, the table's bound ("other") and
 * pool stats that agree with the summaries.  Events are copied by a
 * process-wide handler; stopping the pool writes the last summary.
 */
#include <criterion/criterion.h>

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <uv.h>

#include "wpool.h"

#define MAX_SEEN 512

typedef struct seen_ev {
  char reason[32];
  char tenant[128];
  int has_tenant;
  int64_t n;
} seen_ev;

static uv_mutex_t seen_mu;
static seen_ev seen[MAX_SEEN];
static int nseen;
static char seen_pool[64];

static void on_event(const wp_event *ev) {
  if (ev->type != WP_EV_DROPPED || strcmp(ev->pool, seen_pool) != 0) return;
  uv_mutex_lock(&seen_mu);
  if (nseen < MAX_SEEN) {
    seen_ev *s = &seen[nseen++];
    snprintf(s->reason, sizeof s->reason, "%s", ev->reason);
    s->has_tenant = ev->tenant != NULL;
    snprintf(s->tenant, sizeof s->tenant, "%s", ev->tenant ? ev->tenant : "");
    s->n = ev->n;
  }
  uv_mutex_unlock(&seen_mu);
}

/* A pool named name whose summaries only come when it stops. */
static wp_pool *new_pool(const char *name) {
  wp_options o;
  wp_pool *p = NULL;
  char err[256];
  cr_assert_eq(uv_mutex_init(&seen_mu), 0);
  snprintf(seen_pool, sizeof seen_pool, "%s", name);
  nseen = 0;
  wp_set_event_handler(on_event);
  wp_options_init(&o);
  o.name = name;
  o.drop_log_interval = 3600;
  cr_assert_eq(wp_pool_new(&o, &p, err, sizeof err), 0, "%s", err);
  return p;
}

/* The events of reason and tenant (NULL: none): how many, and their sum. */
static int64_t summed(const char *reason, const char *tenant, int *lines) {
  int64_t sum = 0;
  int i;
  *lines = 0;
  for (i = 0; i < nseen; i++)
    if (strcmp(seen[i].reason, reason) == 0 &&
        seen[i].has_tenant == (tenant != NULL) &&
        (tenant == NULL || strcmp(seen[i].tenant, tenant) == 0)) {
      sum += seen[i].n;
      ++*lines;
    }
  return sum;
}

static void expect(const char *reason, const char *tenant, int64_t n) {
  int lines;
  int64_t got = summed(reason, tenant, &lines);
  cr_assert_eq(got, n, "%s/%s: %lld, want %lld", reason, tenant ? tenant : "-",
               (long long)got, (long long)n);
  cr_assert_eq(lines, n ? 1 : 0, "%s/%s: %d lines", reason,
               tenant ? tenant : "-", lines);
}

Test(drop_summary, per_reason_and_tenant) {
  wp_pool *p = new_pool("ds-reasons");
  wp_pool_stats s;
  int i;
  for (i = 0; i < 3; i++)
    wp_pool_count_drop_tenant(p, WP_DROP_RATE_LIMITED, "a");
  for (i = 0; i < 2; i++)
    wp_pool_count_drop_tenant(p, WP_DROP_CONCURRENCY, "b");
  wp_pool_count_drop_tenant(p, WP_DROP_RATE_LIMITED, "b");
  wp_pool_count_drop_tenant(p, WP_DROP_BREAKER_OPEN, NULL);
  wp_pool_count_drop_tenant(p, WP_DROP_POLICY, NULL);
  wp_pool_count_drop(p, WP_DROP_POLICY);
  wp_pool_count_drop(p, WP_DROP_RATE_LIMITED); /* no class: "policy" */
  wp_pool_count_drop_tenant(p, WP_DROP_POLICY, "a");
  wp_pool_count_drop_tenant(p, WP_DROP_FULL, NULL);
  wp_pool_count_drop_tenant(p, WP_DROP_FULL, "a");
  wp_pool_get_stats(p, &s);
  cr_assert_eq(s.dropped_policy, 11);
  cr_assert_eq(s.dropped_full, 2);
  cr_assert_eq(wp_pool_stop(p), 0);
  wp_pool_release(p);
  expect("rate_limited", "a", 3);
  expect("rate_limited", "b", 1);
  expect("concurrency", "b", 2);
  expect("breaker_open", NULL, 1);
  expect("policy", NULL, 3);
  expect("policy", "a", 1);
  expect("full", NULL, 1);
  expect("full", "a", 1);
  cr_assert_eq(nseen, 8, "%d events", nseen);
}

Test(drop_summary, table_bound_other_and_truncation) {
  wp_pool *p = new_pool("ds-bound");
  char t[16], longname[200];
  int64_t named = 0, total = 0;
  int i, lines;
  for (i = 0; i < 200; i++) {
    snprintf(t, sizeof t, "t%d", i);
    wp_pool_count_drop_tenant(p, WP_DROP_RATE_LIMITED, t);
  }
  wp_pool_count_drop_tenant(p, WP_DROP_CONCURRENCY, NULL);
  wp_pool_count_drop_tenant(p, WP_DROP_CONCURRENCY, "other");
  cr_assert_eq(wp_pool_stop(p), 0);
  wp_pool_release(p);
  for (i = 0; i < nseen; i++) {
    total += seen[i].n;
    if (strcmp(seen[i].reason, "rate_limited") == 0 &&
        strcmp(seen[i].tenant, "other") != 0)
      named++;
  }
  cr_assert_eq(total, 202);
  cr_assert_eq(named, WP_DROP_TENANT_ROWS - 10, "%lld named", (long long)named);
  cr_assert_eq(summed("rate_limited", "other", &lines),
               200 - (WP_DROP_TENANT_ROWS - 10));
  expect("concurrency", NULL, 1);
  expect("concurrency", "other", 1);

  p = new_pool("ds-long");
  memset(longname, 'x', sizeof longname - 1);
  longname[sizeof longname - 1] = '\0';
  wp_pool_count_drop_tenant(p, WP_DROP_BREAKER_OPEN, longname);
  wp_pool_count_drop_tenant(p, WP_DROP_BREAKER_OPEN, longname);
  cr_assert_eq(wp_pool_stop(p), 0);
  wp_pool_release(p);
  cr_assert_eq(nseen, 1);
  cr_assert_eq(strlen(seen[0].tenant), 63);
  cr_assert_eq(seen[0].n, 2);
}

Test(drop_summary, periodic_lines_add_up) {
  wp_options o;
  wp_pool *p = NULL;
  char err[256];
  int i, lines, plain_lines;
  cr_assert_eq(uv_mutex_init(&seen_mu), 0);
  snprintf(seen_pool, sizeof seen_pool, "ds-periodic");
  wp_set_event_handler(on_event);
  wp_options_init(&o);
  o.name = "ds-periodic";
  o.drop_log_interval = 0.002;
  cr_assert_eq(wp_pool_new(&o, &p, err, sizeof err), 0, "%s", err);
  for (i = 0; i < 100; i++) {
    wp_pool_count_drop_tenant(p, WP_DROP_RATE_LIMITED, i % 2 ? "a" : "b");
    wp_pool_count_drop(p, WP_DROP_POLICY);
    if (i % 10 == 0) uv_sleep(5);
  }
  cr_assert_eq(wp_pool_stop(p), 0);
  wp_pool_release(p);
  cr_assert_eq(summed("rate_limited", "a", &lines), 50);
  cr_assert_eq(summed("rate_limited", "b", &lines), 50);
  cr_assert_eq(summed("policy", NULL, &plain_lines), 100);
  cr_assert(plain_lines > 1, "%d lines: periodic summaries", plain_lines);
}
