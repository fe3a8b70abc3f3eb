/*
 * metrics.c: a pool's metrics as a Lua table (pool:stats()) and every live
 * pool's metrics in the Prometheus text exposition format
 * (workerpool.metrics(), the host's GET /metrics), with the series of the
 * policies: refusals by reason, admissions and refusals per tenant, every
 * circuit breaker, and whether each pool made here has stopped.
 *
 * Policy counts live in the shared dictionary "workerpool.metrics", keyed
 * by a kind letter and fields separated by SEP:
 *   d SEP pool SEP class            policy refusals by class
 *   a SEP pool SEP tenant           tenant admissions
 *   r SEP pool SEP tenant SEP class tenant refusals
 *   s SEP pool SEP tenant           a tenant that has its own label
 *   n SEP pool / L SEP pool         tenants labelled / tenant_label_limit
 *   B SEP dict                      a dictionary holding breakers
 *
 * Snapshots are copied into memory the Lua GC owns before any Lua call
 * that could raise, so no pool reference is held across one.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lbind.h"
#include "wp_internal.h" /* WP__FORK_* */

#define NAME_MAX_BYTES 256 /* pool names are at most 255 bytes */
#define SEP "\x1f"
#define METRICS_DICT "workerpool.metrics"
#define DEFAULT_TENANT_LABELS 100

/* The refusal classes of workerpool_dropped_total next to the core's
 * reasons; WP_DROP_POLICY is every other refusal. */
static const wp_drop_reason classes[] = {
    WP_DROP_RATE_LIMITED, WP_DROP_CONCURRENCY, WP_DROP_BREAKER_OPEN};
#define NCLASSES 3
#define CLASS(j) wp_drop_reason_name(classes[j])

static wp_shdict *metrics_dict(void) {
  wp_shdict *d = NULL;
  return wp_shdict_open(METRICS_DICT, 4u << 20, &d) == 0 ? d : NULL;
}

/* The class of a refusal reason: an index into classes, or -1 (policy). */
static int classify(const char *reason) {
  if (reason == NULL) return -1;
  if (strncmp(reason, "rate_limited", 12) == 0) return 0;
  if (strncmp(reason, "concurrency", 11) == 0) return 1;
  if (strcmp(reason, "open") == 0 || strcmp(reason, "half_open") == 0) return 2;
  return -1;
}

wp_drop_reason wpl_refusal_class(const char *reason) {
  int cls = classify(reason);
  return cls >= 0 ? classes[cls] : WP_DROP_POLICY;
}

/* Builds "kind SEP a [SEP b [SEP c]]" into buf; 0 when it does not fit. */
static size_t key_of(char *buf, size_t cap, char kind, const char *a,
                     const char *b, const char *c) {
  int n = snprintf(buf, cap, "%c" SEP "%s%s%s%s%s", kind, a, b ? SEP : "",
                   b ? b : "", c ? SEP : "", c ? c : "");
  return n > 0 && (size_t)n < cap ? (size_t)n : 0;
}

static void incr_key(wp_shdict *d, const char *k, size_t klen) {
  wp_shval one = {WP_TINTEGER, {.i = 1}}, zero = {WP_TINTEGER, {.i = 0}};
  wp_shval out;
  if (klen) wp_shdict_incr(d, k, klen, &one, &zero, 0, &out);
}

/* The tenant's label in pool's series: itself, or "other" once the pool
 * has tenant_label_limit tenants labelled. */
static const char *tenant_label(wp_shdict *d, const char *pool,
                                const char *tenant) {
  char k[1024];
  size_t kl = key_of(k, sizeof k, 's', pool, tenant, NULL);
  wp_shval v, one = {WP_TINTEGER, {.i = 1}}, m1 = {WP_TINTEGER, {.i = -1}},
              zero = {WP_TINTEGER, {.i = 0}}, t = {WP_TBOOLEAN, {.b = 1}};
  int64_t limit = DEFAULT_TENANT_LABELS;
  if (kl == 0) return "other";
  if (wp_shdict_get(d, k, kl, &v) == 0 && v.type != WP_TNIL) {
    wp_shval_free(&v);
    return tenant;
  }
  {
    char lk[300];
    size_t ll = key_of(lk, sizeof lk, 'L', pool, NULL, NULL);
    if (ll && wp_shdict_get(d, lk, ll, &v) == 0 && v.type == WP_TINTEGER)
      limit = v.u.i;
    ll = key_of(lk, sizeof lk, 'n', pool, NULL, NULL);
    if (ll == 0 || wp_shdict_incr(d, lk, ll, &one, &zero, 0, &v) != 0)
      return "other";
    if (v.u.i > limit) {
      wp_shdict_incr(d, lk, ll, &m1, NULL, 0, &v);
      return "other";
    }
  }
  wp_shdict_add(d, k, kl, &t, 0);
  return tenant;
}

void wpl_metrics_admission(wp_pool *p, const char *tenant, int admitted,
                           const char *reason) {
  wp_shdict *d = metrics_dict();
  const char *pool = wp_pool_name(p);
  char k[1400];
  int cls = admitted ? -1 : classify(reason);
  if (d && tenant) tenant = tenant_label(d, pool, tenant);
  if (!admitted) /* before the class below: stats' "policy" stays >= 0 */
    wp_pool_count_drop_tenant(p, cls >= 0 ? classes[cls] : WP_DROP_POLICY,
                              tenant);
  if (d == NULL) return;
  if (!admitted && cls >= 0)
    incr_key(d, k, key_of(k, sizeof k, 'd', pool, CLASS(cls), NULL));
  if (tenant == NULL) return;
  if (admitted)
    incr_key(d, k, key_of(k, sizeof k, 'a', pool, tenant, NULL));
  else
    incr_key(
        d, k,
        key_of(k, sizeof k, 'r', pool, tenant,
               wp_drop_reason_name(cls >= 0 ? classes[cls] : WP_DROP_POLICY)));
}

/* Pools made through workerpool.new, for workerpool_pool_stopped: each
 * entry holds a reference until a new pool takes its name. */
typedef struct known_pool {
  struct known_pool *next;
  wp_pool *p;
} known_pool;

static uv_once_t known_once = UV_ONCE_INIT;
static uv_mutex_t known_mu; /* a leaf lock */
static known_pool *known;

static void known_init(void) {
  if (uv_mutex_init(&known_mu)) abort();
}

void wpl_metrics_pool_created(wp_pool *p, int tenant_label_limit) {
  known_pool *k = malloc(sizeof *k), **pp, *old = NULL;
  wp_shdict *d = metrics_dict();
  char lk[300];
  size_t ll = key_of(lk, sizeof lk, 'L', wp_pool_name(p), NULL, NULL);
  if (d && ll) {
    wp_shval v = {WP_TINTEGER, {.i = tenant_label_limit}};
    wp_shdict_set(d, lk, ll, &v, 0);
  }
  if (k == NULL) return;
  wp_pool_retain(p);
  k->p = p;
  uv_once(&known_once, known_init);
  uv_mutex_lock(&known_mu);
  for (pp = &known; *pp; pp = &(*pp)->next)
    if (strcmp(wp_pool_name((*pp)->p), wp_pool_name(p)) == 0) {
      old = *pp;
      *pp = old->next;
      break;
    }
  k->next = known;
  known = k;
  uv_mutex_unlock(&known_mu);
  if (old) {
    wp_pool_release(old->p);
    free(old);
  }
}

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

static void class_counts(wp_shdict *d, const char *pool, uint64_t *out);
static uint64_t other_refusals(uint64_t total, const uint64_t *cls);

int wpl_push_stats(lua_State *L, wp_pool *p) {
  wp_pool_stats *s = lua_newuserdatauv(L, sizeof *s, 0); /* GC-owned */
  uint64_t cls[NCLASSES];
  int j;
  wp_pool_get_stats(p, s);
  class_counts(metrics_dict(), wp_pool_name(p), cls);
  lua_createtable(L, 0, 20);
  set_int(L, "submitted", s->submitted);
  lua_createtable(L, 0, 4);
  set_int(L, wp_status_name(WP_OK), s->ok);
  set_int(L, wp_status_name(WP_ERROR), s->error);
  set_int(L, wp_status_name(WP_TIMEOUT), s->timeout);
  set_int(L, wp_status_name(WP_CANCELLED), s->cancelled);
  lua_setfield(L, -2, "completed");
  lua_createtable(L, 0, 4 + NCLASSES);
  set_int(L, wp_drop_reason_name(WP_DROP_FULL), s->dropped_full);
  set_int(L, wp_drop_reason_name(WP_DROP_STOPPED), s->dropped_stopped);
  set_int(L, wp_drop_reason_name(WP_DROP_DISCARDED), s->dropped_discarded);
  set_int(L, wp_drop_reason_name(WP_DROP_POLICY),
          other_refusals(s->dropped_policy, cls));
  for (j = 0; j < NCLASSES; j++)
    set_int(L, CLASS(j), cls[j]);
  lua_setfield(L, -2, "dropped");
  set_int(L, "queued", s->queued);
  set_int(L, "queued_peak", s->queued_peak);
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

/* ---- policy series ---------------------------------------------------- */

/* Keys as C strings (a key holding '\0' is cut there). */
typedef struct keylist {
  char **k;
  size_t n, cap;
  int failed;
} keylist;

static void collect_key(const char *k, size_t klen, void *ud) {
  keylist *l = ud;
  char *c;
  if (l->failed) return;
  if (l->n == l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 64;
    char **nk = realloc(l->k, cap * sizeof *nk);
    if (nk == NULL) {
      l->failed = 1;
      return;
    }
    l->k = nk;
    l->cap = cap;
  }
  if ((c = malloc(klen + 1)) == NULL) {
    l->failed = 1;
    return;
  }
  memcpy(c, k, klen);
  c[klen] = '\0';
  l->k[l->n++] = c;
}

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The keys of d, sorted. */
static void keys_of(wp_shdict *d, keylist *l) {
  memset(l, 0, sizeof *l);
  if (d) wp_shdict_keys(d, 0, collect_key, l);
  if (l->n) qsort(l->k, l->n, sizeof *l->k, cmp_str);
}

static void keys_free(keylist *l) {
  size_t i;
  for (i = 0; i < l->n; i++)
    free(l->k[i]);
  free(l->k);
}

static int64_t get_int(wp_shdict *d, const char *k, size_t klen) {
  wp_shval v;
  int64_t n = 0;
  if (d == NULL || klen == 0 || wp_shdict_get(d, k, klen, &v) != 0) return 0;
  if (v.type == WP_TINTEGER) n = v.u.i;
  if (v.type == WP_TNUMBER) n = (int64_t)v.u.n;
  wp_shval_free(&v);
  return n;
}

static void class_counts(wp_shdict *d, const char *pool, uint64_t *out) {
  char k[400];
  int j;
  for (j = 0; j < NCLASSES; j++) {
    int64_t n = get_int(d, k, key_of(k, sizeof k, 'd', pool, CLASS(j), NULL));
    out[j] = n > 0 ? (uint64_t)n : 0;
  }
}

/* Policy refusals that are none of the classes (never below 0: the
 * counts are read one after the other). */
static uint64_t other_refusals(uint64_t total, const uint64_t *cls) {
  uint64_t sum = 0;
  int j;
  for (j = 0; j < NCLASSES; j++)
    sum += cls[j];
  return total > sum ? total - sum : 0;
}

/* name{a="x",b="y"[,c="z"]} value, label values escaped. */
static void sample2(sbuf *b, const char *name, const char *l1, const char *v1,
                    const char *l2, const char *v2, const char *l3,
                    const char *v3, double value) {
  char num[64];
  adds(b, name);
  adds(b, "{");
  adds(b, l1);
  adds(b, "=\"");
  add_label(b, v1);
  adds(b, "\"");
  if (l2) {
    adds(b, ",");
    adds(b, l2);
    adds(b, "=\"");
    add_label(b, v2);
    adds(b, "\"");
  }
  if (l3) {
    adds(b, ",");
    adds(b, l3);
    adds(b, "=\"");
    add_label(b, v3);
    adds(b, "\"");
  }
  snprintf(num, sizeof num, "} %.17g\n", value);
  adds(b, num);
}

/* workerpool_pool_stopped for the pools made through workerpool.new and
 * the live ones in v. */
static void pools_stopped(sbuf *b, const snap *v, int m) {
  known_pool *k;
  int i;
  family(b, "workerpool_pool_stopped", "gauge",
         "1 once the pool has stopped (kept until a new pool takes the "
         "name).");
  uv_once(&known_once, known_init);
  uv_mutex_lock(&known_mu);
  for (k = known; k; k = k->next) {
    wp_pool_counts c;
    wp_pool_get_counts(k->p, &c);
    sample(b, "workerpool_pool_stopped", wp_pool_name(k->p), NULL,
           c.stopped ? 1 : 0);
  }
  for (i = 0; i < m; i++) {
    int seen = 0;
    for (k = known; k && !seen; k = k->next)
      seen = strcmp(wp_pool_name(k->p), v[i].name) == 0;
    if (!seen) sample(b, "workerpool_pool_stopped", v[i].name, NULL, 0);
  }
  uv_mutex_unlock(&known_mu);
}

/* Splits "x SEP a SEP rest" of a key: *a is a (cut in place), returns rest,
 * or NULL. */
static char *split(char *k, char **a) {
  char *s = strchr(k + 2, SEP[0]);
  if (k[1] != SEP[0] || s == NULL) return NULL;
  *s = '\0';
  *a = k + 2;
  return s + 1;
}

static void tenant_series(sbuf *b, keylist *l, wp_shdict *d) {
  size_t i;
  int fam = 0;
  for (i = 0; i < l->n; i++) {
    char *pool, *tenant, *k = l->k[i];
    int64_t n;
    if (k[0] != 'a') continue;
    n = get_int(d, k, strlen(k));
    if ((tenant = split(k, &pool)) == NULL) continue;
    if (!fam++)
      family(b, "workerpool_tenant_admitted_total", "counter",
             "Tasks the pool's policies admitted, by tenant.");
    sample2(b, "workerpool_tenant_admitted_total", "pool", pool, "tenant",
            tenant, NULL, NULL, (double)n);
  }
  fam = 0;
  for (i = 0; i < l->n; i++) {
    char *pool, *tenant, *cls, *k = l->k[i];
    int64_t n;
    if (k[0] != 'r') continue;
    n = get_int(d, k, strlen(k));
    if ((tenant = split(k, &pool)) == NULL) continue;
    if ((cls = strrchr(tenant, SEP[0])) == NULL) continue;
    *cls++ = '\0';
    if (!fam++)
      family(b, "workerpool_tenant_rejected_total", "counter",
             "Tasks the pool's policies refused, by tenant and reason.");
    sample2(b, "workerpool_tenant_rejected_total", "pool", pool, "tenant",
            tenant, "reason", cls, (double)n);
  }
}

/* The breakers of every dictionary breaker.new registered. */
static void breaker_series(sbuf *b, keylist *dicts) {
  static const char *const states[] = {"closed", "open", "half-open"};
  static const struct {
    char kind;
    const char *metric, *label, *help;
  } counters[] = {
      {'x', "workerpool_breaker_transitions_total", "to",
       "State changes of each circuit breaker, by target state."},
      {'r', "workerpool_breaker_rejected_total", "reason",
       "Tasks each circuit breaker refused, by reason."},
  };
  keylist *per;
  wp_shdict **dv;
  size_t i, j, nd = 0;
  int c, fam;
  if ((per = calloc(dicts->n + 1, sizeof *per)) == NULL) return;
  if ((dv = calloc(dicts->n + 1, sizeof *dv)) == NULL) {
    free(per);
    return;
  }
  for (i = 0; i < dicts->n; i++)
    if (dicts->k[i][0] == 'B' && dicts->k[i][1] == SEP[0] &&
        wp_shdict_open(dicts->k[i] + 2, 0, &dv[nd]) == 0) {
      keys_of(dv[nd], &per[nd]);
      nd++;
    }
  fam = 0;
  for (i = 0; i < nd; i++)
    for (j = 0; j < per[i].n; j++) {
      const char *k = per[i].k[j];
      wp_shval v;
      int st;
      if (strncmp(k, "b:", 2) != 0) continue;
      if (wp_shdict_get(dv[i], k, strlen(k), &v) != 0) continue;
      st = v.type == WP_TSTRING && v.u.s.len > 0 ? (unsigned char)v.u.s.ptr[0]
                                                 : -1;
      wp_shval_free(&v);
      if (st < 0 || st > 2) continue;
      if (!fam++)
        family(b, "workerpool_breaker_state", "gauge",
               "Current state of each circuit breaker (1: current).");
      for (c = 0; c < 3; c++)
        sample2(b, "workerpool_breaker_state", "breaker", k + 2, "state",
                states[c], NULL, NULL, c == st);
    }
  for (c = 0; c < 2; c++) {
    fam = 0;
    for (i = 0; i < nd; i++)
      for (j = 0; j < per[i].n; j++) {
        char *k = per[i].k[j], *name;
        int64_t n;
        if (k[0] != counters[c].kind || k[1] != ':') continue;
        if ((name = strchr(k + 2, ':')) == NULL) continue;
        n = get_int(dv[i], k, strlen(k));
        *name++ = '\0';
        if (!fam++) family(b, counters[c].metric, "counter", counters[c].help);
        sample2(b, counters[c].metric, "breaker", name, counters[c].label,
                k + 2, NULL, NULL, (double)n);
        name[-1] = ':';
      }
  }
  fam = 0;
  for (i = 0; i < nd; i++)
    for (j = 0; j < per[i].n; j++) {
      const char *k = per[i].k[j];
      if (strncmp(k, "f:", 2) != 0) continue;
      if (!fam++)
        family(b, "workerpool_breaker_fallback_total", "counter",
               "Tasks each circuit breaker sent to its fallback.");
      sample2(b, "workerpool_breaker_fallback_total", "breaker", k + 2, NULL,
              NULL, NULL, NULL, (double)get_int(dv[i], k, strlen(k)));
    }
  for (i = 0; i < nd; i++)
    keys_free(&per[i]);
  free(per);
  free(dv);
}

static void policy_series(sbuf *b, wp_shdict *md) {
  keylist l;
  keys_of(md, &l);
  tenant_series(b, &l, md);
  breaker_series(b, &l);
  if (l.failed) b->failed = 1;
  keys_free(&l);
}

static void run_thread_collectors(sbuf *b);

char *wpl_metrics_text(size_t *len) {
  static const wp_status results[] = {WP_OK, WP_ERROR, WP_TIMEOUT,
                                      WP_CANCELLED};
  static const wp_drop_reason reasons[] = {WP_DROP_FULL, WP_DROP_STOPPED,
                                           WP_DROP_DISCARDED, WP_DROP_POLICY};
  wp_pool **pools;
  snap *v;
  sbuf b = {0};
  wp_shdict *md = metrics_dict();
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
      snprintf(extra, sizeof extra, "result=\"%s\"",
               wp_status_name(results[j]));
      sample(&b, "workerpool_completed_total", v[i].name, extra, (double)c[j]);
    }
  }
  family(&b, "workerpool_dropped_total", "counter",
         "Tasks refused or dropped before running, by reason.");
  for (i = 0; i < m; i++) {
    uint64_t cls[NCLASSES];
    uint64_t d[4 + NCLASSES];
    class_counts(md, v[i].name, cls);
    d[0] = v[i].s.dropped_full;
    d[1] = v[i].s.dropped_stopped;
    d[2] = v[i].s.dropped_discarded;
    d[3] = other_refusals(v[i].s.dropped_policy, cls);
    for (j = 0; j < NCLASSES; j++)
      d[4 + j] = cls[j];
    for (j = 0; j < 4 + NCLASSES; j++) {
      snprintf(extra, sizeof extra, "reason=\"%s\"",
               wp_drop_reason_name(j < 4 ? reasons[j] : classes[j - 4]));
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
  SERIES("workerpool_queue_depth_peak", "gauge",
         "The most tasks queued at once since the pool began.", queued_peak)
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
  pools_stopped(&b, v, m);
  free(v);
  policy_series(&b, md);
  run_thread_collectors(&b);
  if (b.failed) {
    free(b.p);
    return NULL;
  }
  *len = b.len;
  return b.p;
}

/* ---- Lua collectors --------------------------------------------------- */

/* States that registered collectors, with their threads: GET /metrics,
 * served on a host's loop thread while its state is idle, runs the
 * collectors of the state registered on that thread. */
typedef struct coll_state {
  struct coll_state *next;
  lua_State *L; /* the main thread */
  uv_thread_t thread;
} coll_state;

static uv_once_t coll_once = UV_ONCE_INIT;
static uv_mutex_t coll_mu; /* a leaf lock */
static coll_state *coll_states;
static _Thread_local int in_push; /* wpl_push_metrics runs them itself */
static const char coll_key = 'c', sentinel_key = 's';

#define WPL_COLL_MT "workerpool.collectors"

static void coll_init(void) {
  if (uv_mutex_init(&coll_mu)) abort();
}

void wpl_metrics_atfork(int phase) {
  if (phase == WP__FORK_PREPARE) {
    wp__atfork_lock(phase, &known_once, known_init, &known_mu);
    wp__atfork_lock(phase, &coll_once, coll_init, &coll_mu);
    return;
  }
  if (phase == WP__FORK_CHILD) known = NULL; /* the parent's pools */
  wp__atfork_lock(phase, &coll_once, coll_init, &coll_mu);
  wp__atfork_lock(phase, &known_once, known_init, &known_mu);
}

/* __gc of a state's sentinel: the state closes.   [-0, +0, -] */
static int coll_gc(lua_State *L) {
  coll_state **box = luaL_checkudata(L, 1, WPL_COLL_MT), **pp;
  uv_once(&coll_once, coll_init);
  uv_mutex_lock(&coll_mu);
  for (pp = &coll_states; *pp; pp = &(*pp)->next)
    if (*pp == *box) {
      *pp = (*box)->next;
      break;
    }
  uv_mutex_unlock(&coll_mu);
  free(*box);
  *box = NULL;
  return 0;
}

int wpl_metrics_collector(lua_State *L) {
  luaL_checkstring(L, 1);
  if (!lua_isnil(L, 2)) luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_settop(L, 2);
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &coll_key) == LUA_TNIL) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &coll_key);
  }
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  lua_rawset(L, -3);
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &sentinel_key) == LUA_TNIL) {
    coll_state **box = lua_newuserdatauv(L, sizeof *box, 0);
    *box = NULL;
    luaL_setmetatable(L, WPL_COLL_MT);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &sentinel_key);
    if ((*box = malloc(sizeof **box)) == NULL)
      return luaL_error(L, "not enough memory");
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    (*box)->L = lua_tothread(L, -1);
    lua_pop(L, 1);
    (*box)->thread = uv_thread_self();
    uv_once(&coll_once, coll_init);
    uv_mutex_lock(&coll_mu);
    (*box)->next = coll_states;
    coll_states = *box;
    uv_mutex_unlock(&coll_mu);
  }
  return 0;
}

/* [-1, +1, e] Replaces the text at the top by itself plus what this
 * state's collectors add (lua/workerpool/exposition.lua). */
static int append_collectors(lua_State *L) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &coll_key) == LUA_TNIL) {
    lua_pop(L, 1);
    return 1;
  }
  lua_getglobal(L, "require");
  lua_pushliteral(L, "workerpool.exposition");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "append");
  lua_remove(L, -2);
  lua_insert(L, -3); /* append text collectors */
  lua_call(L, 2, 1);
  return 1;
}

/* [-0, +1, e] upvalue-less: the text is in the sbuf at 1. */
static int collect_protected(lua_State *L) {
  sbuf *b = lua_touserdata(L, 1);
  lua_pushlstring(L, b->p, b->len);
  return append_collectors(L);
}

/* Runs the collectors of the state registered on this thread, if any, on
 * the text in b (an idle host state, called from its loop). */
static void run_thread_collectors(sbuf *b) {
  coll_state *c;
  lua_State *L = NULL;
  uv_thread_t self = uv_thread_self();
  if (in_push || b->failed) return;
  uv_once(&coll_once, coll_init);
  uv_mutex_lock(&coll_mu);
  for (c = coll_states; c && !L; c = c->next)
    if (uv_thread_equal(&c->thread, &self)) L = c->L;
  uv_mutex_unlock(&coll_mu);
  if (L == NULL) return;
  {
    int top = lua_gettop(L);
    lua_pushcfunction(L, collect_protected);
    lua_pushlightuserdata(L, b);
    if (lua_pcall(L, 1, 1, 0) == LUA_OK) {
      size_t n;
      const char *t = lua_tolstring(L, -1, &n);
      b->len = 0;
      add(b, t, n);
    } else {
      wpl_log(WPL_ERROR, "metrics.error",
              json_pack("{s:o}", "error", wpl_json_str(lua_tostring(L, -1))));
    }
    lua_settop(L, top);
  }
}

/* ---- the live view: pool:inspect() and GET /debug/pools -------------- */

typedef struct view {
  wp_worker_info *w;
  int n;
  size_t queued;
  double oldest;
} view;

/* Fills v for p (v->w malloc'd; free it).  0, or WP_ENOMEM.  No Lua. */
static int view_of(wp_pool *p, view *v) {
  int cap = 16;
  memset(v, 0, sizeof *v);
  for (;;) {
    if ((v->w = malloc((size_t)cap * sizeof *v->w)) == NULL) return WP_ENOMEM;
    v->n = wp_pool_inspect(p, v->w, cap, &v->queued, &v->oldest);
    if (v->n <= cap) return 0;
    free(v->w);
    cap = v->n + 16;
  }
}

/* Whether tasks wait while every worker is stuck or past its deadline. */
static int view_wedged(const view *v) {
  int i;
  if (v->queued == 0 || v->n == 0) return 0;
  for (i = 0; i < v->n; i++)
    if (v->w[i].state != 2 && !v->w[i].overdue) return 0;
  return 1;
}

static const char *const worker_states[] = {"idle", "running", "stuck"};

/* The view as a JSON object (NULL out of memory).  No Lua. */
static json_t *view_json(const char *name, const view *v) {
  json_t *ws = json_array(), *o;
  int i;
  if (ws == NULL) return NULL;
  for (i = 0; i < v->n; i++) {
    const wp_worker_info *w = &v->w[i];
    json_t *j = json_pack("{s:i,s:s,s:f,s:I,s:I,s:b}", "id", w->id, "state",
                          worker_states[w->state], "running_s", w->running_s,
                          "tasks_done", (json_int_t)w->tasks_done, "memory",
                          (json_int_t)w->memory, "overdue", w->overdue);
    if (j && w->has_task) json_object_set_new(j, "task", wpl_json_str(w->task));
    if (j && w->has_tenant)
      json_object_set_new(j, "tenant", wpl_json_str(w->tenant));
    if (j == NULL || json_array_append_new(ws, j) != 0) {
      json_decref(ws);
      return NULL;
    }
  }
  o = json_pack("{s:o,s:o,s:I,s:f,s:b}", "pool", wpl_json_str(name), "workers",
                ws, "queued", (json_int_t)v->queued, "oldest_queued_s",
                v->oldest, "wedged", view_wedged(v));
  return o;
}

int wpl_push_inspect(lua_State *L, wp_pool *p) {
  view *v = lua_newuserdatauv(L, sizeof *v, 0); /* anchors nothing */
  wp_worker_info *w;
  int i;
  if (view_of(p, v) != 0) return luaL_error(L, "not enough memory");
  /* Copied into Lua-owned memory before any call that can raise. */
  w = lua_newuserdatauv(L, (size_t)(v->n ? v->n : 1) * sizeof *w, 0);
  memcpy(w, v->w, (size_t)v->n * sizeof *w);
  free(v->w);
  v->w = w;
  lua_createtable(L, 0, 4);
  lua_createtable(L, v->n, 0);
  for (i = 0; i < v->n; i++) {
    lua_createtable(L, 0, 8);
    lua_pushinteger(L, w[i].id);
    lua_setfield(L, -2, "id");
    lua_pushstring(L, worker_states[w[i].state]);
    lua_setfield(L, -2, "state");
    if (w[i].has_task) {
      lua_pushstring(L, w[i].task);
      lua_setfield(L, -2, "task");
    }
    if (w[i].has_tenant) {
      lua_pushstring(L, w[i].tenant);
      lua_setfield(L, -2, "tenant");
    }
    lua_pushnumber(L, w[i].running_s);
    lua_setfield(L, -2, "running_s");
    lua_pushboolean(L, w[i].overdue);
    lua_setfield(L, -2, "overdue");
    lua_pushinteger(L, (lua_Integer)w[i].tasks_done);
    lua_setfield(L, -2, "tasks_done");
    lua_pushinteger(L, (lua_Integer)w[i].memory);
    lua_setfield(L, -2, "memory");
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "workers");
  lua_pushinteger(L, (lua_Integer)v->queued);
  lua_setfield(L, -2, "queued");
  lua_pushnumber(L, v->oldest);
  lua_setfield(L, -2, "oldest_queued_s");
  lua_pushboolean(L, view_wedged(v));
  lua_setfield(L, -2, "wedged");
  return 1;
}

/* Calls fn for each live pool with its view; stops at a nonzero return.
 * Returns that, or -1 out of memory. */
static int each_view(int (*fn)(const char *, const view *, void *), void *ud) {
  wp_pool **pools;
  int n = wp_pool_list(NULL, 0), m, i, r = 0;
  if ((pools = malloc((size_t)(n + 1) * sizeof *pools)) == NULL) return -1;
  m = wp_pool_list(pools, n);
  if (m > n) m = n;
  for (i = 0; i < m; i++) {
    view v;
    if (r == 0) {
      if (view_of(pools[i], &v) != 0) {
        r = -1;
      } else {
        r = fn(wp_pool_name(pools[i]), &v, ud);
        free(v.w);
      }
    }
    wp_pool_release(pools[i]);
  }
  free(pools);
  return r;
}

static int wedged_fn(const char *name, const view *v, void *ud) {
  (void)name;
  (void)ud;
  return view_wedged(v);
}

int wpl_pools_wedged(void) {
  return each_view(wedged_fn, NULL) == 1;
}

static int json_fn(const char *name, const view *v, void *ud) {
  json_t *o = view_json(name, v);
  return o == NULL || json_array_append_new(ud, o) != 0 ? -1 : 0;
}

char *wpl_pools_json(size_t *len) {
  json_t *a = json_array();
  char *s;
  if (a == NULL) return NULL;
  if (each_view(json_fn, a) != 0) {
    json_decref(a);
    return NULL;
  }
  s = json_dumps(a, JSON_COMPACT);
  json_decref(a);
  if (s) *len = strlen(s);
  return s;
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
  wpl_gc_metatable(L, WPL_CBUF_MT, cbuf_gc);
  wpl_gc_metatable(L, WPL_COLL_MT, coll_gc);
}

/* [-0, +1, m] Pushes the exposition text for every live pool.  The text is
 * boxed in a collectable userdata first, so a memory error while pushing
 * it cannot leak it. */
int wpl_push_metrics(lua_State *L) {
  size_t len;
  char **box = lua_newuserdatauv(L, sizeof *box, 0);
  *box = NULL;
  luaL_setmetatable(L, WPL_CBUF_MT);
  in_push = 1;
  *box = wpl_metrics_text(&len);
  in_push = 0;
  if (*box == NULL) return luaL_error(L, "not enough memory");
  lua_pushlstring(L, *box, len);
  free(*box);
  *box = NULL;
  lua_remove(L, -2);
  return append_collectors(L);
}
