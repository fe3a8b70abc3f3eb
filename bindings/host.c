/*
 * host.c: the host runtime: a libuv loop driving the host state's
 * coroutines, so that waiting for a task, sleeping or joining suspends one
 * coroutine instead of the thread.
 *
 * Coroutines started by the host (the main script, workerpool.spawn, timer
 * and on_done callbacks) are "host coroutines".  When one calls a waiting
 * function, the function records what it waits for ("parks" it) and yields;
 * the event that it waited for resumes it.  Futures report completion from
 * worker threads into a mailbox and one uv_async_t drains the mailbox in
 * batches (libuv merges sends).  Every entry into Lua from a loop callback
 * goes through lua_pcall, so an error in a callback is logged and the loop
 * goes on.
 *
 * Registry layout (keys are addresses of statics below):
 *   host_key     light userdata: the wpool_host
 *   cos_key      thread -> light userdata wpl_co, for live host coroutines
 *   watch_key    light userdata future -> list of waiters (wpl_co userdata
 *                or on_done functions)
 *   ready_key    list of wpl_co to resume on the next loop iteration
 *   shutdown_key list of on_shutdown handlers
 *
 * Signals: SIGINT and SIGTERM are caught by a handler of our own (not
 * uv_signal), which always acts on the loop thread (a copy is forwarded
 * there when another thread took it).  It counts the signal, wakes the loop
 * through an async handle, and arms a hook in the host coroutine that is
 * running, if any, so that a busy script cannot keep the loop from seeing
 * the signal.  Counting first and waking second, with the count read again
 * once the loop has stopped, means no signal is lost.
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "lbind.h"
#include "wpool_host.h"

/* luv.h declares a function type without a prototype. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstrict-prototypes"
#include <luv/luv.h>
#pragma GCC diagnostic pop

#define WPL_THREAD_MT "workerpool.thread"
#define WPL_TIMER_MT "workerpool.timer"

static const char host_key = 'h', cos_key = 'c', watch_key = 'w',
                  ready_key = 'r', shutdown_key = 's';

enum {
  PARK_NONE,
  PARK_FUTURE,
  PARK_SLEEP,
  PARK_JOIN,
  PARK_CALL,
  PARK_READY,
  PARK_AWAIT
};
enum { CO_RUNNING, CO_DONE, CO_ERROR };
enum { MSG_FUTURE, MSG_OFFLOAD };

typedef struct ptimer ptimer;
typedef struct offload offload;
typedef struct wtimer wtimer;

/* A host coroutine; the userdata is also the handle spawn returns.
 * Uservalue 1: the thread; 2: list of joiners. */
typedef struct wpl_co {
  wpool_host *h;
  lua_State *co;
  int ref;               /* registry reference to this userdata while running */
  int state;             /* CO_* */
  int parked;            /* PARK_* */
  int is_main;           /* errors end the loop */
  wp_future *f;          /* awaited future, while PARK_FUTURE */
  struct wpl_co *joined; /* awaited coroutine, while PARK_JOIN */
  void *awaiter;         /* its await, while PARK_AWAIT */
  ptimer *timer;         /* sleep or wait timeout, or NULL */
  int nres;              /* results (or 1: the error) on the thread's stack */
} wpl_co;

struct ptimer {
  uv_timer_t t;
  wpl_co *c;
};

/* Messages from other threads to the loop. */
typedef struct mailbox {
  atomic_int refs;
  uv_mutex_t mu;
  uv_async_t *async; /* NULL once the host closed */
  struct msg {
    int kind; /* MSG_* */
    void *ptr;
  } * v;
  size_t n, cap;
} mailbox;

struct offload {
  offload *next; /* in h->offloads */
  uv_thread_t tid;
  wpl_blocking_fn op;
  void *ud;
  wp_pool *p; /* the pool the call stops or pauses (borrowed), or NULL */
  int result;
  wpl_co *c;
  mailbox *mb;
};

struct wtimer {
  uv_timer_t t;
  wpool_host *h;
  wtimer *next, *prev; /* in h->timers while active */
  int fn_ref;          /* the callback, while active */
  int active;
  int refs;          /* the userdata's and the running timer's */
  double period_ns;  /* every(): the period; 0 for after() */
  uint64_t start_ns; /* every(): loop time when it was created, in ns */
  uint64_t ticks;    /* every(): the index of the tick last scheduled */
};

struct wpool_host {
  uv_loop_t *loop;
  lua_State *L;
  mailbox *mb;
  uv_async_t async;
  uv_idle_t idle;     /* runs coroutines that yielded plainly */
  int nwatched;       /* futures with host waiters */
  offload *offloads;  /* blocking calls in progress */
  wtimer *timers;     /* active every/after timers */
  wpl_co *parked_now; /* set by park(), checked by co_resume */
  int exit_code;
  int closed;
  wpl_co *main; /* the main coroutine while it runs */
  /* signals (see the top of this file) */
  lua_State *volatile running;    /* host coroutine being resumed, or NULL */
  uv_async_t sig_async;           /* wakes the loop for a signal */
  atomic_int nsig[2];             /* SIGINT, SIGTERM received */
  int nsig_seen[2];               /* ... and acted on */
  volatile uint64_t interrupt_at; /* hrtime at which the hook raises */
  int signals;                    /* our handlers are installed */
  struct sigaction old_sa[2];     /* the handlers they replaced */
  /* shutdown */
  uv_timer_t drain_timer;
  int draining;   /* 0 none, 1 draining, 2 done */
  int exit_drain; /* pools drain at exit, with no deadline */
  double drain_timeout, drain_start, last_progress;
  wp_pool **pools; /* references to the pools being drained */
  int npools, cap_pools;
  int dropped, abandoned;
  int nclosing;      /* handles still closing after wpool_host_close */
  wp_pool **adopted; /* collected pools draining in the background */
  int nadopted;
  void *http; /* the endpoints' server, or NULL */
};

/* ---- mailbox --------------------------------------------------------- */

static void mailbox_release(mailbox *mb) {
  if (atomic_fetch_sub(&mb->refs, 1) != 1) return;
  uv_mutex_destroy(&mb->mu);
  free(mb->v);
  free(mb);
}

/* Posts from any thread; 0 when the host has closed (nothing posted). */
static int mailbox_post(mailbox *mb, int kind, void *ptr) {
  int ok = 0;
  uv_mutex_lock(&mb->mu);
  if (mb->async) {
    if (mb->n == mb->cap) {
      size_t cap = mb->cap ? mb->cap * 2 : 64;
      struct msg *v = realloc(mb->v, cap * sizeof *v);
      if (v) {
        mb->v = v;
        mb->cap = cap;
      }
    }
    if (mb->n < mb->cap) {
      mb->v[mb->n].kind = kind;
      mb->v[mb->n].ptr = ptr;
      mb->n++;
      ok = 1;
      uv_async_send(mb->async);
    }
  }
  uv_mutex_unlock(&mb->mu);
  return ok;
}

/* Core callback, in whichever thread ended f. */
static void future_done_cb(wp_future *f, void *ud) {
  mailbox *mb = ud;
  if (!mailbox_post(mb, MSG_FUTURE, f)) wp_future_release(f);
  mailbox_release(mb);
}

/* ---- helpers --------------------------------------------------------- */

static wpool_host *host_of(lua_State *L) {
  wpool_host *h;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &host_key);
  h = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return h;
}

static wpool_host *check_host(lua_State *L, const char *what) {
  wpool_host *h = host_of(L);
  if (h == NULL || h->closed)
    luaL_error(L,
               "workerpool.%s needs a host event loop (run the script "
               "with `wpool run`)",
               what);
  return h;
}

static void update_async_ref(wpool_host *h) {
  if (h->closed) return;
  if (h->nwatched > 0 || h->offloads)
    uv_ref((uv_handle_t *)&h->async);
  else
    uv_unref((uv_handle_t *)&h->async);
}

/* The host coroutine running in L, or NULL when L cannot be parked. */
static wpl_co *co_current(lua_State *L) {
  wpool_host *h = host_of(L);
  wpl_co *c;
  if (h == NULL || h->closed || L == h->L || !lua_isyieldable(L)) return NULL;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &cos_key);
  lua_pushthread(L);
  lua_rawget(L, -2);
  c = lua_touserdata(L, -1);
  lua_pop(L, 2);
  return c;
}

/* [-0, +1, m] Pushes list registry[key][k] (k at the top, popped),
 * creating it when create is set; pushes nil otherwise. */
static void list_of(lua_State *L, const void *key, int create) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, key);
  lua_insert(L, -2);
  lua_pushvalue(L, -1);
  if (lua_rawget(L, -3) == LUA_TNIL && create) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -2);
    lua_pushvalue(L, -2);
    lua_rawset(L, -5);
  }
  lua_remove(L, -2);
  lua_remove(L, -2);
}

/* [-1, +0, m] Appends the value at the top to the list at idx. */
static void list_append(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  lua_rawseti(L, idx, (lua_Integer)lua_rawlen(L, idx) + 1);
}

/* [-0, +0, -] Removes the userdata whose pointer is p from the list at idx
 * (keeping the order). */
static void list_remove_ptr(lua_State *L, int idx, const void *p) {
  lua_Integer i, n = (lua_Integer)lua_rawlen(L, idx), j = 0;
  idx = lua_absindex(L, idx);
  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, idx, i);
    if (lua_touserdata(L, -1) == p) {
      lua_pop(L, 1);
      continue;
    }
    lua_rawseti(L, idx, ++j);
  }
  for (i = j + 1; i <= n; i++) {
    lua_pushnil(L);
    lua_rawseti(L, idx, i);
  }
}

/* Runs fn(L, ud) protected in the host state; an error is logged. */
static void host_call(wpool_host *h, lua_CFunction fn, void *ud) {
  lua_State *L = h->L;
  int top = lua_gettop(L);
  lua_pushcfunction(L, fn);
  lua_pushlightuserdata(L, ud);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
    wpl_log(WPL_ERROR, "host.error",
            json_pack("{s:o}", "error", wpl_json_str(lua_tostring(L, -1))));
  }
  lua_settop(L, top);
}

static void ptimer_close_cb(uv_handle_t *t) {
  free(t);
}

static void unpark_timer(wpl_co *c) {
  if (c->timer) {
    uv_timer_stop(&c->timer->t);
    uv_close((uv_handle_t *)&c->timer->t, ptimer_close_cb);
    c->timer = NULL;
  }
}

/* ---- running coroutines ---------------------------------------------- */

static void co_resume(wpool_host *h, wpl_co *c, int nargs, lua_State *from);
static void interrupt_hook(lua_State *L, lua_Debug *ar);
static void resume_all(wpool_host *h, lua_State *L, int list, int mask);
static void idle_cb(uv_idle_t *idle);
static void host_handle_closed(uv_handle_t *handle);

/* [-0, +0, m] Queues c to be resumed on the next loop iteration. */
static void ready_push(wpool_host *h, wpl_co *c) {
  lua_State *L = h->L;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &ready_key);
  lua_rawgeti(L, LUA_REGISTRYINDEX, c->ref);
  list_append(L, -2);
  lua_pop(L, 1);
  if (!uv_is_active((uv_handle_t *)&h->idle)) uv_idle_start(&h->idle, idle_cb);
}

/* [-1, +1, e] tostring(v), for error_message. */
static int tostring_pmain(lua_State *L) {
  luaL_tolstring(L, 1, NULL);
  return 1;
}

/* [-0, +1, m] Pushes onto co, and returns, the text of the error value at
 * its top: the string itself, what its __tostring returns (called in L,
 * protected: co is dead), else "(error object is a T value)". */
static const char *error_message(lua_State *L, lua_State *co) {
  if (lua_type(co, -1) == LUA_TSTRING || lua_type(co, -1) == LUA_TNUMBER) {
    lua_pushvalue(co, -1);
    return lua_tostring(co, -1);
  }
  if (luaL_getmetafield(co, -1, "__tostring") != LUA_TNIL) {
    lua_pop(co, 1);
    lua_pushcfunction(L, tostring_pmain);
    lua_pushvalue(co, -1);
    lua_xmove(co, L, 1);
    if (lua_pcall(L, 1, 1, 0) == LUA_OK && lua_type(L, -1) == LUA_TSTRING) {
      lua_xmove(L, co, 1);
      return lua_tostring(co, -1);
    }
    lua_pop(L, 1);
  }
  return lua_pushfstring(co, "(error object is a %s value)",
                         luaL_typename(co, -1));
}

/* [-0, +0, m] Records the end of c and wakes its joiners. */
static void co_finish(wpool_host *h, wpl_co *c, int st, int nres) {
  lua_State *L = h->L, *co = c->co;
  c->state = st == LUA_OK ? CO_DONE : CO_ERROR;
  c->nres = nres;
  if (c == h->main) h->main = NULL;
  if (st != LUA_OK) {
    const char *msg = error_message(L, co);
    luaL_traceback(co, co, msg, 0); /* the outcome: the top value */
    c->nres = 1;
    if (c->is_main) {
      fprintf(stderr, "wpool: %s\n", lua_tostring(co, -1));
      fflush(stderr);
      h->exit_code = 1;
      uv_stop(h->loop);
    } else {
      wpl_log(WPL_ERROR, "coroutine.error",
              json_pack("{s:o}", "error", wpl_json_str(lua_tostring(co, -1))));
    }
  }
  lua_rawgetp(L, LUA_REGISTRYINDEX, &cos_key);
  lua_pushthread(co);
  lua_xmove(co, L, 1);
  lua_pushnil(L);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  /* Wake the joiners, then let the handle be collected. */
  lua_rawgeti(L, LUA_REGISTRYINDEX, c->ref);
  lua_getiuservalue(L, -1, 2);
  resume_all(h, L, lua_gettop(L), 1 << PARK_JOIN);
  lua_pop(L, 2);
  luaL_unref(L, LUA_REGISTRYINDEX, c->ref);
  c->ref = LUA_NOREF;
}

/* [-0, +0, m] Resumes, with no values, every coroutine in the list at idx
 * that still runs and is parked in one of the ways in mask (1 << PARK_*). */
static void resume_all(wpool_host *h, lua_State *L, int list, int mask) {
  lua_Integer i, n = (lua_Integer)lua_rawlen(L, list);
  for (i = 1; i <= n; i++) {
    wpl_co *c;
    lua_rawgeti(L, list, i);
    c = lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (c && c->state == CO_RUNNING && (mask >> c->parked & 1))
      co_resume(h, c, 0, L);
  }
}

static void co_resume(wpool_host *h, wpl_co *c, int nargs, lua_State *from) {
  lua_State *outer = h->running;
  int nres, st;
  c->parked = PARK_NONE;
  c->joined = NULL;
  h->parked_now = NULL;
  h->running = c->co;
  st = lua_resume(c->co, from, nargs, &nres);
  h->running = outer;
  if (lua_gethook(c->co) == interrupt_hook) {
    /* The signal's interrupt now concerns whoever runs next, if anyone. */
    int mask = lua_gethookmask(c->co), count = lua_gethookcount(c->co);
    lua_sethook(c->co, NULL, 0, 0);
    if (outer) lua_sethook(outer, interrupt_hook, mask, count);
  }
  if (st == LUA_YIELD) {
    lua_pop(c->co, nres);
    if (h->parked_now == c)
      h->parked_now = NULL; /* waits for an event */
    else
      ready_push(h, c); /* a plain coroutine.yield: run again soon */
  } else {
    co_finish(h, c, st, nres);
  }
}

/* Marks c as waiting; the caller yields next. */
static void park(wpl_co *c, int kind) {
  c->parked = kind;
  c->h->parked_now = c;
}

/* [-0, +1, m] Creates a host coroutine for the function below its nargs
 * arguments at the top of L (all moved into it), pushing its handle. */
static wpl_co *co_new(wpool_host *h, lua_State *L, int nargs) {
  wpl_co *c;
  lua_State *co;
  int fn = lua_gettop(L) - nargs;
  c = lua_newuserdatauv(L, sizeof *c, 2);
  memset(c, 0, sizeof *c);
  c->h = h;
  c->ref = LUA_NOREF;
  luaL_setmetatable(L, WPL_THREAD_MT);
  co = lua_newthread(L);
  c->co = co;
  lua_setiuservalue(L, -2, 1);
  lua_newtable(L);
  lua_setiuservalue(L, -2, 2);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &cos_key);
  lua_getiuservalue(L, -2, 1);
  lua_pushlightuserdata(L, c);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  lua_pushvalue(L, -1);
  c->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_insert(L, fn); /* handle below the function */
  lua_xmove(L, co, nargs + 1);
  return c;
}

/* workerpool.spawn(fn, ...) -> handle   [-0, +1, e] */
int wpl_spawn(lua_State *L) {
  wpool_host *h = check_host(L, "spawn");
  wpl_co *c;
  int nargs = lua_gettop(L) - 1;
  luaL_checktype(L, 1, LUA_TFUNCTION);
  c = co_new(h, L, nargs);
  lua_pushvalue(L, 1); /* keep the handle: resuming may finish it */
  co_resume(h, c, nargs, L);
  return 1;
}

/* [-0, +n, m] Pushes true and c's results, or false and its error. */
static int push_outcome(lua_State *L, wpl_co *c) {
  int i;
  luaL_checkstack(L, c->nres + 1, "too many results");
  luaL_checkstack(c->co, c->nres, "too many results");
  lua_pushboolean(L, c->state == CO_DONE);
  for (i = 0; i < c->nres; i++)
    lua_pushvalue(c->co, -c->nres);
  lua_xmove(c->co, L, c->nres);
  return c->nres + 1;
}

static int join_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  (void)ctx;
  return push_outcome(L, luaL_checkudata(L, 1, WPL_THREAD_MT));
}

/* h:join() -> true, results... | false, err   [-0, +n, e] Suspends the
 * calling host coroutine until h ends. */
static int thread_join(lua_State *L) {
  wpl_co *c = luaL_checkudata(L, 1, WPL_THREAD_MT), *me;
  if (c->state != CO_RUNNING) return push_outcome(L, c);
  if ((me = co_current(L)) == NULL)
    return luaL_error(L, "join must be called from a host coroutine "
                         "(the main script, spawn or a callback)");
  if (me == c) return luaL_error(L, "a coroutine cannot join itself");
  lua_getiuservalue(L, 1, 2);
  lua_rawgeti(L, LUA_REGISTRYINDEX, me->ref);
  list_append(L, -2);
  lua_pop(L, 1);
  park(me, PARK_JOIN);
  me->joined = c;
  lua_settop(L, 1);
  return lua_yieldk(L, 0, 0, join_k);
}

/* h:status() -> "running" | "done" | "error"   [-0, +1, e] */
static int thread_status(lua_State *L) {
  static const char *const names[] = {"running", "done", "error"};
  wpl_co *c = luaL_checkudata(L, 1, WPL_THREAD_MT);
  lua_pushstring(L, names[c->state]);
  return 1;
}

/* ---- parking on futures, time and blocking calls --------------------- */

/* [-1, +0, m] Adds the waiter at the top of L to f's list, watching f. */
static void watch_add(wpool_host *h, lua_State *L, wp_future *f) {
  int fresh;
  lua_pushlightuserdata(L, f);
  list_of(L, &watch_key, 0);
  fresh = lua_isnil(L, -1);
  lua_pop(L, 1);
  lua_pushlightuserdata(L, f);
  list_of(L, &watch_key, 1);
  lua_insert(L, -2);
  list_append(L, -2);
  lua_pop(L, 1);
  if (fresh) { /* no Lua call from here on */
    h->nwatched++;
    update_async_ref(h);
    wp_future_retain(f);
    atomic_fetch_add(&h->mb->refs, 1);
    if (wp_future_on_done(f, future_done_cb, h->mb) != 0) {
      wp_future_release(f);
      mailbox_release(h->mb);
      h->nwatched--;
      update_async_ref(h);
      luaL_error(L, "not enough memory");
    }
  }
}

int wpl_host_watch(lua_State *L, wp_future *f) {
  wpool_host *h = host_of(L);
  if (h == NULL || h->closed) return 0;
  watch_add(h, L, f);
  return 1;
}

static void park_timer_cb(uv_timer_t *t);

static int start_park_timer(wpl_co *c, double seconds) {
  ptimer *pt = malloc(sizeof *pt);
  if (pt == NULL) return 0;
  uv_timer_init(c->h->loop, &pt->t);
  pt->c = c;
  if (seconds > 1e9) seconds = 1e9;
  /* From now, not from the loop's cached time; at least 1 ms so a timer
   * armed inside a timer callback waits for the next pass. */
  uv_update_time(c->h->loop);
  uv_timer_start(&pt->t, park_timer_cb, (uint64_t)fmax(1, ceil(seconds * 1000)),
                 0);
  c->timer = pt;
  return 1;
}

int wpl_host_park_future(lua_State *L, wp_future *f, double timeout) {
  wpl_co *c = co_current(L);
  if (c == NULL) return 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, c->ref);
  watch_add(c->h, L, f);
  if (timeout >= 0 && !start_park_timer(c, timeout))
    luaL_error(L, "not enough memory");
  c->f = f;
  park(c, PARK_FUTURE);
  return 1;
}

int wpl_host_park_sleep(lua_State *L, double seconds) {
  wpl_co *c = co_current(L);
  if (c == NULL) return 0;
  if (seconds <= 0) { /* just let the loop run once */
    park(c, PARK_READY);
    ready_push(c->h, c);
    return 1;
  }
  if (!start_park_timer(c, seconds)) luaL_error(L, "not enough memory");
  park(c, PARK_SLEEP);
  return 1;
}

/* Resumes c after its sleep or wait timeout.  [-0, +0, m] */
static int park_timeout_pmain(lua_State *L) {
  wpl_co *c = lua_touserdata(L, 1);
  wpool_host *h = c->h;
  if (c->parked == PARK_FUTURE) {
    lua_pushlightuserdata(L, c->f);
    list_of(L, &watch_key, 0);
    if (lua_istable(L, -1)) list_remove_ptr(L, -1, c);
    c->f = NULL;
    lua_pushboolean(c->co, 0);
    co_resume(h, c, 1, L);
  } else if (c->parked == PARK_SLEEP) {
    co_resume(h, c, 0, L);
  }
  return 0;
}

static void park_timer_cb(uv_timer_t *t) {
  ptimer *pt = (ptimer *)t;
  wpl_co *c = pt->c;
  c->timer = NULL;
  uv_close((uv_handle_t *)t, ptimer_close_cb);
  host_call(c->h, park_timeout_pmain, c);
}

static void offload_main(void *arg) {
  offload *o = arg;
  o->result = o->op(o->ud);
  mailbox_post(o->mb, MSG_OFFLOAD, o);
}

int wpl_host_park_call(lua_State *L, wp_pool *p, wpl_blocking_fn op, void *ud) {
  wpl_co *c = co_current(L);
  offload *o;
  if (c == NULL) return 0;
  if ((o = calloc(1, sizeof *o)) == NULL) luaL_error(L, "not enough memory");
  o->op = op;
  o->ud = ud;
  o->p = p;
  o->c = c;
  o->mb = c->h->mb;
  if (uv_thread_create(&o->tid, offload_main, o) != 0) {
    free(o);
    return 0; /* no thread: block instead */
  }
  o->next = c->h->offloads;
  c->h->offloads = o;
  update_async_ref(c->h);
  park(c, PARK_CALL);
  return 1;
}

/* ---- delivering completions ------------------------------------------ */

/* [-0, +n, e] Pushes the arguments of an on_done callback for the ended
 * future at 1 (light userdata): ok, then the results or the reason.
 * Raises when a result cannot be decoded in this state. */
static int done_args_pmain(lua_State *L) {
  wp_future *f = lua_touserdata(L, 1);
  int nres;
  lua_settop(L, 0);
  lua_pushboolean(L, wp_future_status(f) == WP_OK);
  switch (wp_future_status(f)) {
  case WP_OK:
  case WP_ERROR:
    nres = wp_future_push(f, L);
    if (nres < 1 && wp_future_status(f) == WP_ERROR)
      lua_pushliteral(L, "task failed");
    break;
  case WP_DISCARDED:
    lua_pushliteral(L, "discarded");
    break;
  case WP_TIMEOUT:
    lua_pushliteral(L, "timeout");
    break;
  default:
    lua_pushliteral(L, "cancelled");
  }
  return lua_gettop(L);
}

/* [-0, +0, m] Resumes the waiters of a future that ended.  Each on_done
 * callback gets its results decoded in a protected call: one that cannot
 * be decoded here gives that callback false and the decode error, and the
 * other waiters are still woken (a waiting f:wait raises that error). */
static int deliver_future_pmain(lua_State *L) {
  wp_future *f = lua_touserdata(L, 1);
  wpool_host *h = host_of(L);
  lua_Integer i, n;
  int list;
  lua_pushlightuserdata(L, f);
  list_of(L, &watch_key, 0);
  list = lua_gettop(L);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &watch_key);
  lua_pushlightuserdata(L, f);
  lua_pushnil(L);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  if (!lua_istable(L, list)) return 0;
  n = (lua_Integer)lua_rawlen(L, list);
  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, list, i);
    if (lua_isfunction(L, -1)) { /* an on_done callback */
      int top = lua_gettop(L), nargs;
      lua_pushcfunction(L, done_args_pmain);
      lua_pushlightuserdata(L, f);
      if (lua_pcall(L, 1, LUA_MULTRET, 0) != LUA_OK) {
        lua_pushboolean(L, 0);
        lua_insert(L, -2); /* false, the decode error */
      }
      nargs = lua_gettop(L) - top;
      co_resume(h, co_new(h, L, nargs), nargs, L);
      lua_settop(L, top - 1);
    } else {
      wpl_co *c = lua_touserdata(L, -1);
      lua_pop(L, 1);
      if (c && c->parked == PARK_FUTURE && c->f == f) {
        unpark_timer(c);
        c->f = NULL;
        lua_pushboolean(c->co, 1);
        co_resume(h, c, 1, L);
      }
    }
  }
  return 0;
}

/* [-0, +0, m] Resumes the coroutine whose blocking call returned. */
static int deliver_offload_pmain(lua_State *L) {
  offload *o = lua_touserdata(L, 1);
  lua_pushinteger(o->c->co, o->result);
  co_resume(o->c->h, o->c, 1, L);
  return 0;
}

static void deliver(wpool_host *h, struct msg *m) {
  if (m->kind == MSG_FUTURE) {
    wp_future *f = m->ptr;
    h->nwatched--;
    host_call(h, deliver_future_pmain, f);
    wp_future_release(f);
  } else {
    offload *o = m->ptr, **pp;
    uv_thread_join(&o->tid);
    for (pp = &h->offloads; *pp != o; pp = &(*pp)->next)
      ;
    *pp = o->next;
    host_call(h, deliver_offload_pmain, o);
    free(o);
  }
}

static void async_cb(uv_async_t *a) {
  wpool_host *h = a->data;
  mailbox *mb = h->mb;
  struct msg *v;
  size_t n, i;
  uv_mutex_lock(&mb->mu);
  v = mb->v;
  n = mb->n;
  mb->v = NULL;
  mb->n = mb->cap = 0;
  uv_mutex_unlock(&mb->mu);
  for (i = 0; i < n; i++)
    deliver(h, &v[i]);
  free(v);
  update_async_ref(h);
}

/* [-0, +0, m] Resumes every coroutine queued by ready_push. */
static int run_ready_pmain(lua_State *L) {
  wpool_host *h = lua_touserdata(L, 1);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &ready_key);
  lua_newtable(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &ready_key);
  resume_all(h, L, lua_gettop(L), 1 << PARK_NONE | 1 << PARK_READY);
  return 0;
}

static void idle_cb(uv_idle_t *idle) {
  wpool_host *h = idle->data;
  uv_idle_stop(idle);
  host_call(h, run_ready_pmain, h);
}

/* ---- luv on the host loop, and await --------------------------------- */

/* [-1, +1, m] Message handler: the error (another value by its
 * __tostring) with a traceback. */
static int traceback_msgh(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) msg = luaL_tolstring(L, 1, NULL);
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* [-0, +0, e] Closes every luv handle still open (found through the
 * registry, where luv keeps each open handle), so that the loop run after
 * wpool_host_close ends even when the script left a server listening. */
static int close_luv_pmain(lua_State *L) {
  static const char closer[] =
      "local reg, open = ..., {}\n"
      "for _, v in pairs(reg) do\n"
      "  local mt = type(v) == 'userdata' and getmetatable(v)\n"
      "  local name = type(mt) == 'table' and rawget(mt, '__name')\n"
      "  if type(name) == 'string' and name:match('^uv_') then\n"
      "    local ok, closing = pcall(function() return v:is_closing() end)\n"
      "    if ok and closing == false then open[#open + 1] = v end\n"
      "  end\n"
      "end\n"
      "for _, v in ipairs(open) do pcall(v.close, v) end\n";
  if (luaL_loadbuffer(L, closer, sizeof closer - 1, "=close_luv") != LUA_OK)
    return lua_error(L);
  lua_pushvalue(L, LUA_REGISTRYINDEX);
  lua_call(L, 1, 0);
  return 0;
}

/* luv's callback runner (luv_set_callback): an error in a luv callback is
 * logged as coroutine.error with its traceback, instead of luv's default
 * of printing it and exiting the process.  Returns what luv expects: the
 * number of results, or a negative status. */
static int luv_callback_pcall(lua_State *L, int nargs, int nresults,
                              int flags) {
  int base = lua_gettop(L) - nargs, st; /* base: the function */
  (void)flags;
  lua_pushcfunction(L, traceback_msgh);
  lua_insert(L, base);
  st = lua_pcall(L, nargs, nresults, base);
  if (st != LUA_OK) {
    const char *msg = lua_tostring(L, -1);
    wpl_log(
        WPL_ERROR, "coroutine.error",
        json_pack("{s:o}", "error",
                  wpl_json_str(msg ? msg : "(error object is not a string)")));
    lua_settop(L, base - 1);
    return -st;
  }
  lua_remove(L, base);
  return nresults == LUA_MULTRET ? lua_gettop(L) - base + 1 : nresults;
}

/* [-0, +1, e] luaopen for package.loaded.luv: luv bound to the host loop. */
static int open_luv(lua_State *L) {
  wpool_host *h = lua_touserdata(L, lua_upvalueindex(1));
  luv_set_loop(L, h->loop);
  luv_set_callback(L, luv_callback_pcall);
  return luaopen_luv(L);
}

/* One workerpool.await: the callback's upvalue.  Uservalue 1: the awaiting
 * coroutine's handle while it waits, then the arguments of a callback that
 * ran before fn returned. */
typedef struct awaiter {
  wpl_co *c;
  int state; /* AWAIT_* */
} awaiter;
enum { AWAIT_CALLING, AWAIT_EARLY, AWAIT_WAITING, AWAIT_DONE };

/* The callback await passes to fn   [-0, +0, m]: resumes the awaiting
 * coroutine with its arguments; a second call is logged and ignored. */
static int await_cb(lua_State *L) {
  awaiter *aw = lua_touserdata(L, lua_upvalueindex(1));
  int n = lua_gettop(L);
  wpl_co *c = aw->c;
  switch (aw->state) {
  case AWAIT_CALLING: /* before fn returned: await returns these */
    lua_createtable(L, n, 1);
    lua_insert(L, 1);
    for (int i = n; i >= 1; i--)
      lua_rawseti(L, 1, i);
    lua_pushinteger(L, n);
    lua_setfield(L, 1, "n");
    lua_setiuservalue(L, lua_upvalueindex(1), 1);
    aw->state = AWAIT_EARLY;
    return 0;
  case AWAIT_WAITING:
    aw->state = AWAIT_DONE;
    if (c->parked != PARK_AWAIT || c->awaiter != aw || c->h->closed) return 0;
    c->awaiter = NULL;
    lua_pushnil(L);
    lua_setiuservalue(L, lua_upvalueindex(1), 1);
    luaL_checkstack(c->co, n + LUA_MINSTACK, NULL);
    lua_xmove(L, c->co, n);
    co_resume(c->h, c, n, L);
    return 0;
  default:
    lua_settop(L, 0);
    luaL_traceback(L, L,
                   "workerpool.await: the callback was called more than once; "
                   "this call was ignored",
                   1);
    wpl_log(WPL_ERROR, "coroutine.error",
            json_pack("{s:o}", "error", wpl_json_str(lua_tostring(L, -1))));
    return 0;
  }
}

/* workerpool.await(fn, ...) -> the callback's arguments   [-0, +?, e]
 * Calls fn(..., callback) and suspends the calling host coroutine until
 * callback runs. */
int wpl_await(lua_State *L) {
  wpl_co *c = co_current(L);
  int n = lua_gettop(L), st;
  awaiter *aw;
  luaL_checktype(L, 1, LUA_TFUNCTION);
  if (c == NULL)
    return luaL_error(
        L,
        "workerpool.await must be called from a host coroutine (the main "
        "script of `wpool run`, workerpool.spawn, a timer or on_done "
        "callback)%s",
        host_of(L) ? ", not a luv callback or a coroutine the script made"
                   : ": run the script with `wpool run`");
  aw = lua_newuserdatauv(L, sizeof *aw, 1);
  aw->c = c;
  aw->state = AWAIT_CALLING;
  lua_pushvalue(L, 1);
  lua_rotate(L, 2, 1); /* fn, fn, args..., aw */
  lua_pushvalue(L, -1);
  lua_pushcclosure(L, await_cb, 1); /* fn, fn, args..., aw, cb */
  lua_rotate(L, -2, 1);             /* fn, fn, args..., cb, aw */
  lua_insert(L, 2);                 /* fn, aw, fn, args..., cb */
  st = lua_pcall(L, n, 0, 0);
  if (st != LUA_OK) {
    aw->state = AWAIT_DONE; /* a later call of the callback is ignored */
    return lua_error(L);
  }
  if (aw->state == AWAIT_EARLY) {
    aw->state = AWAIT_DONE;
    lua_getiuservalue(L, 2, 1);
    lua_getfield(L, -1, "n");
    n = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    luaL_checkstack(L, n, NULL);
    for (int i = 1; i <= n; i++)
      lua_rawgeti(L, 3, i);
    return n;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, c->ref); /* kept while it waits */
  lua_setiuservalue(L, 2, 1);
  aw->state = AWAIT_WAITING;
  c->awaiter = aw;
  park(c, PARK_AWAIT);
  return lua_yield(L, 0);
}

/* ---- on_done, timers, on_shutdown ------------------------------------ */

int wpl_host_on_done(lua_State *L, wp_future *f) {
  wpool_host *h = check_host(L, "on_done");
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_pushvalue(L, 2);
  watch_add(h, L, f);
  return 0;
}

static void wtimer_release(wtimer *t) {
  if (--t->refs == 0) free(t);
}

static void wtimer_close_cb(uv_handle_t *handle) {
  wtimer_release((wtimer *)handle);
}

/* Stops an active timer and drops its callback.  [-0, +0, -] */
static void wtimer_stop(wtimer *t) {
  wpool_host *h = t->h;
  if (!t->active) return;
  t->active = 0;
  if (t->prev)
    t->prev->next = t->next;
  else
    h->timers = t->next;
  if (t->next) t->next->prev = t->prev;
  luaL_unref(h->L, LUA_REGISTRYINDEX, t->fn_ref);
  t->fn_ref = LUA_NOREF;
  uv_timer_stop(&t->t);
  uv_close((uv_handle_t *)&t->t, wtimer_close_cb);
}

static void wtimer_cb(uv_timer_t *handle);

/* every(): schedules the next tick at a fixed rate against the start time,
 * tick n at start + n * period, so lateness never accumulates: ticks that
 * came late are followed by overdue ones at once until the count catches
 * up.  Ticks more than a second (and a period) overdue, after a stall, are
 * skipped instead of fired in a burst.  libuv timers count whole
 * milliseconds of loop time: the timeout is rounded up, so a tick is never
 * early and at most about 1 ms late. */
static void wtimer_schedule(wtimer *t) {
  uv_loop_t *loop = t->t.loop;
  uint64_t now, due;
  uv_update_time(loop);
  now = uv_now(loop) * 1000000u; /* the base uv_timer_start counts from */
  t->ticks++;
  due = t->start_ns + (uint64_t)((double)t->ticks * t->period_ns);
  if (now > due && (double)(now - due) > fmax(1e9, t->period_ns)) {
    t->ticks = (uint64_t)((double)(now - t->start_ns) / t->period_ns);
    due = now;
  }
  uv_timer_start(&t->t, wtimer_cb,
                 due > now ? (due - now + 999999) / 1000000 : 0, 0);
}

/* [-0, +0, m] Runs a timer's callback in a new host coroutine. */
static int fire_pmain(lua_State *L) {
  wtimer *t = lua_touserdata(L, 1);
  wpool_host *h = t->h;
  lua_rawgeti(L, LUA_REGISTRYINDEX, t->fn_ref);
  if (t->period_ns == 0)
    wtimer_stop(t); /* after(): once */
  else
    wtimer_schedule(t); /* before the callback, which may cancel it */
  co_resume(h, co_new(h, L, 0), 0, L);
  return 0;
}

static void wtimer_cb(uv_timer_t *handle) {
  wtimer *t = (wtimer *)handle;
  host_call(t->h, fire_pmain, t);
}

/* [-0, +1, e] after/every: a timer calling fn (at 2) once or repeatedly. */
static int new_timer(lua_State *L, const char *what, int repeat) {
  wpool_host *h = check_host(L, what);
  double s = (double)luaL_checknumber(L, 1);
  uint64_t ms;
  wtimer **ud, *t;
  luaL_argcheck(L, repeat ? s > 0 : s >= 0, 1,
                repeat ? "interval must be a positive number of seconds"
                       : "delay must be a non-negative number of seconds");
  luaL_checktype(L, 2, LUA_TFUNCTION);
  if (s > 1e9) s = 1e9;
  ms = (uint64_t)ceil(s * 1000);
  if (ms == 0) ms = 1; /* see start_park_timer */
  ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = NULL;
  luaL_setmetatable(L, WPL_TIMER_MT);
  if ((t = calloc(1, sizeof *t)) == NULL)
    return luaL_error(L, "not enough memory");
  lua_pushvalue(L, 2);
  t->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* may raise: t is lost */
  t->h = h;
  t->refs = 2;
  t->active = 1;
  t->next = h->timers;
  if (h->timers) h->timers->prev = t;
  h->timers = t;
  *ud = t;
  uv_timer_init(h->loop, &t->t);
  uv_update_time(h->loop);
  if (repeat) {
    t->period_ns = fmax(s * 1e9, 1e6);
    t->start_ns = uv_now(h->loop) * 1000000u;
    wtimer_schedule(t);
  } else {
    uv_timer_start(&t->t, wtimer_cb, ms, 0);
  }
  return 1;
}

/* workerpool.after(seconds, fn) -> timer   [-0, +1, e] */
int wpl_after(lua_State *L) {
  return new_timer(L, "after", 0);
}

/* workerpool.every(seconds, fn) -> timer   [-0, +1, e] */
int wpl_every(lua_State *L) {
  return new_timer(L, "every", 1);
}

/* timer:cancel() -> boolean (it was active)   [-0, +1, e] */
static int timer_cancel(lua_State *L) {
  wtimer **ud = luaL_checkudata(L, 1, WPL_TIMER_MT);
  int was = *ud && (*ud)->active;
  if (was) wtimer_stop(*ud);
  lua_pushboolean(L, was);
  return 1;
}

/* timer:active() -> boolean   [-0, +1, e] */
static int timer_active(lua_State *L) {
  wtimer **ud = luaL_checkudata(L, 1, WPL_TIMER_MT);
  lua_pushboolean(L, *ud && (*ud)->active);
  return 1;
}

/* [-0, +0, -] The timer keeps running; only the handle goes. */
static int timer_gc(lua_State *L) {
  wtimer **ud = luaL_checkudata(L, 1, WPL_TIMER_MT);
  if (*ud) wtimer_release(*ud);
  *ud = NULL;
  return 0;
}

/* workerpool.on_shutdown(fn)   [-0, +0, e] */
int wpl_on_shutdown(lua_State *L) {
  check_host(L, "on_shutdown");
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &shutdown_key);
  lua_pushvalue(L, 1);
  list_append(L, -2);
  return 0;
}

/* ---- shutdown -------------------------------------------------------- */

/* Takes a reference to p into h->pools unless it is there already, and
 * starts stopping it (draining unless hard).  The number it discarded. */
static int add_pool(wpool_host *h, wp_pool *p, int hard) {
  int i;
  for (i = 0; i < h->npools; i++)
    if (h->pools[i] == p) return 0;
  if (h->npools == h->cap_pools) {
    int cap = h->cap_pools ? 2 * h->cap_pools : 16;
    wp_pool **v = realloc(h->pools, (size_t)cap * sizeof *v);
    if (v == NULL) return 0; /* left out of the story, not lost */
    h->pools = v;
    h->cap_pools = cap;
  }
  wp_pool_retain(p);
  h->pools[h->npools++] = p;
  return wp_pool_shutdown(p, !hard);
}

/* Takes in every pool a drain covers: the live ones, those collected under
 * the host, and those a blocking call (pool:stop_wait(), a <close>) is
 * stopping.  Returns the number discarded (only when hard). */
static int gather_pools(wpool_host *h, int hard) {
  wp_pool **live;
  offload *o;
  int i, n, got, dropped = 0;
  n = wp_pool_list(NULL, 0);
  if (n > 0 && (live = malloc((size_t)n * sizeof *live)) != NULL) {
    got = wp_pool_list(live, n);
    if (got > n) got = n;
    for (i = 0; i < got; i++) {
      dropped += add_pool(h, live[i], hard);
      wp_pool_release(live[i]); /* h->pools holds its own */
    }
    free(live);
  }
  for (i = 0; i < h->nadopted; i++)
    dropped += add_pool(h, h->adopted[i], hard);
  for (o = h->offloads; o; o = o->next)
    if (o->p) dropped += add_pool(h, o->p, hard);
  return dropped;
}

static void drain_counts(wpool_host *h, size_t *queued, int *running) {
  wp_pool_counts c;
  int i;
  *queued = 0;
  *running = 0;
  for (i = 0; i < h->npools; i++) {
    wp_pool_get_counts(h->pools[i], &c);
    *queued += c.waiting;
    *running += c.running;
  }
}

/* Joins the pools of a finished drain (all idle) and lets go of them. */
static void release_pools(wpool_host *h) {
  int i;
  for (i = 0; i < h->npools; i++) {
    wp_pool_stop_wait(h->pools[i]);
    wp_pool_release(h->pools[i]);
  }
  h->npools = 0;
}

/* Ends the drain (the story's, or the one at exit) and the loop. */
static void drain_end(wpool_host *h) {
  h->draining = 2;
  h->exit_drain = 0;
  uv_timer_stop(&h->drain_timer);
  uv_stop(h->loop);
}

static void drain_finish(wpool_host *h) {
  size_t queued;
  int running;
  drain_counts(h, &queued, &running);
  h->abandoned = running;
  if (!running) release_pools(h); /* else the process leaves them behind */
  wpl_log(h->dropped || running ? WPL_WARN : WPL_INFO, "shutdown.stopped",
          json_pack("{s:i, s:i, s:b}", "dropped", h->dropped, "abandoned",
                    running, "clean", !h->dropped && !running));
  if ((h->dropped || running) && h->exit_code == 0)
    h->exit_code = WPOOL_EXIT_DISCARDED;
  drain_end(h);
}

static void hard_stop(wpool_host *h, const char *reason) {
  size_t queued;
  int running, i;
  if (h->draining != 1) return;
  h->dropped += gather_pools(h, 1);
  drain_counts(h, &queued, &running);
  wpl_log(WPL_WARN, "shutdown.deadline_exceeded",
          json_pack("{s:s, s:f, s:I, s:i}", "reason", reason, "deadline_s",
                    h->drain_timeout, "queued", (json_int_t)queued, "running",
                    running));
  for (i = 0; i < h->npools; i++)
    h->dropped += wp_pool_shutdown(h->pools[i], 0);
  drain_finish(h);
}

static void drain_tick(uv_timer_t *t) {
  wpool_host *h = t->data;
  double now = wp_now();
  size_t queued;
  int running;
  gather_pools(h, 0); /* pool ops begun since */
  drain_counts(h, &queued, &running);
  if (queued == 0 && running == 0) {
    if (h->exit_drain) {
      release_pools(h);
      drain_end(h);
    } else {
      drain_finish(h);
    }
  } else if (h->exit_drain) {
    return; /* no deadline until a signal */
  } else if (now - h->drain_start >= h->drain_timeout) {
    hard_stop(h, "deadline");
  } else if (now - h->last_progress >= 2.0) {
    h->last_progress = now;
    wpl_log(WPL_INFO, "shutdown.progress",
            json_pack("{s:I, s:i, s:f, s:f}", "queued", (json_int_t)queued,
                      "running", running, "elapsed_s", now - h->drain_start,
                      "remaining_s",
                      h->drain_timeout - (now - h->drain_start)));
  }
}

/* Runs drain_tick every 50 ms, keeping the loop alive until drained. */
static void drain_timer_start(wpool_host *h) {
  uv_ref((uv_handle_t *)&h->drain_timer);
  uv_timer_start(&h->drain_timer, drain_tick, 0, 50);
}

/* [-0, +0, m] Starts every on_shutdown handler. */
static int run_handlers_pmain(lua_State *L) {
  wpool_host *h = lua_touserdata(L, 1);
  lua_Integer i, n;
  int list;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &shutdown_key);
  list = lua_gettop(L);
  n = (lua_Integer)lua_rawlen(L, list);
  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, list, i);
    co_resume(h, co_new(h, L, 0), 0, L);
    lua_settop(L, list); /* drop the handle */
  }
  return 0;
}

void wpool_host_shutdown(wpool_host *h, const char *why) {
  size_t queued;
  int running;
  if (h->draining || h->closed) return;
  h->draining = 1;
  h->exit_drain = 0;
  host_call(h, run_handlers_pmain, h);
  gather_pools(h, 0);
  drain_counts(h, &queued, &running);
  wpl_log(WPL_INFO, "shutdown.draining",
          json_pack("{s:s, s:i, s:I, s:i, s:f}", "reason", why, "pools",
                    h->npools, "queued", (json_int_t)queued, "running", running,
                    "deadline_s", h->drain_timeout));
  h->drain_start = h->last_progress = wp_now();
  drain_timer_start(h);
}

/* ---- signals --------------------------------------------------------- */

#define TERM_GRACE_NS 1000000000u /* a busy coroutine's time after SIGTERM */

/* The host whose loop takes SIGINT and SIGTERM, and its loop's thread. */
static wpool_host *_Atomic sig_host;
static pthread_t sig_tid;

/* Count hook armed by a signal in the running host coroutine: raises
 * "interrupted!" once h->interrupt_at has passed, and at every instruction
 * after that until the coroutine has left (co_resume removes the hook), so
 * that a pcall cannot keep the loop from the signal. */
static void interrupt_hook(lua_State *L, lua_Debug *ar) {
  wpool_host *h = atomic_load(&sig_host);
  (void)ar;
  if (h == NULL || uv_hrtime() >= h->interrupt_at) {
    lua_sethook(L, interrupt_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT,
                1);
    luaL_error(L, "interrupted!");
  }
}

/* The SIGINT/SIGTERM handler.  On the loop thread: counts the signal,
 * interrupts a busy coroutine (SIGINT or a second signal at once, a first
 * SIGTERM after TERM_GRACE_NS, so a short callback may finish) and wakes the
 * loop.  On any other thread: sends the signal on to the loop thread. */
static void on_signal(int signum) {
  int saved = errno, k = signum == SIGTERM, total;
  wpool_host *h = atomic_load(&sig_host);
  lua_State *co;
  if (h == NULL) {
    errno = saved;
    return;
  }
  if (!pthread_equal(pthread_self(), sig_tid)) {
    pthread_kill(sig_tid, signum);
    errno = saved;
    return;
  }
  total = atomic_fetch_add(&h->nsig[k], 1) + 1 + atomic_load(&h->nsig[!k]);
  if ((co = h->running) != NULL) {
    if (k && total == 1) {
      h->interrupt_at = uv_hrtime() + TERM_GRACE_NS;
      lua_sethook(co, interrupt_hook, LUA_MASKCOUNT, 1000);
    } else {
      h->interrupt_at = 0;
      lua_sethook(co, interrupt_hook,
                  LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
    }
  }
  uv_async_send(&h->sig_async);
  errno = saved;
}

/* Acts on the signals counted since the last call: the first starts the
 * shutdown story, any later one forces the hard stop. */
static void take_signals(wpool_host *h) {
  static const char *const names[2] = {"SIGINT", "SIGTERM"};
  static const char *const again[2] = {"second SIGINT", "second SIGTERM"};
  int k;
  for (k = 0; k < 2; k++) {
    while (h->nsig_seen[k] < atomic_load(&h->nsig[k])) {
      h->nsig_seen[k]++;
      if (h->draining == 0)
        wpool_host_shutdown(h, names[k]);
      else if (h->draining == 1)
        hard_stop(h, again[k]);
    }
  }
}

static void sig_async_cb(uv_async_t *a) {
  take_signals(a->data);
}

int wpool_host_handle_signals(wpool_host *h, double drain_timeout) {
  struct sigaction sa;
  wpool_host *none = NULL;
  h->drain_timeout = drain_timeout;
  if (h->signals) return 0;
  sig_tid = pthread_self();
  if (!atomic_compare_exchange_strong(&sig_host, &none, h))
    return WP_EEXISTS; /* another host has them */
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  sigaddset(&sa.sa_mask, SIGINT);
  sigaddset(&sa.sa_mask, SIGTERM);
  if (sigaction(SIGINT, &sa, &h->old_sa[0]) != 0) {
    atomic_store(&sig_host, NULL);
    return WP_ESYS;
  }
  if (sigaction(SIGTERM, &sa, &h->old_sa[1]) != 0) {
    sigaction(SIGINT, &h->old_sa[0], NULL);
    atomic_store(&sig_host, NULL);
    return WP_ESYS;
  }
  h->signals = 1;
  return 0;
}

/* [-0, +1, m] Pushes tostring of c's handle. */
static void push_co_name(lua_State *L, wpl_co *c) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, c->ref);
  luaL_tolstring(L, -1, NULL);
  lua_remove(L, -2);
}

/* [-0, +0, m] Writes to stderr what the main coroutine, still suspended
 * when nothing is left to wake it, waits for, with its traceback. */
static int stranded_pmain(lua_State *L) {
  wpool_host *h = lua_touserdata(L, 1);
  wpl_co *c = h->main, *seen[8];
  int n = 1, depth = 0, i, done = 0;
  lua_pushliteral(L, "the main script did not finish: nothing is left that "
                     "could wake it, and it waits for ");
  while (!done) {
    wpl_co *t = c->joined;
    luaL_checkstack(L, 4, NULL);
    done = 1;
    n++;
    switch (c->parked) {
    case PARK_FUTURE:
      lua_pushfstring(L, "a task of pool '%s'", wp_future_pool_name(c->f));
      break;
    case PARK_CALL:
      lua_pushliteral(L, "a blocking pool call");
      break;
    case PARK_SLEEP:
      lua_pushliteral(L, "a sleep");
      break;
    case PARK_AWAIT:
      lua_pushliteral(L, "the callback of a workerpool.await");
      break;
    case PARK_JOIN:
      for (i = 0; i < depth && seen[i] != t; i++)
        ;
      lua_pushliteral(L, "a join of ");
      if (t == h->main) {
        lua_pushliteral(L, "the main coroutine (a join cycle)");
      } else if (i < depth) {
        push_co_name(L, t);
        lua_pushliteral(L, " (a join cycle)");
        lua_concat(L, 2);
      } else if (t == NULL || depth == (int)(sizeof seen / sizeof *seen)) {
        lua_pushliteral(L, "...");
      } else {
        push_co_name(L, t);
        lua_pushliteral(L, ", which waits for ");
        n++;
        seen[depth++] = c = t;
        done = 0;
      }
      n++;
      break;
    default:
      lua_pushliteral(L, "nothing (it yielded)");
    }
  }
  lua_concat(L, n);
  luaL_traceback(L, h->main->co, lua_tostring(L, -1), 0);
  fprintf(stderr, "wpool: %s\n", lua_tostring(L, -1));
  fflush(stderr);
  return 0;
}

int wpool_host_finish(wpool_host *h) {
  if (h->closed) return h->exit_code;
  take_signals(h); /* one taken while the loop was stopping */
  if (h->draining == 0 && h->main != NULL && h->exit_code == 0) {
    host_call(h, stranded_pmain, h);
    h->exit_code = 1;
  }
  if (h->draining == 0) {
    while (h->timers) /* after an error in the main script */
      wtimer_stop(h->timers);
    h->exit_drain = 1;
    gather_pools(h, 0);
    if (h->npools == 0)
      h->exit_drain = 0;
    else
      drain_timer_start(h);
  }
  while ((h->draining == 1 || h->exit_drain) &&
         uv_run(h->loop, UV_RUN_DEFAULT) != 0)
    ;
  return h->exit_code;
}

int wpl_host_adopt(lua_State *L, wp_pool *p) {
  wpool_host *h = host_of(L);
  wp_pool **v;
  if (h == NULL || h->closed) return 0;
  v = realloc(h->adopted, (size_t)(h->nadopted + 1) * sizeof *v);
  if (v == NULL) return 0;
  h->adopted = v;
  wp_pool_shutdown(p, 1);
  h->adopted[h->nadopted++] = p;
  return 1;
}

int wpool_host_serve(wpool_host *h, const char *addr) {
  struct sigaction sa;
  if (h->http) return UV_EEXIST;
  /* A client that goes away must cost its connection, not the process. */
  if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL)
    signal(SIGPIPE, SIG_IGN);
  return wpl_http_serve(h, h->loop, addr, &h->http);
}

uv_loop_t *wpl_host_loop(lua_State *L) {
  wpool_host *h = host_of(L);
  return h && !h->closed ? h->loop : NULL;
}

int wpool_host_ready(const wpool_host *h) {
  return !h->draining && !h->closed && wp_pools_stopped() == 0;
}

int wpool_host_exit_code(const wpool_host *h) {
  return h->exit_code;
}

int wpool_host_abandoned(const wpool_host *h) {
  return h->abandoned;
}

/* ---- life cycle ------------------------------------------------------ */

static const luaL_Reg thread_methods[] = {
    {"join", thread_join}, {"status", thread_status}, {NULL, NULL}};

static const luaL_Reg timer_methods[] = {
    {"cancel", timer_cancel}, {"active", timer_active}, {NULL, NULL}};

void wpl_host_init(lua_State *L) {
  luaL_newmetatable(L, WPL_THREAD_MT);
  lua_newtable(L);
  luaL_setfuncs(L, thread_methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_newmetatable(L, WPL_TIMER_MT);
  lua_newtable(L);
  luaL_setfuncs(L, timer_methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, timer_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
}

/* [-0, +0, e] The Lua side of wpool_host_new. */
static int host_new_pmain(lua_State *L) {
  wpool_host *h = lua_touserdata(L, 1);
  luaL_requiref(L, "workerpool", luaopen_workerpool, 0);
  lua_getglobal(L, "package"); /* require "luv": luv on the host's loop */
  lua_getfield(L, -1, "loaded");
  lua_pushlightuserdata(L, h);
  lua_pushcclosure(L, open_luv, 1);
  lua_call(L, 0, 1);
  lua_setfield(L, -2, "luv");
  lua_pop(L, 2);
  lua_newtable(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &cos_key);
  lua_newtable(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &watch_key);
  lua_newtable(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &ready_key);
  lua_newtable(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &shutdown_key);
  lua_pushlightuserdata(L, h);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &host_key);
  return 0;
}

int wpool_host_new(uv_loop_t *loop, lua_State *L, wpool_host **out) {
  wpool_host *h;
  *out = NULL;
  if (host_of(L)) return WP_EEXISTS;
  if ((h = calloc(1, sizeof *h)) == NULL) return WP_ENOMEM;
  if ((h->mb = calloc(1, sizeof *h->mb)) == NULL) goto nomem;
  if (uv_mutex_init(&h->mb->mu)) goto nomem;
  atomic_init(&h->mb->refs, 1);
  atomic_init(&h->nsig[0], 0);
  atomic_init(&h->nsig[1], 0);
  h->loop = loop;
  h->L = L;
  h->drain_timeout = 25;
  if (uv_async_init(loop, &h->async, async_cb)) {
    uv_mutex_destroy(&h->mb->mu);
    goto nomem;
  }
  h->async.data = h;
  h->mb->async = &h->async;
  uv_unref((uv_handle_t *)&h->async);
  if (uv_async_init(loop, &h->sig_async, sig_async_cb)) {
    h->closed = 1;
    h->mb->async = NULL;
    mailbox_release(h->mb);
    h->nclosing = 1; /* h goes with the async handle */
    uv_close((uv_handle_t *)&h->async, host_handle_closed);
    return WP_ENOMEM;
  }
  h->sig_async.data = h;
  uv_unref((uv_handle_t *)&h->sig_async);
  uv_idle_init(loop, &h->idle);
  h->idle.data = h;
  uv_timer_init(loop, &h->drain_timer);
  h->drain_timer.data = h;
  uv_unref((uv_handle_t *)&h->drain_timer);
  lua_pushcfunction(L, host_new_pmain);
  lua_pushlightuserdata(L, h);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
    lua_pop(L, 1);
    h->closed = 1;
    h->mb->async = NULL;
    mailbox_release(h->mb);
    h->nclosing = 4;
    uv_close((uv_handle_t *)&h->async, host_handle_closed);
    uv_close((uv_handle_t *)&h->idle, host_handle_closed);
    uv_close((uv_handle_t *)&h->sig_async, host_handle_closed);
    uv_close((uv_handle_t *)&h->drain_timer, host_handle_closed);
    return WP_ENOMEM;
  }
  *out = h;
  return 0;
nomem:
  free(h->mb);
  free(h);
  return WP_ENOMEM;
}

/* [-(nargs+1), +0, m] */
static int spawn_pmain(lua_State *L) {
  wpool_host *h = host_of(L);
  int is_main = (int)lua_tointeger(L, 1);
  int nargs = lua_gettop(L) - 2;
  wpl_co *c;
  lua_remove(L, 1);
  c = co_new(h, L, nargs);
  c->is_main = is_main;
  if (is_main) h->main = c;
  co_resume(h, c, nargs, L);
  return 0;
}

int wpool_host_spawn(wpool_host *h, int nargs, int is_main) {
  lua_State *L = h->L;
  int fn = lua_gettop(L) - nargs;
  lua_pushcfunction(L, spawn_pmain);
  lua_insert(L, fn);
  lua_pushinteger(L, is_main);
  lua_insert(L, fn + 1);
  if (lua_pcall(L, nargs + 2, 0, 0) != LUA_OK) {
    lua_pop(L, 1);
    return WP_ENOMEM;
  }
  return 0;
}

/* [-0, +0, -] Stops every parked coroutine's timer. */
static int close_parks_pmain(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &cos_key);
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    unpark_timer(lua_touserdata(L, -1));
    lua_pop(L, 1);
  }
  return 0;
}

static void host_handle_closed(uv_handle_t *handle) {
  wpool_host *h = handle->data;
  if (--h->nclosing == 0) free(h);
}

void wpool_host_close(wpool_host *h) {
  lua_State *L = h->L;
  mailbox *mb = h->mb;
  struct msg *v;
  size_t n, i;
  offload *o;
  if (h->closed) return;
  if (h->signals) { /* signals get their former handlers back */
    atomic_store(&sig_host, NULL);
    sigaction(SIGINT, &h->old_sa[0], NULL);
    sigaction(SIGTERM, &h->old_sa[1], NULL);
    h->signals = 0;
  }
  /* Nothing more arrives from other threads. */
  uv_mutex_lock(&mb->mu);
  mb->async = NULL;
  v = mb->v;
  n = mb->n;
  mb->v = NULL;
  mb->n = mb->cap = 0;
  uv_mutex_unlock(&mb->mu);
  for (i = 0; i < n; i++)
    if (v[i].kind == MSG_FUTURE) wp_future_release(v[i].ptr);
  free(v);
  while ((o = h->offloads) != NULL) {
    h->offloads = o->next;
    uv_thread_join(&o->tid);
    free(o);
  }
  host_call(h, close_luv_pmain, h); /* luv handles the script left open */
  while (h->timers)
    wtimer_stop(h->timers);
  wpl_http_close(h->http);
  h->http = NULL;
  host_call(h, close_parks_pmain, h);
  h->closed = 1;
  for (i = 0; i < (size_t)h->npools; i++)
    wp_pool_release(h->pools[i]);
  free(h->pools);
  h->pools = NULL;
  for (i = 0; i < (size_t)h->nadopted; i++) {
    wp_pool_stop_wait(h->adopted[i]); /* finish their drains */
    wp_pool_release(h->adopted[i]);
  }
  free(h->adopted);
  h->adopted = NULL;
  lua_pushnil(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &host_key);
  mailbox_release(mb);
  /* h is freed when the last of its handles has closed. */
  h->nclosing = 4;
  uv_close((uv_handle_t *)&h->sig_async, host_handle_closed);
  uv_close((uv_handle_t *)&h->async, host_handle_closed);
  uv_close((uv_handle_t *)&h->idle, host_handle_closed);
  uv_close((uv_handle_t *)&h->drain_timer, host_handle_closed);
}
