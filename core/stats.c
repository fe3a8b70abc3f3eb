/*
 * stats.c: a pool's metrics and the process-wide event sink.
 *
 * Counters and histograms are atomics updated with relaxed operations, so
 * the task path takes no lock for them; what workers count is striped by
 * worker id (see wp__stripe); wp_pool_get_stats reads them next
 * to a snapshot of the gauges taken under the pool's lock.  Events go to one
 * handler installed by the embedder (the Lua bindings turn them into JSON
 * log lines).
 */
#include <string.h>

#include "wp_internal.h"

static _Atomic(wp_event_fn) event_handler;

void wp_set_event_handler(wp_event_fn fn) {
  atomic_store(&event_handler, fn);
}

void wp__emit(const wp_event *ev) {
  wp_event_fn fn = atomic_load(&event_handler);
  if (fn) fn(ev);
}

static void add(atomic_uint_fast64_t *a, uint64_t n) {
  atomic_fetch_add_explicit(a, n, memory_order_relaxed);
}

static uint64_t get(atomic_uint_fast64_t *a) {
  return atomic_load_explicit(a, memory_order_relaxed);
}

/* Adds n to a stripe's counter; own: the caller is its one writer, and
 * a plain load and store do. */
static void bump(atomic_uint_fast64_t *a, uint64_t n, int own) {
  if (own)
    atomic_store_explicit(a, atomic_load_explicit(a, memory_order_relaxed) + n,
                          memory_order_relaxed);
  else
    add(a, n);
}

/* Counts ns in h. */
static void hist_add(wp__hist *h, uint64_t ns, int own) {
  uint64_t ms = (ns + 999999) / 1000000; /* rounded up */
  int k = 0;
  while (k < WP_HIST_BUCKETS - 1 && ms > ((uint64_t)1 << k))
    k++;
  bump(&h->buckets[k], 1, own);
  bump(&h->sum_ns, ns, own);
}

void wp__stripe_take_locked(wp_pool *p, wp__worker *w) {
  int i;
  w->stripe = 0;
  for (i = 1; i < WP__NSTRIPES; i++)
    if (!(p->stripes_used & 1u << i)) {
      p->stripes_used |= 1u << i;
      w->stripe = i;
      return;
    }
}

void wp__stripe_give_locked(wp_pool *p, wp__worker *w) {
  p->stripes_used &= ~(1u << w->stripe);
  w->stripe = 0;
}

/* Adds histogram h to out; sum_ns sums the nanoseconds. */
static void hist_add_to(wp__hist *h, wp_hist *out, uint64_t *sum_ns) {
  int k;
  for (k = 0; k < WP_HIST_BUCKETS; k++) {
    uint64_t n = get(&h->buckets[k]);
    out->buckets[k] += n;
    out->count += n;
  }
  *sum_ns += get(&h->sum_ns);
}

void wp__count_drop(wp_pool *p, int reason, uint64_t n) {
  add(&p->c.dropped[reason], n);
}

void wp_pool_count_drop(wp_pool *p, wp_drop_reason why) {
  wp__count_drop(p, why == WP_DROP_FULL ? WP__DROP_FULL : WP__DROP_POLICY, 1);
}

/* Rows kept free for "other" under each reason and the untenanted rows of
 * the policy classes, so that every drop finds a row. */
#define RESERVED_ROWS (WP__NSUMMARY + WP__NSUMMARY - WP__NDROPS)

static wp__droprow *find_row(wp_pool *p, int reason, const char *tenant) {
  int i;
  for (i = 0; i < p->ndrop_rows; i++) {
    wp__droprow *r = &p->drop_rows[i];
    if (r->reason == reason && r->has_tenant == (tenant != NULL) &&
        (tenant == NULL || strcmp(r->tenant, tenant) == 0))
      return r;
  }
  if (p->ndrop_rows == WP_DROP_TENANT_ROWS ||
      (tenant && strcmp(tenant, "other") != 0 &&
       p->ndrop_rows >= WP_DROP_TENANT_ROWS - RESERVED_ROWS))
    return NULL;
  p->drop_rows[p->ndrop_rows] = (wp__droprow){reason, tenant != NULL, 0, ""};
  if (tenant)
    strcpy(p->drop_rows[p->ndrop_rows].tenant, tenant); /* fits: truncated */
  return &p->drop_rows[p->ndrop_rows++];
}

void wp_pool_count_drop_tenant(wp_pool *p, wp_drop_reason why,
                               const char *tenant) {
  static const int summary[] = {WP__DROP_FULL, WP__DROP_POLICY,
                                WP__DROP_RATE_LIMITED, WP__DROP_CONCURRENCY,
                                WP__DROP_BREAKER_OPEN};
  int reason = (unsigned)why < sizeof summary / sizeof *summary
                   ? summary[why]
                   : WP__DROP_POLICY;
  int core = reason == WP__DROP_FULL ? WP__DROP_FULL : WP__DROP_POLICY;
  char t[sizeof p->drop_rows[0].tenant];
  wp__droprow *row;
  if (tenant == NULL && reason < WP__NDROPS) { /* the plain summary */
    wp__count_drop(p, core, 1);
    return;
  }
  if (wp__pool_forked(p)) return;
  if (tenant) {
    strncpy(t, tenant, sizeof t - 1);
    t[sizeof t - 1] = '\0';
  }
  wp__pool_lock(p);
  row = find_row(p, reason, tenant ? t : NULL);
  if (row == NULL) row = find_row(p, reason, "other");
  if (row) { /* always, given the reserved rows */
    row->n++;
    p->drops_tabled[core]++;
  }
  wp__count_drop(p, core, 1);
  wp__pool_unlock(p);
}

void wp__pool_count_end(wp_pool *p, const wp__worker *w, wp_status status,
                        double seconds) {
  int own = w != NULL && w->stripe != 0;
  wp__stripe *s = &p->c.stripes[own ? w->stripe : 0];
  if (status == WP_DISCARDED) {
    wp__count_drop(p, WP__DROP_DISCARDED, 1);
    return;
  }
  if (status < WP_OK || status > WP_TIMEOUT) return;
  bump(&s->ended[status], 1, own);
  if (seconds >= 0) hist_add(&s->duration, (uint64_t)(seconds * 1e9), own);
}

void wp__pool_count_dwell(wp_pool *p, const wp__worker *w, uint64_t ns) {
  hist_add(&p->c.stripes[w->stripe].dwell, ns, w->stripe != 0);
}

/* Adds up a counter over the stripes. */
static uint64_t ended(wp_pool *p, wp_status st) {
  uint64_t n = 0;
  int i;
  for (i = 0; i < WP__NSTRIPES; i++)
    n += get(&p->c.stripes[i].ended[st]);
  return n;
}

void wp_pool_get_stats(wp_pool *p, wp_pool_stats *s) {
  wp__worker *w;
  size_t mem = 0;
  uint64_t duration_ns = 0, dwell_ns = 0;
  int i;
  memset(s, 0, sizeof *s);
  if (wp__pool_forked(p)) { /* the parent's pool: nothing runs here */
    s->max_workers = p->max_workers;
    return;
  }
  wp__pool_lock(p);
  s->queued = p->nqueued;
  s->queued_peak = p->nqueued_peak;
  s->queued_bytes = p->queued_bytes;
  s->running = p->nrunning;
  s->workers = p->nworkers;
  s->stuck = p->nstuck;
  s->max_workers = p->max_workers;
  for (w = p->workers; w; w = w->next)
    if (!w->closed) {
      size_t m = atomic_load_explicit(&w->mem_pub, memory_order_relaxed);
      mem += m;
      if (m > s->memory_max) s->memory_max = m;
    }
  if (p->spare) mem += atomic_load(&p->spare->mem_pub);
  wp__pool_unlock(p);
  s->memory = mem;
  s->submitted = get(&p->c.submitted);
  s->ok = ended(p, WP_OK);
  s->error = ended(p, WP_ERROR);
  s->timeout = ended(p, WP_TIMEOUT);
  s->cancelled = ended(p, WP_CANCELLED);
  s->dropped_full = get(&p->c.dropped[WP__DROP_FULL]);
  s->dropped_stopped = get(&p->c.dropped[WP__DROP_STOPPED]);
  s->dropped_discarded = get(&p->c.dropped[WP__DROP_DISCARDED]);
  s->dropped_policy = get(&p->c.dropped[WP__DROP_POLICY]);
  s->memory_limit_hits = get(&p->c.memory_limit_hits);
  s->stuck_total = get(&p->c.stuck_total);
  for (i = 0; i < WP__NSTRIPES; i++) {
    hist_add_to(&p->c.stripes[i].duration, &s->duration, &duration_ns);
    hist_add_to(&p->c.stripes[i].dwell, &s->dwell, &dwell_ns);
  }
  s->duration.sum = (double)duration_ns / 1e9;
  s->dwell.sum = (double)dwell_ns / 1e9;
}
