/*
 * pool.c: the pool itself: its FIFO queue, its worker threads and their
 * life cycle (lazy start, reuse, one-at-a-time reaping), pause and resume,
 * stop and stop_wait, and the process-wide registry of pools by name.
 *
 * One mutex (pool->mu) guards the queue and every counter.  Workers wait on
 * work_cv for tasks; threads in pause, stop and join wait on state_cv.  A
 * worker takes a task under the lock and runs it with the lock released.
 * A pool moves RUNNING -> DRAINING (stop_wait) -> STOPPING (stop) ->
 * STOPPED and never back; exactly one stopping thread (the joiner) joins the
 * worker threads while any other waits for STOPPED.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wp_internal.h"

enum { RUNNING, DRAINING, STOPPING, STOPPED };

struct wp_pool {
  atomic_int refs;    /* handles; the last one stops the pool */
  atomic_int mrefs;   /* memory: all handles count one, futures one each */
  atomic_int stopped; /* 1 once stopping began; readable without mu */
  char *name;         /* owned, unique while registered */
  wp_pool *reg_next;  /* registry list, under reg.mu */
  int registered;     /* under reg.mu */
  wp__pool_init in;   /* what new worker states are made from */
  uv_mutex_t mu;
  uv_cond_t work_cv;        /* idle workers wait for tasks here */
  uv_cond_t state_cv;       /* pause, stop and join waiters */
  wp_future *qhead, *qtail; /* FIFO of queued futures */
  size_t nqueued;
  int max_workers, min_workers;
  int64_t idle_ns;      /* reaping period; < 0: never reap */
  uint64_t last_active; /* when a task was last submitted, taken or done */
  uint64_t last_reap;   /* when a worker was last reaped */
  int nworkers;         /* worker threads that have not exited */
  int nidle;            /* workers waiting on work_cv */
  int nrunning;         /* tasks executing */
  int nclosed;          /* exited workers still in the list, to join */
  int next_id;          /* id of the next worker */
  wp__worker *workers;  /* every started, not yet joined worker */
  wp__worker *spare;    /* the state wp_pool_new made, not yet started */
  int state;
  int joiner; /* a stopping thread is joining the workers */
  int paused;
  uint64_t pause_seq; /* while paused, tasks after this wait */
  uint64_t next_seq;  /* sequence number of the last submission */
  int nwaiters;       /* threads waiting on state_cv */
};

/* The worker the calling thread runs, if any. */
static _Thread_local wp__worker *current_worker;

static int from_own_worker(wp_pool *p) {
  return current_worker != NULL && current_worker->pool == p;
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

/* Registers p under its name, or generates one.  WP_EEXISTS, WP_ENOMEM. */
static int reg_add(wp_pool *p, const char *name) {
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

static void pool_free(wp_pool *p) {
  uv_cond_destroy(&p->state_cv);
  uv_cond_destroy(&p->work_cv);
  uv_mutex_destroy(&p->mu);
  free(p->in.init);
  free(p->in.init_name);
  free(p->in.path);
  free(p->in.cpath);
  free(p->name);
  free(p);
}

void wp__pool_mrelease(wp_pool *p) {
  if (atomic_fetch_sub(&p->mrefs, 1) == 1) pool_free(p);
}

void wp_pool_retain(wp_pool *p) {
  atomic_fetch_add(&p->refs, 1);
}

void wp_pool_release(wp_pool *p) {
  if (p == NULL || atomic_fetch_sub(&p->refs, 1) != 1) return;
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

/* ---- workers --------------------------------------------------------- */

/* Takes the next runnable task.  Needs mu. */
static wp_future *take_locked(wp_pool *p) {
  wp_future *f = p->qhead;
  if (f == NULL || (p->paused && f->seq > p->pause_seq)) return NULL;
  p->qhead = f->next;
  if (p->qhead)
    p->qhead->prev = NULL;
  else
    p->qtail = NULL;
  f->next = f->prev = NULL;
  f->queued = 0;
  p->nqueued--;
  return f;
}

/* Waits for work.  Returns 1 when this worker is the one to reap now.
 * Needs mu. */
static int wait_locked(wp_pool *p) {
  uint64_t now, base, deadline;
  if (p->idle_ns < 0 || p->state != RUNNING) {
    p->nidle++;
    uv_cond_wait(&p->work_cv, &p->mu);
    p->nidle--;
    return 0;
  }
  now = uv_hrtime();
  base = p->last_active > p->last_reap ? p->last_active : p->last_reap;
  deadline = base + (uint64_t)p->idle_ns;
  if (now >= deadline) {
    if (p->nworkers > p->min_workers) {
      p->last_reap = now;
      return 1;
    }
    deadline = now + (uint64_t)p->idle_ns;
  }
  p->nidle++;
  uv_cond_timedwait(&p->work_cv, &p->mu, deadline - now);
  p->nidle--;
  return 0;
}

static int spawn_locked(wp_pool *p);

static void worker_main(void *arg) {
  wp__worker *w = arg;
  wp_pool *p = w->pool;
  char err[2048];
  wp_future *f;
  int failed = 0, openerr = 0;
  current_worker = w;
  /* A worker is warm from its start (min_workers rely on it). */
  if (w->L == NULL) openerr = wp__worker_open(w, err, sizeof err);
  uv_mutex_lock(&p->mu);
  for (;;) {
    if ((f = take_locked(p)) == NULL) {
      if (p->state >= STOPPING || (p->state == DRAINING && !p->qhead)) break;
      if (wait_locked(p)) break;
      continue;
    }
    p->nrunning++;
    p->last_active = uv_hrtime();
    uv_mutex_unlock(&p->mu);
    if (openerr || (w->L == NULL && wp__worker_open(w, err, sizeof err))) {
      char msg[2100];
      snprintf(msg, sizeof msg, "worker init failed: %s", err);
      wp__future_fail(f, WP_ERROR, msg);
      failed = 1;
    } else {
      wp__worker_run(w, f);
    }
    wp_future_release(f);
    uv_mutex_lock(&p->mu);
    p->nrunning--;
    p->last_active = uv_hrtime();
    if (p->nwaiters) uv_cond_broadcast(&p->state_cv);
    if (failed) break;
  }
  p->nworkers--;
  /* A worker that could not start leaves its queue to a fresh attempt. */
  if (failed && p->state < STOPPING && !p->paused &&
      p->nqueued > (size_t)p->nidle && p->nworkers < p->max_workers)
    spawn_locked(p);
  uv_mutex_unlock(&p->mu);
  wp__worker_close(w);
  wp__buf_free(&w->out);
  uv_mutex_lock(&p->mu);
  w->closed = 1;
  p->nclosed++;
  if (p->nwaiters) uv_cond_broadcast(&p->state_cv);
  uv_mutex_unlock(&p->mu);
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
  }
  if (uv_thread_create(&w->tid, worker_main, w) != 0) {
    if (w->L)
      p->spare = w;
    else
      free(w);
    return WP_ESYS;
  }
  w->started = 1;
  w->next = p->workers;
  p->workers = w;
  p->nworkers++;
  return 0;
}

/* Starts workers for queued runnable tasks that no idle worker will take.
 * Needs mu. */
static void grow_locked(wp_pool *p) {
  while (p->nqueued > (size_t)p->nidle && p->nworkers < p->max_workers &&
         spawn_locked(p) == 0)
    ;
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

void wp_options_init(wp_options *o) {
  memset(o, 0, sizeof *o);
  o->max_workers = 1;
  o->idle_timeout = 2.0;
}

static char *dup_or_null(const char *s, int *failed) {
  char *d;
  if (s == NULL) return NULL;
  if ((d = strdup(s)) == NULL) *failed = 1;
  return d;
}

static int bad_option(char *errbuf, size_t errlen, const char *msg) {
  if (errlen) snprintf(errbuf, errlen, "%s", msg);
  return WP_EINVAL;
}

int wp_pool_new(const wp_options *o, wp_pool **out, char *errbuf,
                size_t errlen) {
  wp_pool *p;
  int r, failed = 0;
  *out = NULL;
  if (errlen) errbuf[0] = '\0';
  if (o->max_workers < 1)
    return bad_option(errbuf, errlen, "max_workers must be a positive integer");
  if (o->min_workers < 0 || o->min_workers > o->max_workers)
    return bad_option(errbuf, errlen,
                      "min_workers must be an integer from 0 to max_workers");
  if (isnan(o->idle_timeout))
    return bad_option(errbuf, errlen, "idle_timeout must be a number");
  if (o->name && o->name[0] == '\0')
    return bad_option(errbuf, errlen, "name must not be empty");
  if ((p = calloc(1, sizeof *p)) == NULL) return WP_ENOMEM;
  atomic_init(&p->refs, 1);
  atomic_init(&p->mrefs, 1);
  p->max_workers = o->max_workers;
  p->min_workers = o->min_workers;
  p->idle_ns = o->idle_timeout < 0     ? -1
               : o->idle_timeout > 1e9 ? (int64_t)1e18
                                       : (int64_t)(o->idle_timeout * 1e9);
  p->last_active = uv_hrtime();
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
  if (failed) goto nomem;
  if (uv_mutex_init(&p->mu)) goto nomem;
  if (uv_cond_init(&p->work_cv)) {
    uv_mutex_destroy(&p->mu);
    goto nomem;
  }
  if (uv_cond_init(&p->state_cv)) {
    uv_cond_destroy(&p->work_cv);
    uv_mutex_destroy(&p->mu);
    goto nomem;
  }
  if ((r = reg_add(p, o->name)) != 0) {
    if (r == WP_EEXISTS && errlen)
      snprintf(errbuf, errlen, "a pool named '%s' already exists", o->name);
    pool_free(p);
    return r;
  }
  /* The first state is made here so that a broken init fails now. */
  if ((p->spare = calloc(1, sizeof *p->spare)) == NULL) {
    r = WP_ENOMEM;
    goto err;
  }
  p->spare->pool = p;
  p->spare->id = ++p->next_id;
  if ((r = wp__worker_open(p->spare, errbuf, errlen)) != 0) goto err;
  uv_mutex_lock(&p->mu);
  while (p->nworkers < p->min_workers && spawn_locked(p) == 0)
    ;
  uv_mutex_unlock(&p->mu);
  *out = p;
  return 0;
nomem:
  pool_free(p);
  return WP_ENOMEM;
err:
  reg_remove(p);
  free(p->spare);
  uv_cond_destroy(&p->state_cv);
  uv_cond_destroy(&p->work_cv);
  uv_mutex_destroy(&p->mu);
  p->spare = NULL;
  free(p->in.init);
  free(p->in.init_name);
  free(p->in.path);
  free(p->in.cpath);
  free(p->name);
  free(p);
  return r;
}

/* ---- submitting ------------------------------------------------------ */

/* Queues f (taking the queue's reference).  WP_ESTOPPED, WP_ESYS. */
static int enqueue(wp_pool *p, wp_future *f) {
  wp__worker *closed = NULL;
  int r = 0;
  uv_mutex_lock(&p->mu);
  if (p->state != RUNNING) {
    uv_mutex_unlock(&p->mu);
    return WP_ESTOPPED;
  }
  f->seq = ++p->next_seq;
  f->prev = p->qtail;
  f->next = NULL;
  if (p->qtail)
    p->qtail->next = f;
  else
    p->qhead = f;
  p->qtail = f;
  f->queued = 1;
  p->nqueued++;
  p->last_active = uv_hrtime();
  if (!p->paused) {
    if (p->nqueued > (size_t)p->nidle && p->nworkers < p->max_workers)
      r = spawn_locked(p);
    else if (p->nidle)
      uv_cond_signal(&p->work_cv);
    if (r && p->nworkers > 0) r = 0; /* a running worker will take it */
    if (r) {                         /* nobody could ever run it */
      p->qtail = f->prev;
      if (p->qtail)
        p->qtail->next = NULL;
      else
        p->qhead = NULL;
      f->queued = 0;
      p->nqueued--;
    }
  }
  if (p->nclosed) closed = take_closed_locked(p);
  uv_mutex_unlock(&p->mu);
  join_all(closed);
  return r;
}

/* Builds a future from an encoded message (taking it) and queues it. */
static int submit_msg(wp_pool *p, wp__buf *b, wp_future **out) {
  wp_future *f;
  int r;
  if (out) *out = NULL;
  if ((f = wp__future_new(p, b->data, b->len)) == NULL) return WP_ENOMEM;
  b->data = NULL;
  if ((r = enqueue(p, f)) != 0) {
    wp_future_release(f);
    wp_future_release(f);
    return r;
  }
  if (out)
    *out = f;
  else
    wp_future_release(f);
  return 0;
}

int wp_submit_values(wp_pool *p, const char *handler, const wp_value *args,
                     int nargs, wp_future **out) {
  wp__buf b = {0};
  char kind = WP__TASK_NAMED;
  int i, r;
  if (out) *out = NULL;
  if (handler == NULL || nargs < 0 || (nargs > 0 && args == NULL))
    return WP_EINVAL;
  if (atomic_load(&p->stopped)) return WP_ESTOPPED;
  r = wp__buf_reserve(&b, 1);
  if (!r) b.data[b.len++] = kind;
  if (!r) r = wp__put_varint(&b, strlen(handler));
  if (!r) r = wp__buf_reserve(&b, strlen(handler));
  if (!r) {
    memcpy(b.data + b.len, handler, strlen(handler));
    b.len += strlen(handler);
    r = wp__put_varint(&b, (uint64_t)nargs);
  }
  for (i = 0; !r && i < nargs; i++)
    r = wp__put_cvalue(&b, &args[i]);
  if (!r) r = submit_msg(p, &b, out);
  wp__buf_free(&b);
  return r;
}

typedef struct encode_call {
  wp__buf *b;
  const char *what;
  int nargs;
} encode_call;

/* [-(n+1), +0, e] Encodes a task message from its arguments: the call
 * description, then the task and its arguments. */
static int encode_pmain(lua_State *L) {
  encode_call *c = lua_touserdata(L, 1);
  wp__buf *b = c->b;
  int r;
  if (lua_type(L, 2) == LUA_TSTRING) {
    size_t len;
    const char *name = lua_tolstring(L, 2, &len);
    if ((r = wp__buf_reserve(b, 1)) == 0) {
      b->data[b->len++] = WP__TASK_NAMED;
      r = wp__put_varint(b, len);
    }
    if (!r && (r = wp__buf_reserve(b, len)) == 0) {
      memcpy(b->data + b->len, name, len);
      b->len += len;
    }
    if (r) return luaL_error(L, "%s", wp_strerror(r));
    wp__encode(L, b, 3, c->nargs, c->what, 2);
  } else {
    if ((r = wp__buf_reserve(b, 1)) != 0)
      return luaL_error(L, "%s", wp_strerror(r));
    b->data[b->len++] = WP__TASK_FUNC;
    wp__encode(L, b, 2, c->nargs + 1, c->what, 1);
  }
  return 0;
}

int wp_submit_lua(wp_pool *p, lua_State *L, int task, int nargs,
                  const char *what, wp_future **out) {
  wp__buf b = {0};
  encode_call c;
  int i, t, r;
  if (out) *out = NULL;
  task = lua_absindex(L, task);
  t = lua_type(L, task);
  if (t != LUA_TSTRING && (t != LUA_TFUNCTION || lua_iscfunction(L, task)))
    luaL_error(L,
               "bad argument #1 to '%s' (handler name or Lua function "
               "expected, got %s)",
               what, lua_typename(L, t));
  if (atomic_load(&p->stopped)) return WP_ESTOPPED;
  c.b = &b;
  c.what = what;
  c.nargs = nargs;
  luaL_checkstack(L, nargs + 3, "too many arguments");
  lua_pushcfunction(L, encode_pmain);
  lua_pushlightuserdata(L, &c);
  for (i = 0; i <= nargs; i++)
    lua_pushvalue(L, task + i);
  if (lua_pcall(L, nargs + 2, 0, 0) != LUA_OK) {
    wp__buf_free(&b);
    lua_error(L);
  }
  r = submit_msg(p, &b, out);
  wp__buf_free(&b);
  return r;
}

int wp__pool_unqueue(wp_pool *p, wp_future *f) {
  uv_mutex_lock(&p->mu);
  if (!f->queued) {
    uv_mutex_unlock(&p->mu);
    return 0;
  }
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
  if (p->nwaiters) uv_cond_broadcast(&p->state_cv);
  uv_mutex_unlock(&p->mu);
  return 1;
}

/* ---- pause, stop ----------------------------------------------------- */

int wp_pool_pause(wp_pool *p) {
  if (from_own_worker(p)) return WP_EDEADLOCK;
  uv_mutex_lock(&p->mu);
  if (p->state == RUNNING && !p->paused) {
    p->paused = 1;
    p->pause_seq = p->next_seq;
  }
  p->nwaiters++;
  while (p->state == RUNNING && p->paused &&
         ((p->qhead && p->qhead->seq <= p->pause_seq) || p->nrunning > 0))
    uv_cond_wait(&p->state_cv, &p->mu);
  p->nwaiters--;
  uv_mutex_unlock(&p->mu);
  return 0;
}

void wp_pool_resume(wp_pool *p) {
  uv_mutex_lock(&p->mu);
  if (p->paused) {
    p->paused = 0;
    if (p->state == RUNNING) grow_locked(p);
    uv_cond_broadcast(&p->work_cv);
    if (p->nwaiters) uv_cond_broadcast(&p->state_cv);
  }
  uv_mutex_unlock(&p->mu);
}

/* The non-blocking half of stopping: moves the state forward, discards the
 * queue when not draining, wakes everyone.  Returns the number discarded. */
static int begin_stop(wp_pool *p, int drain) {
  wp_future *discard = NULL, *f;
  int ndiscarded = 0, unregister = 0;
  uv_mutex_lock(&p->mu);
  if (p->state == RUNNING) {
    p->state = drain ? DRAINING : STOPPING;
    atomic_store(&p->stopped, 1);
    unregister = 1;
  } else if (!drain && p->state == DRAINING) {
    p->state = STOPPING;
  }
  p->paused = 0;
  if (p->state == STOPPING && p->qhead) {
    discard = p->qhead;
    for (f = discard; f; f = f->next)
      f->queued = 0;
    ndiscarded = (int)p->nqueued;
    p->qhead = p->qtail = NULL;
    p->nqueued = 0;
  }
  if (p->state == DRAINING) grow_locked(p);
  uv_cond_broadcast(&p->work_cv);
  if (p->nwaiters) uv_cond_broadcast(&p->state_cv);
  uv_mutex_unlock(&p->mu);

  if (unregister) reg_remove(p);
  while ((f = discard) != NULL) {
    discard = f->next;
    f->next = f->prev = NULL;
    wp__future_fail(f, WP_DISCARDED, "discarded");
    wp_future_release(f);
  }
  return ndiscarded;
}

/* The blocking half: joins every worker, or waits for the thread that
 * does. */
static void finish_stop(wp_pool *p) {
  wp__worker *w, *spare;
  uv_mutex_lock(&p->mu);
  if (p->joiner) {
    p->nwaiters++;
    while (p->state != STOPPED)
      uv_cond_wait(&p->state_cv, &p->mu);
    p->nwaiters--;
    uv_mutex_unlock(&p->mu);
    return;
  }
  p->joiner = 1;
  for (;;) {
    if ((w = p->workers) != NULL) {
      p->workers = w->next;
      uv_mutex_unlock(&p->mu);
      uv_thread_join(&w->tid);
      uv_mutex_lock(&p->mu);
      p->nclosed--; /* every joined worker counted itself closed */
      free(w);
    } else if (p->nworkers > 0) {
      p->nwaiters++;
      uv_cond_wait(&p->state_cv, &p->mu);
      p->nwaiters--;
    } else {
      break;
    }
  }
  spare = p->spare;
  p->spare = NULL;
  uv_mutex_unlock(&p->mu);
  if (spare) {
    wp__worker_close(spare);
    free(spare);
  }
  uv_mutex_lock(&p->mu);
  p->state = STOPPED;
  if (p->nwaiters) uv_cond_broadcast(&p->state_cv);
  uv_mutex_unlock(&p->mu);
}

int wp_pool_stop(wp_pool *p) {
  int n;
  if (from_own_worker(p)) return WP_EDEADLOCK;
  n = begin_stop(p, 0);
  finish_stop(p);
  return n;
}

int wp_pool_stop_wait(wp_pool *p) {
  return wp_pool_stop_wait_for(p, -1);
}

int wp_pool_stop_wait_for(wp_pool *p, double timeout) {
  uint64_t deadline, now;
  int n = 0, late = 0;
  if (from_own_worker(p)) return WP_EDEADLOCK;
  begin_stop(p, 1);
  if (timeout >= 0) {
    if (timeout > 1e9) timeout = 1e9;
    deadline = uv_hrtime() + (uint64_t)(timeout * 1e9);
    uv_mutex_lock(&p->mu);
    p->nwaiters++;
    while (p->state == DRAINING && (p->nqueued > 0 || p->nrunning > 0)) {
      now = uv_hrtime();
      if (now >= deadline) {
        late = 1;
        break;
      }
      uv_cond_timedwait(&p->state_cv, &p->mu, deadline - now);
    }
    p->nwaiters--;
    uv_mutex_unlock(&p->mu);
    if (late) n = begin_stop(p, 0);
  }
  finish_stop(p);
  return n;
}

int wp_pool_shutdown(wp_pool *p, int drain) {
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
  uv_mutex_lock(&p->mu);
  c->stopped = p->state != RUNNING;
  c->paused = p->paused;
  c->waiting = p->nqueued;
  c->running = p->nrunning;
  c->workers = p->nworkers;
  c->max_workers = p->max_workers;
  uv_mutex_unlock(&p->mu);
}
