/*
 * watchdog.c: one thread per pool that watches running tasks.
 *
 * It interrupts a task whose deadline passed (the worker's own thread then
 * installs a count hook, see worker.c), declares a worker stuck when its
 * task is still running stuck_grace seconds later (the task is resolved as
 * a timeout, the worker stops counting toward max_workers and a replacement
 * may start; its state is never reused), reports slow tasks, and writes the
 * periodic summaries of dropped tasks.  It sleeps until the next thing it
 * must look at; submitting a task with a deadline wakes it.
 */
#include <string.h>

#include "wp_internal.h"

#define MAX_EVENTS 16 /* per pass; more wait for the next pass */

typedef struct pass {
  wp_event ev[MAX_EVENTS];
  char task[MAX_EVENTS][64];
  int n;
  wp_future *stuck[MAX_EVENTS]; /* to resolve as timeouts, referenced */
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
  }
  ps->n++;
  return ev;
}

static uint64_t earlier(uint64_t a, uint64_t b) {
  return a < b ? a : b;
}

/* One look at the pool.  Needs mu; returns when to look again. */
static uint64_t look_locked(wp_pool *p, pass *ps, uint64_t now) {
  static const char *const reasons[WP__NDROPS] = {"full", "stopped",
                                                  "discarded", "policy"};
  uint64_t next = now + 1000000000ull; /* at least once a second */
  wp__worker *w;
  wp_event *ev;
  int i;
  for (w = p->workers; w; w = w->next) {
    if (w->cur == NULL || w->stuck) continue;
    if (w->deadline) {
      uint64_t seq = atomic_load(&w->run_seq);
      uint64_t stuck_at = w->deadline + (uint64_t)p->stuck_grace_ns;
      if (now >= w->deadline && atomic_load(&w->kill_seq) != seq)
        wp__worker_interrupt(w, seq, WP_TIMEOUT);
      if (now >= stuck_at && ps->nstuck < MAX_EVENTS &&
          (ev = new_event(ps, p, WP_EV_WORKER_STUCK, w)) != NULL) {
        ev->seconds = (double)(now - w->deadline) / 1e9;
        w->stuck = 1;
        p->nworkers--;
        p->nrunning--;
        p->nstuck++;
        atomic_fetch_add(&p->c.stuck_total, 1);
        wp_future_retain(w->cur);
        ps->stuck[ps->nstuck++] = w->cur;
        if (!p->paused && p->state < WP__STOPPING) wp__grow_locked(p);
        if (p->nwaiters) uv_cond_broadcast(&p->state_cv);
        continue;
      }
      next = earlier(next, now >= w->deadline ? stuck_at : w->deadline);
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
  if (now >= p->next_drop_log) {
    for (i = 0; i < WP__NDROPS; i++) {
      uint64_t total = atomic_load(&p->c.dropped[i]);
      if (total != p->drops_logged[i] &&
          (ev = new_event(ps, p, WP_EV_DROPPED, NULL)) != NULL) {
        ev->n = (int64_t)(total - p->drops_logged[i]);
        ev->reason = reasons[i];
        ev->seconds = (double)p->drop_interval_ns / 1e9;
        p->drops_logged[i] = total;
      }
    }
    p->next_drop_log = now + p->drop_interval_ns;
  }
  return earlier(next, p->next_drop_log);
}

static void dog_main(void *arg) {
  wp_pool *p = arg;
  pass ps;
  uint64_t now, next;
  int i;
  uv_mutex_lock(&p->mu);
  while (!p->dog_exit) {
    ps.n = ps.nstuck = 0;
    now = uv_hrtime();
    next = look_locked(p, &ps, now);
    if (ps.n) {
      uv_mutex_unlock(&p->mu);
      for (i = 0; i < ps.nstuck; i++) {
        if (wp__future_fail(ps.stuck[i], WP_TIMEOUT, "timeout"))
          wp__pool_count_end(p, 0, WP_TIMEOUT, -1);
        wp_future_release(ps.stuck[i]);
      }
      for (i = 0; i < ps.n; i++)
        wp__emit(&ps.ev[i]);
      uv_mutex_lock(&p->mu);
      continue; /* look again: time passed */
    }
    now = uv_hrtime();
    if (next > now) uv_cond_timedwait(&p->dog_cv, &p->mu, next - now);
  }
  /* Last words: the drops since the last summary. */
  ps.n = ps.nstuck = 0;
  p->next_drop_log = 0;
  look_locked(p, &ps, uv_hrtime());
  uv_mutex_unlock(&p->mu);
  for (i = 0; i < ps.n; i++)
    if (ps.ev[i].type == WP_EV_DROPPED) wp__emit(&ps.ev[i]);
}

int wp__watchdog_start(wp_pool *p) {
  if (uv_thread_create(&p->dog, dog_main, p) != 0) return WP_ESYS;
  p->dog_started = 1;
  return 0;
}

void wp__watchdog_stop(wp_pool *p) {
  if (!p->dog_started) return;
  uv_mutex_lock(&p->mu);
  p->dog_exit = 1;
  uv_cond_signal(&p->dog_cv);
  uv_mutex_unlock(&p->mu);
  uv_thread_join(&p->dog);
  p->dog_started = 0;
}

void wp__watchdog_poke(wp_pool *p) {
  uv_cond_signal(&p->dog_cv);
}
