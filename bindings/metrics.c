/*
 * metrics.c: a pool's metrics as a Lua table (pool:stats()) and every live
 * pool's metrics in the Prometheus text exposition format
 * (workerpool.metrics(), the host's GET /metrics).
 *
 * Snapshots are copied into memory the Lua GC owns before any Lua call
 * that could raise, so no pool reference is held across one.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lbind.h"

#define NAME_MAX_BYTES 256 /* pool names are at most 255 bytes */

typedef struct snap {
  char name[NAME_MAX_BYTES];
  wp_pool_stats s;
} snap;

/* [-0, +1, m] Pushes {count=, sum=, buckets={[le]=n...}} of a histogram,
 * with cumulative bucket counts keyed by upper bound in seconds. */
static void push_hist(lua_State *L, const wp_hist *h) {
  uint64_t cum = 0;
  int k;
  lua_createtable(L, 0, 3);
  lua_createtable(L, WP_HIST_BUCKETS, 0);
  for (k = 0; k < WP_HIST_BUCKETS; k++) {
    cum += h->buckets[k];
    lua_pushinteger(L, (lua_Integer)cum);
    lua_rawseti(L, -2, k + 1);
  }
  lua_setfield(L, -2, "buckets");
  lua_pushinteger(L, (lua_Integer)cum);
  lua_setfield(L, -2, "count");
  lua_pushnumber(L, h->sum);
  lua_setfield(L, -2, "sum");
}

static void set_int(lua_State *L, const char *k, uint64_t v) {
  lua_pushinteger(L, (lua_Integer)v);
  lua_setfield(L, -2, k);
}

int wpl_push_stats(lua_State *L, wp_pool *p) {
  wp_pool_stats *s = lua_newuserdatauv(L, sizeof *s, 0); /* GC-owned */
  wp_pool_get_stats(p, s);
  lua_createtable(L, 0, 20);
  set_int(L, "submitted", s->submitted);
  lua_createtable(L, 0, 4);
  set_int(L, "ok", s->ok);
  set_int(L, "error", s->error);
  set_int(L, "timeout", s->timeout);
  set_int(L, "cancelled", s->cancelled);
  lua_setfield(L, -2, "completed");
  lua_createtable(L, 0, 4);
  set_int(L, "full", s->dropped_full);
  set_int(L, "stopped", s->dropped_stopped);
  set_int(L, "discarded", s->dropped_discarded);
  set_int(L, "policy", s->dropped_policy);
  lua_setfield(L, -2, "dropped");
  set_int(L, "queued", s->queued);
  set_int(L, "queued_bytes", s->queued_bytes);
  set_int(L, "running", (uint64_t)s->running);
  set_int(L, "workers", (uint64_t)s->workers);
  set_int(L, "stuck", (uint64_t)s->stuck);
  set_int(L, "stuck_total", s->stuck_total);
  set_int(L, "max_workers", (uint64_t)s->max_workers);
  set_int(L, "memory", s->memory);
  set_int(L, "memory_max", s->memory_max);
  set_int(L, "memory_limit_hits", s->memory_limit_hits);
  push_hist(L, &s->duration);
  lua_setfield(L, -2, "duration");
  push_hist(L, &s->dwell);
  lua_setfield(L, -2, "dwell");
  lua_remove(L, -2);
  return 1;
}

/* ---- Prometheus text ------------------------------------------------- */

typedef struct sbuf {
  char *p;
  size_t len, cap;
  int failed; /* out of memory: the text is incomplete */
} sbuf;

static void add(sbuf *b, const char *s, size_t n) {
  if (b->failed) return;
  if (b->cap - b->len < n + 1) {
    size_t cap = b->cap ? b->cap : 4096;
    char *np;
    while (cap - b->len < n + 1)
      cap *= 2;
    if ((np = realloc(b->p, cap)) == NULL) {
      b->failed = 1;
      return;
    }
    b->p = np;
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
}

static void adds(sbuf *b, const char *s) {
  add(b, s, strlen(s));
}

/* Appends v as a label value: backslash, quote and newline escaped, and
 * each byte that is not part of a valid UTF-8 sequence as '?' (the format
 * holds only UTF-8; workerpool.new refuses such names, C hosts may not). */
static void add_label(sbuf *b, const char *v) {
  size_t n = strlen(v), k;
  for (; n > 0; v += k, n -= k) {
    k = wpl_utf8_len(v, n);
    if (k == 0) {
      adds(b, "?");
      k = 1;
    } else if (*v == '\\') {
      adds(b, "\\\\");
    } else if (*v == '"') {
      adds(b, "\\\"");
    } else if (*v == '\n') {
      adds(b, "\\n");
    } else {
      add(b, v, k);
    }
  }
}

static void family(sbuf *b, const char *name, const char *type,
                   const char *help) {
  char line[256];
  snprintf(line, sizeof line, "# HELP %s %s\n# TYPE %s %s\n", name, help, name,
           type);
  adds(b, line);
}

/* name{pool="..."[,extra]} value */
static void sample(sbuf *b, const char *name, const char *pool,
                   const char *extra, double value) {
  char num[64];
  adds(b, name);
  adds(b, "{pool=\"");
  add_label(b, pool);
  adds(b, "\"");
  if (extra) {
    adds(b, ",");
    adds(b, extra);
  }
  snprintf(num, sizeof num, "} %.17g\n", value);
  adds(b, num);
}

static void hist(sbuf *b, const char *name, const char *pool,
                 const wp_hist *h) {
  char metric[128], le[64];
  uint64_t cum = 0;
  int k;
  snprintf(metric, sizeof metric, "%s_bucket", name);
  for (k = 0; k < WP_HIST_BUCKETS; k++) {
    cum += h->buckets[k];
    if (k < WP_HIST_BUCKETS - 1)
      snprintf(le, sizeof le, "le=\"%g\"", (double)(1u << k) / 1000.0);
    else
      snprintf(le, sizeof le, "le=\"+Inf\"");
    sample(b, metric, pool, le, (double)cum);
  }
  snprintf(metric, sizeof metric, "%s_sum", name);
  sample(b, metric, pool, NULL, h->sum);
  snprintf(metric, sizeof metric, "%s_count", name);
  sample(b, metric, pool, NULL, (double)cum);
}

char *wpl_metrics_text(size_t *len) {
  static const char *const results[] = {"ok", "error", "timeout", "cancelled"};
  static const char *const reasons[] = {"full", "stopped", "discarded",
                                        "policy"};
  wp_pool **pools;
  snap *v;
  sbuf b = {0};
  char extra[64];
  int n, m, i, j;
  n = wp_pool_list(NULL, 0);
  pools = malloc((size_t)(n + 1) * sizeof *pools);
  v = malloc((size_t)(n + 1) * sizeof *v);
  if (pools == NULL || v == NULL) {
    free(pools);
    free(v);
    return NULL;
  }
  m = wp_pool_list(pools, n);
  if (m > n) m = n;
  for (i = 0; i < m; i++) {
    snprintf(v[i].name, sizeof v[i].name, "%s", wp_pool_name(pools[i]));
    wp_pool_get_stats(pools[i], &v[i].s);
    wp_pool_release(pools[i]);
  }
  free(pools);
  adds(&b, ""); /* an empty text is still a text */
  family(&b, "workerpool_submitted_total", "counter",
         "Tasks accepted into the queue.");
  for (i = 0; i < m; i++)
    sample(&b, "workerpool_submitted_total", v[i].name, NULL,
           (double)v[i].s.submitted);
  family(&b, "workerpool_completed_total", "counter",
         "Tasks that ended, by result.");
  for (i = 0; i < m; i++) {
    const uint64_t c[] = {v[i].s.ok, v[i].s.error, v[i].s.timeout,
                          v[i].s.cancelled};
    for (j = 0; j < 4; j++) {
      snprintf(extra, sizeof extra, "result=\"%s\"", results[j]);
      sample(&b, "workerpool_completed_total", v[i].name, extra, (double)c[j]);
    }
  }
  family(&b, "workerpool_dropped_total", "counter",
         "Tasks refused or dropped before running, by reason.");
  for (i = 0; i < m; i++) {
    const uint64_t d[] = {v[i].s.dropped_full, v[i].s.dropped_stopped,
                          v[i].s.dropped_discarded, v[i].s.dropped_policy};
    for (j = 0; j < 4; j++) {
      snprintf(extra, sizeof extra, "reason=\"%s\"", reasons[j]);
      sample(&b, "workerpool_dropped_total", v[i].name, extra, (double)d[j]);
    }
  }
#define SERIES(metric, kind, help, field)                                      \
  family(&b, metric, kind, help);                                              \
  for (i = 0; i < m; i++)                                                      \
    sample(&b, metric, v[i].name, NULL, (double)v[i].s.field);
  SERIES("workerpool_memory_limit_hits_total", "counter",
         "Worker states replaced after reaching memory_limit.",
         memory_limit_hits)
  SERIES("workerpool_stuck_workers_total", "counter",
         "Workers declared stuck past a deadline.", stuck_total)
  SERIES("workerpool_queue_depth", "gauge", "Tasks queued, not started.",
         queued)
  SERIES("workerpool_queued_bytes", "gauge",
         "Bytes of the arguments of queued tasks.", queued_bytes)
  SERIES("workerpool_running_tasks", "gauge", "Tasks running now.", running)
  SERIES("workerpool_workers", "gauge", "Live worker states.", workers)
  SERIES("workerpool_stuck_workers", "gauge",
         "Workers stuck in a task that cannot be interrupted.", stuck)
  SERIES("workerpool_max_workers", "gauge", "The pool's max_workers.",
         max_workers)
  SERIES("workerpool_worker_memory_bytes", "gauge",
         "Bytes allocated by all worker states of the pool.", memory)
  SERIES("workerpool_worker_memory_max_bytes", "gauge",
         "Bytes allocated by the pool's largest worker state.", memory_max)
#undef SERIES
  family(&b, "workerpool_task_duration_seconds", "histogram",
         "Time from a task's start to its end.");
  for (i = 0; i < m; i++)
    hist(&b, "workerpool_task_duration_seconds", v[i].name, &v[i].s.duration);
  family(&b, "workerpool_queue_dwell_seconds", "histogram",
         "Time a task waited in the queue before it started.");
  for (i = 0; i < m; i++)
    hist(&b, "workerpool_queue_dwell_seconds", v[i].name, &v[i].s.dwell);
  free(v);
  if (b.failed) {
    free(b.p);
    return NULL;
  }
  *len = b.len;
  return b.p;
}

#define WPL_CBUF_MT "workerpool.cbuf"

/* __gc of a box holding a malloc'd block.   [-0, +0, -] */
static int cbuf_gc(lua_State *L) {
  char **box = luaL_checkudata(L, 1, WPL_CBUF_MT);
  free(*box);
  *box = NULL;
  return 0;
}

void wpl_metrics_init(lua_State *L) {
  luaL_newmetatable(L, WPL_CBUF_MT);
  lua_pushcfunction(L, cbuf_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
}

/* [-0, +1, m] Pushes the exposition text for every live pool.  The text is
 * boxed in a collectable userdata first, so a memory error while pushing
 * it cannot leak it. */
int wpl_push_metrics(lua_State *L) {
  size_t len;
  char **box = lua_newuserdatauv(L, sizeof *box, 0);
  *box = NULL;
  luaL_setmetatable(L, WPL_CBUF_MT);
  if ((*box = wpl_metrics_text(&len)) == NULL)
    return luaL_error(L, "not enough memory");
  lua_pushlstring(L, *box, len);
  free(*box);
  *box = NULL;
  lua_remove(L, -2);
  return 1;
}
