/*
 * pool.c: the pool itself: its FIFO queue (optionally bounded), its worker
 * threads and their life cycle (lazy start, reuse, one-at-a-time reaping,
 * resizing, stuck workers left behind), pause and resume, stop and
 * stop_wait, and the process-wide registry of pools by name.
 *
 * One mutex (pool->mu) guards the queue and every counter.  Workers wait on
 * work_cv for tasks; threads in pause, stop and join wait on state_cv.  A
 * worker takes a task under the lock and runs it with the lock released.
 * A submit skips the lock while every worker is busy or already woken: its
 * future goes onto the inbox, which the next holder of the lock moves into
 * the queue (see "the inbox" below).
 * A pool moves RUNNING -> DRAINING (stop_wait) -> STOPPING (stop) ->
 * STOPPED and never back; exactly one stopping thread (the joiner) joins
 * the worker threads while any other waits for STOPPED.  Submission
 * (encoding values) lives in submit.c, deadlines in watchdog.c, metrics and
 * events in stats.c.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pthread.h>
#include <sched.h>

#include "options.h"
#include "wp_internal.h"

static void pool_free(wp_pool *p);

static atomic_int nstopped; /* pools that began stopping */

int wp_pools_stopped(void) {
  return atomic_load(&nstopped);
}

static int from_own_worker(wp_pool *p) {
  wp__worker *w = wp__current_worker();
  return w != NULL && w->pool == p;
}

/* ---- registry -------------------------------------------------------- */

static struct {
  uv_once_t once;
  uv_mutex_t mu;
  wp_pool *head;
  unsigned long counter; /* for generated names */
} reg = {UV_ONCE_INIT};

static void reg_init(void) {
  if (uv_mutex_init(&reg.mu)) abort(); /* cannot fail on Linux */
}

static wp_pool *reg_lookup(const char *name) {
  wp_pool *p;
  for (p = reg.head; p; p = p->reg_next)
    if (strcmp(p->name, name) == 0) return p;
  return NULL;
}

/* Names p before its init runs: a copy of name, which must be free
 * (WP_EEXISTS), or a generated "pool-N".  p is not findable yet.
 * WP_EEXISTS, WP_ENOMEM. */
static int reg_name(wp_pool *p, const char *name) {
  char gen[32];
  int r = 0;
  uv_once(&reg.once, reg_init);
  uv_mutex_lock(&reg.mu);
  if (name == NULL) {
    do
      snprintf(gen, sizeof gen, "pool-%lu", ++reg.counter);
    while (reg_lookup(gen));
    name = gen;
  } else if (reg_lookup(name)) {
    r = WP_EEXISTS;
  }
  if (!r && (p->name = strdup(name)) == NULL) r = WP_ENOMEM;
  uv_mutex_unlock(&reg.mu);
  return r;
}

/* Makes p findable under its name once it is fully built, so that no
 * reference to a pool whose creation fails can exist.  A generated name
 * taken meanwhile is generated again.  WP_EEXISTS, WP_ENOMEM. */
static int reg_add(wp_pool *p, int generated) {
  char gen[32], *name;
  int r = 0;
  uv_mutex_lock(&reg.mu);
  while (reg_lookup(p->name)) {
    if (!generated) {
      r = WP_EEXISTS;
      break;
    }
    snprintf(gen, sizeof gen, "pool-%lu", ++reg.counter);
    if ((name = strdup(gen)) == NULL) {
      r = WP_ENOMEM;
      break;
    }
    free(p->name);
    p->name = name;
  }
  if (!r) {
    p->reg_next = reg.head;
    reg.head = p;
    p->registered = 1;
  }
  uv_mutex_unlock(&reg.mu);
  return r;
}

static void reg_remove(wp_pool *p) {
  wp_pool **pp;
  uv_once(&reg.once, reg_init);
  uv_mutex_lock(&reg.mu);
  if (p->registered) {
    for (pp = &reg.head; *pp != p; pp = &(*pp)->reg_next)
      ;
    *pp = p->reg_next;
    p->registered = 0;
  }
  uv_mutex_unlock(&reg.mu);
}

void wp__pools_atfork(int phase) {
  wp_pool *p;
  if (phase == WP__FORK_CHILD) { /* the parent's pools: dead here */
    for (p = reg.head; p; p = p->reg_next)
      p->registered = 0;
    reg.head = NULL;
  }
  wp__atfork_lock(phase, &reg.once, reg_init, &reg.mu);
}

wp_pool *wp_pool_find(const char *name) {
  wp_pool *p;
  int n;
  if (name == NULL) return NULL;
  uv_once(&reg.once, reg_init);
  uv_mutex_lock(&reg.mu);
  p = reg_lookup(name);
  if (p && !atomic_load(&p->stopped)) {
    /* Take a handle only while another still exists: never resurrect. */
    n = atomic_load(&p->refs);
    while (n > 0 && !atomic_compare_exchange_weak(&p->refs, &n, n + 1))
      ;
    if (n == 0) p = NULL;
  } else {
    p = NULL;
  }
  uv_mutex_unlock(&reg.mu);
  return p;
}

/* ---- memory ---------------------------------------------------------- */

void wp__pool_mretain(wp_pool *p) {
  atomic_fetch_add(&p->mrefs, 1);
}

void wp__pool_mrelease(wp_pool *p) {
  int n = atomic_fetch_sub(&p->mrefs, 1);
  assert(n > 0);
  /* A pool of the parent process is left as it is: its locks may be held
   * by threads that are not here. */
  if (n == 1 && !wp__pool_forked(p)) pool_free(p);
}

void wp_pool_retain(wp_pool *p) {
  atomic_fetch_add(&p->refs, 1);
}

void wp_pool_release(wp_pool *p) {
  if (p == NULL || atomic_fetch_sub(&p->refs, 1) != 1 || wp__pool_forked(p))
    return;
  if (wp_pool_stop_wait(p) == WP_EDEADLOCK) {
    /* Misuse: the last handle dropped by the pool's own worker.  Stopping
     * would join this very thread, so leave the pool running (leaked)
     * rather than hang. */
    return;
  }
  wp__pool_mrelease(p);
}

const wp__pool_init *wp__pool_init_of(wp_pool *p) {
  return &p->in;
}

const char *wp_pool_name(const wp_pool *p) {
  return p->name;
}

/* ---- the queue ------------------------------------------------------- */

/* The FIFO of queued futures (qhead, qtail, linked by prev/next) and the
 * four things that follow its links: nqueued, queued_any for spinning
 * workers, queued_bytes, and each future's queued flag.  Only these helpers
 * link or unlink a future, so the counters move with the links.  All need mu.
 */

/* Appends f at the tail. */
static inline void q_push_locked(wp_pool *p, wp_future *f) {
  assert(!f->queued && f->next == NULL && f->prev == NULL);
  f->prev = p->qtail;
  if (p->qtail) {
    p->qtail->next = f;
  } else {
    p->qhead = f;
    atomic_store_explicit(&p->queued_any, 1, memory_order_relaxed);
  }
  p->qtail = f;
  f->queued = 1;
  p->nqueued++;
  if (p->nqueued > p->nqueued_peak) p->nqueued_peak = p->nqueued;
  p->queued_bytes += f->msg_len;
}

/* Unlinks the queued future f, wherever it is. */
static inline void q_remove_locked(wp_pool *p, wp_future *f) {
  assert(f->queued && p->nqueued > 0 && p->queued_bytes >= f->msg_len);
  if (f->prev)
    f->prev->next = f->next;
  else
    p->qhead = f->next;
  if (f->next)
    f->next->prev = f->prev;
  else
    p->qtail = f->prev;
  f->next = f->prev = NULL;
  f->queued = 0;
  p->nqueued--;
  p->queued_bytes -= f->msg_len;
  if (p->qhead == NULL)
    atomic_store_explicit(&p->queued_any, 0, memory_order_relaxed);
}

/* Empties the queue; returns its futures in order, still linked by next
 * (no longer marked queued). */
static inline wp_future *q_take_all_locked(wp_pool *p) {
  wp_future *head = p->qhead, *f;
  for (f = head; f; f = f->next)
    f->queued = 0;
  atomic_store_explicit(&p->queued_any, 0, memory_order_relaxed);
  p->qhead = p->qtail = NULL;
  p->nqueued = 0;
  p->queued_bytes = 0;
  return head;
}

/* ---- the inbox ------------------------------------------------------- */

/* A submit skips mu while takers_ready says that every task queued now
 * would be taken without a wake-up or a new worker: it pushes its future
 * onto the inbox (a lock-free stack), and whoever takes mu next moves the
 * inbox into the queue in submission order, numbering the futures then
 * (so pause's "tasks after this one" is decided where it always was,
 * under mu).  A worker about to sleep publishes that it does (takers_ready
 * 0) before it looks at the inbox again, and a submitter reads
 * takers_ready after its push: one of them sees the other, so no future
 * is left in the inbox while every worker sleeps. */

/* Moves the inbox into the queue, oldest first.  Needs mu. */
static void inbox_move_locked(wp_pool *p) {
  wp_future *list, *rev = NULL, *next;
  if (atomic_load_explicit(&p->inbox, memory_order_relaxed) == NULL) return;
  list = atomic_exchange_explicit(&p->inbox, NULL, memory_order_acq_rel);
  for (; list; list = next) {
    next = list->next;
    list->next = rev;
    rev = list;
  }
  for (; rev; rev = next) {
    next = rev->next;
    rev->next = NULL;
    rev->seq = ++p->next_seq;
    if (rev->t_submit > p->last_active) p->last_active = rev->t_submit;
    q_push_locked(p, rev);
  }
}

/* The inbox into the queue, unless the pool is stopping: what was pushed
 * once begin_stop had moved the inbox belongs to submitters that saw
 * `stopped` after their push, and each takes its own back
 * (inbox_remove_locked).  Needs mu. */
static void inbox_drain_locked(wp_pool *p) {
  if (p->state < WP__STOPPING) inbox_move_locked(p);
}

/* Takes f out of the inbox; 1 when it was there.  The others stay.
 * Needs mu. */
static int inbox_remove_locked(wp_pool *p, wp_future *f) {
  wp_future *list, *rest = NULL, *tail = NULL, *next, *head;
  int found = 0;
  list = atomic_exchange_explicit(&p->inbox, NULL, memory_order_acq_rel);
  for (; list; list = next) {
    next = list->next;
    list->next = NULL;
    if (list == f) {
      found = 1;
    } else {
      if (tail)
        tail->next = list;
      else
        rest = list;
      tail = list;
    }
  }
  if (rest) {
    head = atomic_load_explicit(&p->inbox, memory_order_relaxed);
    do {
      tail->next = head;
    } while (!atomic_compare_exchange_weak_explicit(
        &p->inbox, &head, rest, memory_order_seq_cst, memory_order_relaxed));
  }
  return found;
}

/* Publishes whether a submit may skip mu: the pool runs, is not paused,
 * has an unbounded queue and all its workers, and each of them is running
 * a task, spinning, sleeping light, or already woken, so that however many
 * tasks come there is nobody to wake or start (a spinning worker alone would
 * not do: it takes one task).  Needs mu. */
static void publish_locked(wp_pool *p) {
  int ready = p->state == WP__RUNNING && !p->paused && p->queue_cap == 0 &&
              p->nworkers >= p->max_workers && p->nworkers > 0 &&
              p->nidle == p->nwaking &&
              p->nrunning + p->nspinning + p->nidle + p->nlight >= p->nworkers;
  if (atomic_load_explicit(&p->takers_ready, memory_order_relaxed) != ready)
    atomic_store_explicit(&p->takers_ready, ready, memory_order_seq_cst);
}

/* [Needs mu] Publishes that this worker no longer takes tasks unasked
 * (it is about to sleep, or it leaves), then looks at the inbox once
 * more: 1 when something waits there. */
static int inbox_recheck_locked(wp_pool *p) {
  publish_locked(p);
  return atomic_load_explicit(&p->inbox, memory_order_seq_cst) != NULL;
}

void wp__pool_lock(wp_pool *p) {
  uv_mutex_lock(&p->mu);
  inbox_drain_locked(p);
}

void wp__pool_unlock(wp_pool *p) {
  publish_locked(p);
  uv_mutex_unlock(&p->mu);
}

void wp__pool_wait(wp_pool *p, uv_cond_t *cv) {
  publish_locked(p);
  uv_cond_wait(cv, &p->mu);
  inbox_drain_locked(p);
}

int wp__pool_timedwait(wp_pool *p, uv_cond_t *cv, uint64_t ns) {
  int r;
  publish_locked(p);
  r = uv_cond_timedwait(cv, &p->mu, ns);
  inbox_drain_locked(p);
  return r;
}

#ifndef NDEBUG
/* The queue is walked in full only while short: checking at every
 * mutation must not make a long queue quadratic. */
#define CHECK_WALK_MAX 64

void wp__pool_check_locked(const wp_pool *p) {
  const wp_future *f;
  const wp__worker *w;
  size_t n = 0, bytes = 0;
  int counted = 0, nw = 0;
  assert((p->qhead == NULL) == (p->qtail == NULL));
  assert((p->qhead == NULL) == (p->nqueued == 0));
  assert(p->nqueued > 0 || p->queued_bytes == 0);
  assert(atomic_load_explicit(&p->queued_any, memory_order_relaxed) ==
         (p->qhead != NULL));
  assert(p->nqueued <= p->nqueued_peak);
  assert(p->queue_cap == 0 || p->nqueued <= p->queue_cap);
  assert(p->state < WP__STOPPING || p->nqueued == 0);
  assert(p->qhead == NULL || (p->qhead->prev == NULL && p->qhead->queued));
  assert(p->qtail == NULL || (p->qtail->next == NULL && p->qtail->queued));
  if (p->nqueued <= CHECK_WALK_MAX) {
    for (f = p->qhead; f; f = f->next) {
      assert(f->queued && f->pool == p);
      assert(f->next == NULL || (f->next->prev == f && f->next->seq > f->seq));
      n++;
      bytes += f->msg_len;
    }
    assert(n == p->nqueued && bytes == p->queued_bytes);
  }
  for (w = p->workers; w && nw <= 4 * CHECK_WALK_MAX; w = w->next, nw++)
    counted += w->counted;
  assert(w != NULL || counted == p->nworkers);
  assert(p->nworkers >= 0 && p->nrunning >= 0 && p->nstuck >= 0);
  assert(p->nidle >= 0 && p->nwaking >= 0 && p->nwaking <= p->nidle);
  assert(p->nspinning == 0 || p->nspinning == 1);
  assert(p->nlight == 0 || p->nlight == 1);
  assert(p->nclosed >= 0 && p->nwaiters >= 0 && p->nspace_waiters >= 0);
  assert(p->nidle + p->nspinning + p->nlight + p->nrunning <=
         p->nworkers + p->nstuck);
  assert(p->state >= WP__RUNNING && p->state <= WP__STOPPED);
  assert(p->min_workers <= p->max_workers);
}
#endif

/* ---- workers --------------------------------------------------------- */

/* Takes the next runnable task for w and marks it running.  Needs mu. */
static wp_future *take_locked(wp_pool *p, wp__worker *w, uint64_t now) {
  wp_future *f;
  inbox_drain_locked(p);
  f = p->qhead;
  if (f == NULL || (p->paused && f->seq > p->pause_seq)) return NULL;
  assert(w->cur == NULL && f->worker == NULL);
  q_remove_locked(p, f);
  if (p->nspace_waiters) uv_cond_signal(&p->space_cv);
  f->t_start = now; /* run_locked records the dwell, outside the lock */
  f->worker = w;
  w->cur = f;
  w->started = now;
  w->slow_reported = 0;
  if (f->timeout_ns > 0)
    w->deadline = now + (uint64_t)f->timeout_ns;
  else if (f->timeout_ns == 0 && p->task_timeout_ns > 0)
    w->deadline = now + (uint64_t)p->task_timeout_ns;
  else
    w->deadline = 0;
  atomic_store_explicit(&w->run_seq, ++p->task_counter, memory_order_release);
  if (w->deadline || p->slow_ns) wp__watchdog_poke(p);
  wp__pool_check_locked(p);
  return f;
}

/* The light sleep.  While tasks are short (their average run under
 * LIGHT_TASK_NS), a worker that goes idle while another runs or spins one
 * would, asleep, be woken by nearly every submit of a busy submitter: a
 * futex call and two context switches for each task it takes, paid by
 * the thread that is the bottleneck, and worth more than the task.  So
 * one such worker at a time sleeps on light_cv, which submits never
 * signal, for LIGHT_MIN_NS, then twice as long each time it finds
 * nothing, and looks at the queue each time it wakes; past LIGHT_MAX_NS
 * it sleeps for real (work_cv).  Submits count it as a taker: a task
 * queued meanwhile starts when a running worker is done or this one
 * wakes, at most LIGHT_MAX_NS later, even behind a task that hangs.
 * *light_ns is this worker's next light sleep, reset when it takes a
 * task. */
#define LIGHT_TASK_NS 50000ull
#define LIGHT_MIN_NS 100000ull
#define LIGHT_MAX_NS 1600000ull

static int light_sleep_locked(wp_pool *p, uint64_t *light_ns) {
  if (*light_ns > LIGHT_MAX_NS || p->nlight || p->state != WP__RUNNING ||
      p->paused || p->nrunning + p->nspinning == 0 ||
      p->task_ns_avg >= LIGHT_TASK_NS)
    return 0;
  p->nlight = 1;
  wp__pool_timedwait(p, &p->light_cv, *light_ns);
  p->nlight = 0;
  *light_ns *= 2;
  return 1;
}

/* Waits for work.  Returns 1 when this worker is the one to reap now.
 * Needs mu. */
static int wait_locked(wp_pool *p, uint64_t *light_ns) {
  uint64_t now, base, deadline;
  if (light_sleep_locked(p, light_ns)) return 0;
  /* A worker that cannot be reaped sleeps until it is woken. */
  if (p->idle_ns < 0 || p->state != WP__RUNNING ||
      p->nworkers <= p->min_workers) {
    p->nidle++;
    if (!inbox_recheck_locked(p)) {
      wp__pool_wait(p, &p->work_cv);
      if (p->nwaking) p->nwaking--;
    }
    p->nidle--;
    return 0;
  }
  now = uv_hrtime();
  base = p->last_active > p->last_reap ? p->last_active : p->last_reap;
  deadline = base + (uint64_t)p->idle_ns;
  if (now >= deadline) {
    p->last_reap = now;
    return 1;
  }
  p->nidle++;
  if (!inbox_recheck_locked(p)) {
    wp__pool_timedwait(p, &p->work_cv, deadline - now);
    if (p->nwaking) p->nwaking--;
  }
  p->nidle--;
  return 0;
}

static int spawn_locked(wp_pool *p);

/* Runs f in w (lock released), then records how it ended.  Returns 1 when
 * the worker must exit afterwards. */
static int run_locked(wp_pool *p, wp__worker *w, wp_future *f, char *err,
                      size_t errlen, uint64_t *now) {
  int stuck;
  wp_status st;
  uint64_t started = w->started, end;
  p->nrunning++;
  p->last_active = started;
  wp__pool_unlock(p);
  wp__pool_count_dwell(p, w, started - f->t_submit);
  /* A state that could not be made (or was closed) is made now: a
   * failure ends only this task, and the next one tries again. */
  if (w->L == NULL && wp__worker_open(w, err, errlen)) {
    char msg[2100];
    snprintf(msg, sizeof msg, "worker init failed: %s", err);
    st = wp__future_fail(f, WP_ERROR, msg) ? wp_future_status(f) : WP_PENDING;
  } else {
    st = wp__worker_run(w, f);
  }
  /* f->t_end is this worker's to read when it ended the task itself. */
  end = st != WP_PENDING ? f->t_end : uv_hrtime();
  if (st != WP_PENDING)
    wp__pool_count_end(p, w, st, (double)(end - started) / 1e9);
  if (f->msg_owned) { /* only this worker ever reads it */
    free(f->msg);
    f->msg = NULL;
    f->msg_len = 0;
    f->msg_owned = 0;
  }
  *now = end; /* the start of the next task taken at once */
  wp__pool_lock(p);
  stuck = w->stuck;
  w->cur = NULL;
  w->tasks_done++;
  f->worker = NULL; /* w may be freed once it exits: cancel must not see it */
  /* The queue's reference goes only now: the watchdog reads w->cur under
   * mu (its name, or a reference to resolve it as stuck). */
  wp_future_release(f);
  w->deadline = 0;
  atomic_store_explicit(&w->run_seq, 0, memory_order_release);
  if (stuck) {
    p->nstuck--;
  } else {
    p->nrunning--;
    p->task_ns_avg = p->task_ns_avg - p->task_ns_avg / 8 + (end - started) / 8;
  }
  p->last_active = end;
  if (p->nwaiters) uv_cond_broadcast(&p->state_cv);
  wp__pool_check_locked(p);
  return stuck || p->nworkers > p->max_workers;
}

static int work_queued(void *arg) {
  wp_pool *p = arg;
  return atomic_load_explicit(&p->queued_any, memory_order_relaxed) ||
         atomic_load_explicit(&p->inbox, memory_order_relaxed) != NULL ||
         atomic_load_explicit(&p->stopped, memory_order_relaxed);
}

static void worker_main(void *arg) {
  wp__worker *w = arg;
  wp_pool *p = w->pool;
  char err[2048];
  wp_future *f;
  uint64_t now;
  uint64_t light_ns = LIGHT_MIN_NS;
  int leave = 0, detached, spun = 0, was_stuck;
  wp__worker_bind(w);
  /* A worker is warm from its start (min_workers rely on it).  Should
   * that fail, its first task tries again (run_locked). */
  if (w->L == NULL) wp__worker_open(w, err, sizeof err);
  /* The clock is read before the lock is taken, to hold it less: a task
   * taken right after another starts when that one ended. */
  now = uv_hrtime();
  wp__pool_lock(p);
  while (!leave) {
    if ((f = take_locked(p, w, now)) == NULL) {
      if (p->state >= WP__STOPPING || (p->state == WP__DRAINING && !p->qhead) ||
          p->nworkers > p->max_workers)
        break;
      /* Before it sleeps, once per idle spell and one worker at a time, a
       * worker spins while a CPU is left over (the tasks running now and
       * one thread submitting each have one), or else yields its CPU once:
       * the thread submitting may be waiting for it.  A task queued
       * meanwhile is then taken without a wake-up. */
      if (!spun && !p->paused && p->state == WP__RUNNING && p->nspinning == 0) {
        int spare_cpu = p->nrunning + 2 <= wp__ncpus();
        spun = 1;
        p->nspinning++;
        wp__pool_unlock(p);
        if (spare_cpu)
          wp__spin(work_queued, p);
        else
          sched_yield();
        now = uv_hrtime();
        wp__pool_lock(p);
        p->nspinning--;
        continue;
      }
      if (wait_locked(p, &light_ns)) break;
      now = uv_hrtime(); /* woken: rare enough to read it here */
      continue;
    }
    spun = 0;
    light_ns = LIGHT_MIN_NS;
    leave = run_locked(p, w, f, err, sizeof err, &now);
  }
  wp__worker_uncount_locked(p, w);
  was_stuck = w->stuck;
  /* A worker that left (stuck, or after a shrink) leaves the queue to
   * others. */
  if (p->state < WP__STOPPING && !p->paused && p->qhead) wp__grow_locked(p);
  if (w->L) { /* the watchdog bounds the close from now */
    atomic_store(&w->closing, uv_hrtime());
    wp__watchdog_poke(p);
  }
  wp__pool_check_locked(p);
  wp__pool_unlock(p);
  wp__worker_close(w);
  wp__buf_free(&w->out);
  wp__pool_lock(p);
  if (w->stuck && !was_stuck) p->nstuck--; /* abandoned while closing */
  w->closed = 1;
  wp__stripe_give_locked(p, w); /* it counts no more */
  detached = w->detached;
  if (!detached) p->nclosed++;
  if (p->nwaiters) uv_cond_broadcast(&p->state_cv);
  wp__pool_check_locked(p);
  wp__pool_unlock(p);
  if (detached) { /* nobody joins a stuck worker left behind by stop */
    free(w);
    wp__pool_mrelease(p);
  }
}

/* Starts one worker thread.  Needs mu.  WP_ENOMEM, WP_ESYS. */
static int spawn_locked(wp_pool *p) {
  wp__worker *w = p->spare;
  if (w) {
    p->spare = NULL;
  } else {
    if ((w = calloc(1, sizeof *w)) == NULL) return WP_ENOMEM;
    w->pool = p;
    w->id = ++p->next_id;
    w->mem_limit = p->in.memory_limit;
  }
  wp__stripe_take_locked(p, w); /* before its thread can count */
  if (uv_thread_create(&w->tid, worker_main, w) != 0) {
    wp__stripe_give_locked(p, w);
    if (w->L)
      p->spare = w;
    else
      free(w);
    return WP_ESYS;
  }
  w->started_thread = 1;
  w->next = p->workers;
  p->workers = w;
  w->counted = 1;
  p->nworkers++;
  return 0;
}

void wp__worker_uncount_locked(wp_pool *p, wp__worker *w) {
  if (!w->counted) return;
  w->counted = 0;
  assert(p->nworkers > 0);
  p->nworkers--;
  /* One taker fewer: say so, then take in what was pushed meanwhile, so
   * that whoever grows the pool next sees it. */
  if (inbox_recheck_locked(p)) inbox_drain_locked(p);
}

/* Takes the queued tasks that could run now out of the queue, for the
 * watchdog to fail with err: no worker is left to run them and none could
 * be started.  Needs mu. */
static void strand_locked(wp_pool *p, int err) {
  wp_future *f, **tail = &p->stranded;
  while (*tail)
    tail = &(*tail)->next;
  while ((f = p->qhead) != NULL && (!p->paused || f->seq <= p->pause_seq)) {
    q_remove_locked(p, f); /* cancel now says 0: the watchdog ends it */
    *tail = f;
    tail = &f->next;
  }
  p->strand_err = err;
  wp__watchdog_poke(p);
  if (p->nwaiters) uv_cond_broadcast(&p->state_cv);
  if (p->nspace_waiters) uv_cond_broadcast(&p->space_cv);
  wp__pool_check_locked(p);
}

void wp__grow_locked(wp_pool *p) {
  int r = 0;
  while (p->nqueued > (size_t)(p->nidle + p->nspinning + p->nlight) &&
         p->nworkers < p->max_workers && (r = spawn_locked(p)) == 0)
    ;
  if (r && p->nworkers == 0) strand_locked(p, r);
}

/* Unlinks exited workers into *out for joining outside the lock. */
static wp__worker *take_closed_locked(wp_pool *p) {
  wp__worker **pp = &p->workers, *out = NULL;
  while (*pp && p->nclosed) {
    wp__worker *w = *pp;
    if (w->closed) {
      *pp = w->next;
      w->next = out;
      out = w;
      p->nclosed--;
    } else {
      pp = &w->next;
    }
  }
  return out;
}

static void join_all(wp__worker *w) {
  while (w) {
    wp__worker *next = w->next;
    uv_thread_join(&w->tid);
    free(w);
    w = next;
  }
}

/* ---- creation -------------------------------------------------------- */

static char *dup_or_null(const char *s, int *failed) {
  char *d;
  if (s == NULL) return NULL;
  if ((d = strdup(s)) == NULL) *failed = 1;
  return d;
}

/* Seconds to nanoseconds, for a duration already checked to be finite.
 * A positive duration is at least WP_MIN_DURATION: never 0, which means
 * "off" for most options. */
static int64_t to_ns(double s) {
  if (s <= 0) return 0;
  if (s < WP_MIN_DURATION) s = WP_MIN_DURATION;
  if (s > 1e9) s = 1e9;
  return (int64_t)(s * 1e9);
}

/* The queue lock is held for a few dozen instructions at a time by a
 * submitter and the workers: where the platform has them, an adaptive
 * mutex spins briefly on contention instead of sleeping in the kernel at
 * once.  0 or nonzero. */
static int mutex_init_adaptive(uv_mutex_t *mu) {
#if defined(PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP)
  pthread_mutexattr_t attr;
  int r;
  if (pthread_mutexattr_init(&attr)) return -1;
  r = pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ADAPTIVE_NP) ||
      pthread_mutex_init(mu, &attr);
  pthread_mutexattr_destroy(&attr);
  return r;
#else
  return uv_mutex_init(mu);
#endif
}

/* Initialises the pool's locks; all or nothing.  WP_ENOMEM. */
static int init_sync(wp_pool *p) {
  if (mutex_init_adaptive(&p->mu)) return WP_ENOMEM;
  if (uv_cond_init(&p->work_cv)) goto e1;
  if (uv_cond_init(&p->light_cv)) goto e7;
  if (uv_cond_init(&p->state_cv)) goto e2;
  if (uv_cond_init(&p->space_cv)) goto e3;
  if (uv_cond_init(&p->dog_cv)) goto e4;
  if (uv_mutex_init(&p->done_mu)) goto e5;
  if (uv_cond_init(&p->done_cv)) goto e6;
  return 0;
e6:
  uv_mutex_destroy(&p->done_mu);
e5:
  uv_cond_destroy(&p->dog_cv);
e4:
  uv_cond_destroy(&p->space_cv);
e3:
  uv_cond_destroy(&p->state_cv);
e2:
  uv_cond_destroy(&p->light_cv);
e7:
  uv_cond_destroy(&p->work_cv);
e1:
  uv_mutex_destroy(&p->mu);
  return WP_ENOMEM;
}

static void free_fields(wp_pool *p) {
  free(p->in.init);
  free(p->in.init_name);
  free(p->in.path);
  free(p->in.cpath);
  free(p->name);
  free(p);
}

static void pool_free(wp_pool *p) {
  /* Every worker joined or detached, every future released. */
  assert(p->workers == NULL && p->qhead == NULL && p->stranded == NULL);
  assert(atomic_load(&p->inbox) == NULL);
  uv_cond_destroy(&p->done_cv);
  uv_mutex_destroy(&p->done_mu);
  uv_cond_destroy(&p->dog_cv);
  uv_cond_destroy(&p->space_cv);
  uv_cond_destroy(&p->state_cv);
  uv_cond_destroy(&p->light_cv);
  uv_cond_destroy(&p->work_cv);
  uv_mutex_destroy(&p->mu);
  free_fields(p);
}

int wp_pool_new(const wp_options *o, wp_pool **out, char *errbuf,
                size_t errlen) {
  wp_pool *p;
  wp_event ev;
  int r, failed = 0;
  *out = NULL;
  if (errlen) errbuf[0] = '\0';
  if ((r = wp__options_check(o, errbuf, errlen)) != 0) return r;
  wp__interrupt_signal_fix();
  wp__fork_watch();
  /* Aligned for its cache-line groups (see wp_internal.h). */
  if (posix_memalign((void **)&p, WP__CACHE_LINE, sizeof *p)) return WP_ENOMEM;
  memset(p, 0, sizeof *p);
  p->fork_gen = wp__fork_generation();
  atomic_init(&p->refs, 1);
  atomic_init(&p->mrefs, 1);
  p->max_workers = o->max_workers;
  p->min_workers = o->min_workers;
  p->idle_ns = o->idle_timeout < 0 ? -1 : to_ns(o->idle_timeout);
  p->last_active = uv_hrtime();
  p->queue_cap = o->queue_cap;
  p->block_when_full = o->block_when_full;
  p->submit_timeout_ns = o->submit_timeout < 0 ? -1 : to_ns(o->submit_timeout);
  p->task_timeout_ns = to_ns(o->task_timeout);
  p->stuck_grace_ns = to_ns(o->stuck_grace);
  p->slow_ns = to_ns(o->slow_task);
  p->drop_interval_ns = (uint64_t)to_ns(o->drop_log_interval);
  p->next_drop_log = p->last_active + p->drop_interval_ns;
  if (o->init) {
    if ((p->in.init = malloc(o->init_len ? o->init_len : 1)) == NULL)
      failed = 1;
    else
      memcpy(p->in.init, o->init, o->init_len);
    p->in.init_len = o->init_len;
  }
  p->in.init_name = dup_or_null(o->init_name ? o->init_name : "=init", &failed);
  p->in.path = dup_or_null(o->package_path, &failed);
  p->in.cpath = dup_or_null(o->package_cpath, &failed);
  p->in.open_state = o->open_state;
  p->in.open_ud = o->open_ud;
  p->in.memory_limit = o->memory_limit;
  p->in.max_tasks = o->max_tasks_per_worker;
  if (failed || init_sync(p)) {
    free_fields(p);
    return WP_ENOMEM;
  }
  if ((r = reg_name(p, o->name)) != 0) goto err;
  /* The first state is made here so that a broken init fails now.  The
   * pool is not findable meanwhile: init cannot reach its own pool. */
  if ((p->spare = calloc(1, sizeof *p->spare)) == NULL) {
    r = WP_ENOMEM;
    goto err;
  }
  p->spare->pool = p;
  p->spare->id = ++p->next_id;
  p->spare->mem_limit = o->memory_limit;
  if ((r = wp__worker_open(p->spare, errbuf, errlen)) != 0) goto err;
  if ((r = reg_add(p, o->name == NULL)) != 0 ||
      (r = wp__watchdog_start(p)) != 0) {
    wp__worker_close(p->spare);
    goto err;
  }
  wp__pool_lock(p);
  while (p->nworkers < p->min_workers && spawn_locked(p) == 0)
    ;
  wp__pool_unlock(p);
  memset(&ev, 0, sizeof ev);
  ev.type = WP_EV_POOL_CREATED;
  ev.pool = p->name;
  ev.n = p->max_workers;
  wp__emit(&ev);
  *out = p;
  return 0;
err:
  if (r == WP_EEXISTS && errlen)
    snprintf(errbuf, errlen, "a pool named '%s' already exists", o->name);
  reg_remove(p);
  free(p->spare);
  pool_free(p);
  return r;
}

/* ---- queueing -------------------------------------------------------- */

/* Waits for room in a full queue.  Needs mu; returns 0 or WP_EFULL. */
static int wait_room_locked(wp_pool *p) {
  uint64_t deadline = 0, now;
  if (!p->block_when_full) return WP_EFULL;
  if (p->submit_timeout_ns >= 0)
    deadline = uv_hrtime() + (uint64_t)p->submit_timeout_ns;
  p->nspace_waiters++;
  while (p->state == WP__RUNNING && p->nqueued >= p->queue_cap) {
    if (p->submit_timeout_ns < 0) {
      wp__pool_wait(p, &p->space_cv);
      continue;
    }
    now = uv_hrtime();
    if (now >= deadline) break;
    wp__pool_timedwait(p, &p->space_cv, deadline - now);
  }
  p->nspace_waiters--;
  return p->nqueued >= p->queue_cap && p->state == WP__RUNNING ? WP_EFULL : 0;
}

/* Pushes f onto the inbox while takers_ready says a worker will take it
 * unasked.  1: pushed, and still so after the push; 0: not pushed; -1:
 * pushed, but takers_ready or stopped changed meanwhile, so the caller
 * settles f under mu.  (The seq_cst push, then the seq_cst read of
 * takers_ready: see the inbox above.) */
static int inbox_push(wp_pool *p, wp_future *f) {
  wp_future *head;
  if (!atomic_load_explicit(&p->takers_ready, memory_order_relaxed) ||
      atomic_load_explicit(&p->stopped, memory_order_relaxed))
    return 0;
  head = atomic_load_explicit(&p->inbox, memory_order_relaxed);
  do {
    f->next = head;
  } while (!atomic_compare_exchange_weak_explicit(
      &p->inbox, &head, f, memory_order_seq_cst, memory_order_relaxed));
  if (atomic_load_explicit(&p->takers_ready, memory_order_seq_cst) &&
      !atomic_load_explicit(&p->stopped, memory_order_seq_cst))
    return 1;
  return -1;
}

int wp__pool_enqueue(wp_pool *p, wp_future *f, int nowait) {
  wp__worker *closed = NULL;
  int r = 0, wake = 0, pushed;
  f->t_submit = uv_hrtime(); /* read before the lock, to hold it less */
  if ((pushed = inbox_push(p, f)) == 1) {
    atomic_fetch_add_explicit(&p->c.submitted, 1, memory_order_relaxed);
    return 0;
  }
  wp__pool_lock(p); /* moves the inbox, f too when pushed, into the queue */
  if (pushed) {
    /* Refused when it is still ours to take back; else a worker took it
     * or a stop discarded it: the submit went through. */
    if (p->state >= WP__STOPPING) {
      if (inbox_remove_locked(p, f)) r = WP_ESTOPPED;
    } else if (f->queued && p->state != WP__RUNNING) {
      q_remove_locked(p, f);
      r = WP_ESTOPPED;
    }
  } else if (p->state == WP__RUNNING && p->queue_cap &&
             p->nqueued >= p->queue_cap) {
    r = nowait ? WP_EFULL : wait_room_locked(p);
  }
  if (!r && !pushed && p->state != WP__RUNNING) r = WP_ESTOPPED;
  if (r) {
    wp__pool_check_locked(p);
    wp__pool_unlock(p);
    if (r == WP_EFULL && !nowait && f->tenant)
      wp_pool_count_drop_tenant(p, WP_DROP_FULL, f->tenant);
    else if (r != WP_EFULL || !nowait)
      wp__count_drop(p, r == WP_EFULL ? WP__DROP_FULL : WP__DROP_STOPPED, 1);
    return r;
  }
  if (!pushed) {
    f->seq = ++p->next_seq;
    q_push_locked(p, f);
    p->last_active = f->t_submit;
  }
  if (!p->paused && f->queued) {
    if (p->nqueued > (size_t)(p->nidle + p->nspinning + p->nlight) &&
        p->nworkers < p->max_workers)
      r = spawn_locked(p);
    else if (p->nidle > p->nwaking &&
             p->nqueued > (size_t)(p->nspinning + p->nlight + p->nwaking))
      wake = ++p->nwaking; /* one wake-up per task no one is coming for */
    if (r && p->nworkers > 0) r = 0; /* a running worker will take it */
    if (r) q_remove_locked(p, f);    /* nobody could ever run it */
  }
  if (p->nclosed) closed = take_closed_locked(p);
  wp__pool_check_locked(p);
  wp__pool_unlock(p);
  if (wake) uv_cond_signal(&p->work_cv); /* it will not wait for our lock */
  join_all(closed);
  if (!r) atomic_fetch_add_explicit(&p->c.submitted, 1, memory_order_relaxed);
  return r;
}

int wp__pool_cancel(wp_pool *p, wp_future *f) {
  int r = 0;
  wp__pool_lock(p);
  if (f->queued) {
    q_remove_locked(p, f);
    if (p->nwaiters) uv_cond_broadcast(&p->state_cv);
    if (p->nspace_waiters) uv_cond_signal(&p->space_cv);
    r = 1;
  } else if (f->worker && f->worker->cur == f && !f->worker->stuck) {
    /* f->worker is cleared under mu before its worker can exit (see
     * run_locked), so it is alive here.  The mark is the decision: a
     * completion that began before it wins and the cancel says 0. */
    int st = WP_PENDING;
    if (atomic_compare_exchange_strong(&f->status, &st, WP__CANCELLING) ||
        st == WP__CANCELLING) {
      wp__worker_interrupt(f->worker, atomic_load(&f->worker->run_seq),
                           WP_CANCELLED);
      r = 2;
    }
  }
  wp__pool_check_locked(p);
  wp__pool_unlock(p);
  return r;
}

/* ---- pause, resize, stop --------------------------------------------- */

int wp_pool_pause(wp_pool *p) {
  if (wp__pool_forked(p)) return WP_EFORKED;
  if (from_own_worker(p)) return WP_EDEADLOCK;
  wp__pool_lock(p);
  if (p->state == WP__RUNNING && !p->paused) {
    p->paused = 1;
    p->pause_seq = p->next_seq;
  }
  p->nwaiters++;
  while (p->state == WP__RUNNING && p->paused &&
         ((p->qhead && p->qhead->seq <= p->pause_seq) || p->nrunning > 0))
    wp__pool_wait(p, &p->state_cv);
  p->nwaiters--;
  wp__pool_unlock(p);
  return 0;
}

void wp_pool_resume(wp_pool *p) {
  if (wp__pool_forked(p)) return;
  wp__pool_lock(p);
  if (p->paused) {
    p->paused = 0;
    if (p->state == WP__RUNNING) wp__grow_locked(p);
    uv_cond_broadcast(&p->work_cv);
    uv_cond_broadcast(&p->light_cv);
    if (p->nwaiters) uv_cond_broadcast(&p->state_cv);
  }
  wp__pool_unlock(p);
}

int wp_pool_blocks_when_full(const wp_pool *p, double *timeout) {
  if (timeout)
    *timeout =
        p->submit_timeout_ns < 0 ? -1 : (double)p->submit_timeout_ns / 1e9;
  return p->block_when_full;
}

int wp_pool_resize(wp_pool *p, int n) {
  wp_event ev;
  int old;
  if (wp__pool_forked(p)) return WP_EFORKED;
  wp__pool_lock(p);
  if (p->state != WP__RUNNING) {
    wp__pool_unlock(p);
    return WP_ESTOPPED;
  }
  if (n < 1 || n < p->min_workers) {
    wp__pool_unlock(p);
    return WP_EINVAL;
  }
  old = p->max_workers;
  p->max_workers = n;
  if (!p->paused) wp__grow_locked(p);
  uv_cond_broadcast(&p->work_cv); /* idle extras notice and leave */
  uv_cond_broadcast(&p->light_cv);
  wp__pool_check_locked(p);
  wp__pool_unlock(p);
  memset(&ev, 0, sizeof ev);
  ev.type = WP_EV_POOL_RESIZED;
  ev.pool = p->name;
  ev.n = n;
  ev.n2 = old;
  wp__emit(&ev);
  return 0;
}

/* The non-blocking half of stopping: moves the state forward, discards the
 * queue when not draining, wakes everyone.  Returns the number discarded. */
static int begin_stop(wp_pool *p, int drain) {
  wp_future *discard = NULL, *f;
  wp_event ev;
  int ndiscarded = 0, unregister = 0, draining = 0;
  memset(&ev, 0, sizeof ev);
  wp__pool_lock(p);
  if (p->state == WP__RUNNING) {
    p->state = drain ? WP__DRAINING : WP__STOPPING;
    atomic_store(&p->stopped, 1);
    /* What was pushed before stopped was set is the queue's: run when
     * draining, discarded below otherwise. */
    inbox_move_locked(p);
    atomic_fetch_add(&nstopped, 1);
    unregister = 1;
    draining = drain;
    ev.n = (int64_t)p->nqueued;
    ev.n2 = p->nrunning;
  } else if (!drain && p->state == WP__DRAINING) {
    p->state = WP__STOPPING;
  }
  p->paused = 0;
  if (p->state == WP__STOPPING && p->qhead) {
    ndiscarded = (int)p->nqueued;
    discard = q_take_all_locked(p);
  }
  if (p->state == WP__DRAINING) wp__grow_locked(p);
  uv_cond_broadcast(&p->work_cv);
  uv_cond_broadcast(&p->light_cv);
  uv_cond_broadcast(&p->space_cv);
  if (p->nwaiters) uv_cond_broadcast(&p->state_cv);
  wp__pool_check_locked(p);
  wp__pool_unlock(p);

  if (unregister) reg_remove(p);
  if (draining) {
    ev.type = WP_EV_POOL_DRAINING;
    ev.pool = p->name;
    wp__emit(&ev);
  }
  while ((f = discard) != NULL) {
    discard = f->next;
    f->next = f->prev = NULL;
    if (wp__future_fail(f, WP_DISCARDED, "discarded"))
      wp__count_drop(p, WP__DROP_DISCARDED, 1);
    wp_future_release(f);
  }
  return ndiscarded;
}

/* Unlinks the workers that stop must no longer wait for: those exited
 * (into *join, to join outside the lock) and those abandoned as stuck,
 * in a task or in closing their state, which are detached and free
 * themselves if they ever return.  Needs mu. */
static void unlink_done_locked(wp_pool *p, wp__worker **join) {
  wp__worker **pp = &p->workers, *w;
  while ((w = *pp) != NULL) {
    if (w->closed) {
      *pp = w->next;
      w->next = *join;
      *join = w;
      p->nclosed--;
    } else if (w->stuck && (w->cur != NULL || w->close_stuck)) {
      *pp = w->next;
      w->detached = 1;
      wp__pool_mretain(p); /* released by the worker itself */
      pthread_detach(w->tid);
    } else {
      pp = &w->next;
    }
  }
}

/* The blocking half: joins every worker, or waits for the thread that
 * does.  Workers stay in p->workers until they have exited, so the
 * watchdog keeps enforcing deadlines, stuck detection and the bound on
 * closing a state for the whole drain. */
static void finish_stop(wp_pool *p, int ndiscarded) {
  wp__worker *join, *spare = NULL;
  wp_event ev;
  int drained;
  wp__pool_lock(p);
  if (p->joiner) {
    p->nwaiters++;
    while (p->state != WP__STOPPED)
      wp__pool_wait(p, &p->state_cv);
    p->nwaiters--;
    wp__pool_unlock(p);
    return;
  }
  p->joiner = 1;
  drained = p->state == WP__DRAINING;
  /* The state made by new, never adopted: a worker thread closes it, so
   * that closing it is bounded like any other. */
  if (p->spare && spawn_locked(p) != 0) {
    spare = p->spare;
    p->spare = NULL;
  }
  for (;;) {
    join = NULL;
    unlink_done_locked(p, &join);
    if (join) {
      wp__pool_unlock(p);
      join_all(join);
      wp__pool_lock(p);
    } else if (p->workers) {
      p->nwaiters++;
      wp__pool_wait(p, &p->state_cv);
      p->nwaiters--;
    } else {
      break;
    }
  }
  drained = drained && p->state == WP__DRAINING;
  wp__pool_unlock(p);
  wp__watchdog_stop(p);
  if (spare) {
    wp__worker_close(spare);
    free(spare);
  }
  memset(&ev, 0, sizeof ev);
  ev.pool = p->name;
  if (drained) {
    ev.type = WP_EV_POOL_DRAINED;
    wp__emit(&ev);
  }
  ev.type = WP_EV_POOL_STOPPED;
  ev.n = ndiscarded;
  wp__emit(&ev);
  wp__pool_lock(p);
  p->state = WP__STOPPED;
  if (p->nwaiters) uv_cond_broadcast(&p->state_cv);
  wp__pool_unlock(p);
}

int wp_pool_stop(wp_pool *p) {
  int n;
  if (wp__pool_forked(p)) return 0;
  if (from_own_worker(p)) return WP_EDEADLOCK;
  n = begin_stop(p, 0);
  finish_stop(p, n);
  return n;
}

int wp_pool_stop_wait(wp_pool *p) {
  return wp_pool_stop_wait_for(p, -1);
}

int wp_pool_abort(wp_pool *p, int *interrupted) {
  wp__worker *w;
  uint64_t seq;
  int n, k = 0;
  if (interrupted) *interrupted = 0;
  if (wp__pool_forked(p)) return 0;
  n = begin_stop(p, 0);
  wp__pool_lock(p);
  if (p->state != WP__STOPPED) {
    if (p->hard_at == 0) p->hard_at = uv_hrtime();
    for (w = p->workers; w; w = w->next) {
      if (w->cur == NULL || w->stuck) continue;
      seq = atomic_load(&w->run_seq);
      if (atomic_load(&w->kill_seq) != seq)
        wp__worker_interrupt(w, seq, WP_CANCELLED);
      k++;
    }
    wp__watchdog_poke(p); /* it abandons them after stuck_grace */
  }
  wp__pool_unlock(p);
  if (interrupted) *interrupted = k;
  return n;
}

int wp_pool_stop_wait_for(wp_pool *p, double timeout) {
  return wp_pool_stop_deadline(p, timeout, NULL);
}

int wp_pool_stop_deadline(wp_pool *p, double timeout, int *interrupted) {
  uint64_t deadline, now;
  int n = 0, late = 0;
  if (interrupted) *interrupted = 0;
  if (wp__pool_forked(p)) return 0;
  if (from_own_worker(p)) return WP_EDEADLOCK;
  begin_stop(p, 1);
  if (timeout >= 0) {
    if (timeout > 1e9) timeout = 1e9;
    deadline = uv_hrtime() + (uint64_t)(timeout * 1e9);
    wp__pool_lock(p);
    p->nwaiters++;
    while (p->state != WP__STOPPED && (p->nqueued > 0 || p->nrunning > 0)) {
      now = uv_hrtime();
      if (now >= deadline) {
        late = 1;
        break;
      }
      wp__pool_timedwait(p, &p->state_cv, deadline - now);
    }
    p->nwaiters--;
    wp__pool_unlock(p);
    if (late) n = wp_pool_abort(p, interrupted);
  }
  finish_stop(p, n);
  return n;
}

int wp_pool_shutdown(wp_pool *p, int drain) {
  if (wp__pool_forked(p)) return 0;
  return begin_stop(p, drain);
}

int wp_pool_list(wp_pool **out, int max) {
  wp_pool *p;
  int n = 0, refs;
  uv_once(&reg.once, reg_init);
  uv_mutex_lock(&reg.mu);
  for (p = reg.head; p; p = p->reg_next) {
    refs = atomic_load(&p->refs);
    if (n >= max) {
      n += refs > 0;
      continue;
    }
    while (refs > 0 && !atomic_compare_exchange_weak(&p->refs, &refs, refs + 1))
      ;
    if (refs > 0) out[n++] = p;
  }
  uv_mutex_unlock(&reg.mu);
  return n;
}

void wp_pool_get_counts(wp_pool *p, wp_pool_counts *c) {
  int forked = wp__pool_forked(p);
  /* The parent's pool is stopped here, with no worker: its fields are
   * read without its lock, which a thread of the parent may hold (no
   * thread of this process writes them). */
  if (!forked) wp__pool_lock(p);
  c->stopped = forked || p->state != WP__RUNNING;
  c->paused = p->paused;
  c->waiting = p->nqueued;
  c->running = forked ? 0 : p->nrunning;
  c->workers = forked ? 0 : p->nworkers;
  c->max_workers = p->max_workers;
  c->queue_cap = p->queue_cap;
  c->block_when_full = p->block_when_full;
  c->submit_timeout =
      p->submit_timeout_ns < 0 ? -1 : (double)p->submit_timeout_ns / 1e9;
  if (!forked) wp__pool_unlock(p);
}
