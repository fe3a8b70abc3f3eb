/*
 * watchdog.c: one thread per pool that watches running tasks.
 *
 * It interrupts a task whose deadline passed (the worker's own thread then
 * installs a count hook, see worker.c), declares a worker stuck when its
 * task is still running stuck_grace seconds later (the task is resolved as
 * a timeout, or as cancelled when a cancel or a hard stop interrupted it;
 * the worker stops counting toward max_workers and a replacement may
 * start; its state is never reused), abandons a worker whose state takes
 * longer than stuck_grace (at least 1 s) to close (a __gc that never
 * returns), reports slow tasks, fails the queued tasks that no worker
 * could be started for (wp__grow_locked), and writes the periodic
 * summaries of dropped tasks.  It runs until the last worker has exited,
 * stops and drains included.  It sleeps
 * until the next thing it must look at; submitting a task with a deadline
 * wakes it.
 */
#include <string.h>

#include "wp_internal.h"

#define MAX_EVENTS 16 /* per pass; more wait for the next pass */
#define CLOSE_GRACE_MIN 1000000000ull /* ns */

typedef struct pass {
  wp_event ev[MAX_EVENTS];
  char task[MAX_EVENTS][64];
  char tenant[MAX_EVENTS][64];
  int n;
  wp_future *stuck[MAX_EVENTS]; /* to resolve, referenced */
  wp_status stuck_status[MAX_EVENTS];
  int nstuck;
} pass;

static wp_event *new_event(pass *ps, wp_pool *p, wp_event_type type,
                           wp__worker *w) {
  wp_event *ev;
  if (ps->n == MAX_EVENTS) return NULL;
  ev = &ps->ev[ps->n];
  memset(ev, 0, sizeof *ev);
  ev->type = type;
  ev->pool = p->name;
  if (w) {
    ev->worker = w->id;
    if (w->cur && w->cur->name) {
      strncpy(ps->task[ps->n], w->cur->name, sizeof ps->task[0] - 1);
      ps->task[ps->n][sizeof ps->task[0] - 1] = '\0';
      ev->task = ps->task[ps->n];
    }
    if (w->cur && w->cur->tenant) {
      strncpy(ps->tenant[ps->n], w->cur->tenant, sizeof ps->tenant[0] - 1);
      ps->tenant[ps->n][sizeof ps->tenant[0] - 1] = '\0';
      ev->tenant = ps->tenant[ps->n];
    }
  }
  ps->n++;
  return ev;
}

static uint64_t earlier(uint64_t a, uint64_t b) {
  return a < b ? a : b;
}

/* Abandons w, whose state has been closing for `took` ns, longer than
 * stuck_grace: stop no longer waits for its thread.  Needs mu. */
static void abandon_closing_locked(wp_pool *p, wp__worker *w, wp_event *ev,
                                   uint64_t took) {
  ev->seconds = (double)took / 1e9;
  ev->message = "closing its Lua state";
  w->close_stuck = 1;
  if (!w->stuck) { /* else counted when its task got stuck */
    w->stuck = 1;
    p->nstuck++;
    atomic_fetch_add(&p->c.stuck_total, 1);
    wp__worker_uncount_locked(p, w);
    if (w->cur) p->nrunning--;
    if (!p->paused && p->state < WP__STOPPING) wp__grow_locked(p);
  }
  if (p->nwaiters) uv_cond_broadcast(&p->state_cv);
}

/* The drop summaries, once drop_interval has passed: one event per
 * (reason, tenant) row, and one per core reason for the drops counted
 * without a row.  What does not fit in this pass waits for the next one,
 * which comes at once.  Needs mu. */
static void drops_locked(wp_pool *p, pass *ps, uint64_t now) {
  static const wp_drop_reason reasons[WP__NSUMMARY] = {
      WP_DROP_FULL,        WP_DROP_STOPPED,      WP_DROP_DISCARDED,
      WP_DROP_POLICY,      WP_DROP_RATE_LIMITED, WP_DROP_CONCURRENCY,
      WP_DROP_BREAKER_OPEN}; /* by WP__DROP_* */
  wp_event *ev;
  int i, done = 1;
  if (now < p->next_drop_log) return;
  for (i = 0; i < WP__NDROPS; i++) {
    uint64_t total = atomic_load(&p->c.dropped[i]);
    uint64_t plain = total - p->drops_logged[i] - p->drops_tabled[i];
    if (plain == 0) continue;
    if ((ev = new_event(ps, p, WP_EV_DROPPED, NULL)) != NULL) {
      ev->n = (int64_t)plain;
      ev->reason = wp_drop_reason_name(reasons[i]);
      ev->seconds = (double)p->drop_interval_ns / 1e9;
      p->drops_logged[i] = total - p->drops_tabled[i];
    } else {
      done = 0;
    }
  }
  while (p->ndrop_rows > 0 && ps->n < MAX_EVENTS) {
    wp__droprow *r = &p->drop_rows[p->ndrop_rows - 1];
    int core = r->reason == WP__DROP_FULL ? WP__DROP_FULL : WP__DROP_POLICY;
    ev = new_event(ps, p, WP_EV_DROPPED, NULL);
    ev->n = (int64_t)r->n;
    ev->reason = wp_drop_reason_name(reasons[r->reason]);
    ev->seconds = (double)p->drop_interval_ns / 1e9;
    if (r->has_tenant) {
      memcpy(ps->tenant[ps->n - 1], r->tenant, sizeof r->tenant);
      ev->tenant = ps->tenant[ps->n - 1];
    }
    p->drops_tabled[core] -= r->n;
    p->drops_logged[core] += r->n;
    p->ndrop_rows--;
  }
  if (done && p->ndrop_rows == 0) p->next_drop_log = now + p->drop_interval_ns;
}

/* One look at the pool.  Needs mu; returns when to look again. */
static uint64_t look_locked(wp_pool *p, pass *ps, uint64_t now) {
  uint64_t next = now + 1000000000ull; /* at least once a second */
  uint64_t close_grace = (uint64_t)p->stuck_grace_ns;
  wp__worker *w;
  wp_event *ev;
  /* Closing a large state legitimately takes a while: a worker gets at
   * least CLOSE_GRACE_MIN to close its state, even with stuck_grace 0. */
  if (close_grace < CLOSE_GRACE_MIN) close_grace = CLOSE_GRACE_MIN;
  for (w = p->workers; w; w = w->next) {
    uint64_t closing = atomic_load(&w->closing), deadline;
    if (closing && !w->close_stuck && !w->closed) {
      uint64_t at = closing + close_grace;
      if (now < at)
        next = earlier(next, at);
      else if ((ev = new_event(ps, p, WP_EV_WORKER_STUCK, w)) != NULL)
        abandon_closing_locked(p, w, ev, now - closing);
    }
    if (w->cur == NULL || w->stuck) continue;
    /* A hard stop is a deadline for every task running then. */
    deadline = w->deadline;
    if (p->hard_at && (deadline == 0 || p->hard_at < deadline))
      deadline = p->hard_at;
    if (deadline) {
      uint64_t seq = atomic_load(&w->run_seq), stuck_at;
      if (now >= deadline && atomic_load(&w->kill_seq) != seq)
        wp__worker_interrupt(
            w, seq, deadline == w->deadline ? WP_TIMEOUT : WP_CANCELLED);
      /* The grace runs from the interrupt, which a watchdog woken late
       * (on a loaded machine) sends after the deadline. */
      stuck_at = deadline;
      if (atomic_load(&w->kill_seq) == seq && w->kill_at > stuck_at)
        stuck_at = w->kill_at;
      stuck_at += (uint64_t)p->stuck_grace_ns;
      if (now >= stuck_at && ps->nstuck < MAX_EVENTS &&
          (ev = new_event(ps, p, WP_EV_WORKER_STUCK, w)) != NULL) {
        ev->seconds = (double)(now - deadline) / 1e9;
        w->stuck = 1;
        wp__worker_uncount_locked(p, w);
        p->nrunning--;
        p->nstuck++;
        atomic_fetch_add(&p->c.stuck_total, 1);
        wp_future_retain(w->cur);
        ps->stuck_status[ps->nstuck] =
            atomic_load(&w->kill_seq) == seq
                ? (wp_status)atomic_load(&w->kill_reason)
                : WP_TIMEOUT;
        ps->stuck[ps->nstuck++] = w->cur;
        if (!p->paused && p->state < WP__STOPPING) wp__grow_locked(p);
        if (p->nwaiters) uv_cond_broadcast(&p->state_cv);
        continue;
      }
      next = earlier(next, now >= deadline ? stuck_at : deadline);
    }
    if (p->slow_ns && !w->slow_reported) {
      uint64_t slow_at = w->started + (uint64_t)p->slow_ns;
      if (now >= slow_at) {
        if ((ev = new_event(ps, p, WP_EV_TASK_SLOW, w)) != NULL) {
          ev->seconds = (double)(now - w->started) / 1e9;
          w->slow_reported = 1;
        }
      } else {
        next = earlier(next, slow_at);
      }
    }
  }
  drops_locked(p, ps, now);
  return earlier(next, p->next_drop_log);
}

/* Fails the tasks of a list taken from p->stranded, and drops the
 * queue's references.  Needs nothing locked. */
static void fail_stranded(wp_pool *p, wp_future *f, int err) {
  const char *msg = err == WP_ENOMEM ? "not enough memory to start a worker"
                                     : "could not start a worker thread";
  while (f) {
    wp_future *next = f->next;
    f->next = NULL;
    if (wp__future_fail(f, WP_ERROR, msg))
      wp__pool_count_end(p, NULL, wp_future_status(f), -1);
    wp_future_release(f);
    f = next;
  }
}

static void dog_main(void *arg) {
  wp_pool *p = arg;
  pass ps;
  uint64_t now, next;
  wp_future *stranded;
  int i, err;
  wp__pool_lock(p);
  while (!p->dog_exit) {
    ps.n = ps.nstuck = 0;
    now = uv_hrtime();
    next = look_locked(p, &ps, now);
    wp__pool_check_locked(p);
    stranded = p->stranded;
    p->stranded = NULL;
    err = p->strand_err;
    if (ps.n || stranded) {
      wp__pool_unlock(p);
      fail_stranded(p, stranded, err);
      for (i = 0; i < ps.nstuck; i++) {
        wp_status st = ps.stuck_status[i];
        if (wp__future_fail(ps.stuck[i], st, wp_status_name(st)))
          wp__pool_count_end(p, NULL, wp_future_status(ps.stuck[i]), -1);
        wp_future_release(ps.stuck[i]);
      }
      for (i = 0; i < ps.n; i++)
        wp__emit(&ps.ev[i]);
      wp__pool_lock(p);
      continue; /* look again: time passed */
    }
    now = uv_hrtime();
    if (next > now) wp__pool_timedwait(p, &p->dog_cv, next - now);
  }
  /* Last words: the drops since the last summary. */
  do {
    ps.n = ps.nstuck = 0;
    p->next_drop_log = 0;
    drops_locked(p, &ps, uv_hrtime());
    wp__pool_unlock(p);
    for (i = 0; i < ps.n; i++)
      wp__emit(&ps.ev[i]);
    wp__pool_lock(p);
  } while (ps.n == MAX_EVENTS);
  stranded = p->stranded;
  p->stranded = NULL;
  err = p->strand_err;
  wp__pool_unlock(p);
  fail_stranded(p, stranded, err);
}

int wp__watchdog_start(wp_pool *p) {
  if (uv_thread_create(&p->dog, dog_main, p) != 0) return WP_ESYS;
  p->dog_started = 1;
  return 0;
}

void wp__watchdog_stop(wp_pool *p) {
  if (!p->dog_started) return;
  wp__pool_lock(p);
  p->dog_exit = 1;
  uv_cond_signal(&p->dog_cv);
  wp__pool_unlock(p);
  uv_thread_join(&p->dog);
  p->dog_started = 0;
}

void wp__watchdog_poke(wp_pool *p) {
  uv_cond_signal(&p->dog_cv);
}
