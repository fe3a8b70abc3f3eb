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
 */
#include <math.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "lbind.h"
#include "wpool_host.h"

#define WPL_THREAD_MT "workerpool.thread"
#define WPL_TIMER_MT "workerpool.timer"

static const char host_key = 'h', cos_key = 'c', watch_key = 'w',
                  ready_key = 'r', shutdown_key = 's';

enum { PARK_NONE, PARK_FUTURE, PARK_SLEEP, PARK_JOIN, PARK_CALL, PARK_READY };
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
  int ref;       /* registry reference to this userdata while running */
  int state;     /* CO_* */
  int parked;    /* PARK_* */
  int is_main;   /* errors end the loop */
  wp_future *f;  /* awaited future, while PARK_FUTURE */
  ptimer *timer; /* sleep or wait timeout, or NULL */
  int nres;      /* results (or 1: the error) on the thread's stack */
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
  int refs; /* the userdata's and the running timer's */
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
  /* shutdown */
  uv_signal_t sigint, sigterm;
  int signals; /* the signal handles were started */
  uv_timer_t drain_timer;
  int draining; /* 0 none, 1 draining, 2 done */
  double drain_timeout, drain_start, last_progress;
  wp_pool **pools; /* references taken when draining began */
  int npools;
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

/* [-0, +0, m] Records the end of c and wakes its joiners. */
static void co_finish(wpool_host *h, wpl_co *c, int st, int nres) {
  lua_State *L = h->L, *co = c->co;
  c->state = st == LUA_OK ? CO_DONE : CO_ERROR;
  c->nres = nres;
  if (st != LUA_OK) {
    const char *msg = lua_tostring(co, -1);
    if (msg == NULL)
      msg = lua_pushfstring(co, "(error object is a %s value)",
                            luaL_typename(co, -1));
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
  int nres, st;
  c->parked = PARK_NONE;
  h->parked_now = NULL;
  st = lua_resume(c->co, from, nargs, &nres);
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

int wpl_host_park_call(lua_State *L, wpl_blocking_fn op, void *ud) {
  wpl_co *c = co_current(L);
  offload *o;
  if (c == NULL) return 0;
  if ((o = calloc(1, sizeof *o)) == NULL) luaL_error(L, "not enough memory");
  o->op = op;
  o->ud = ud;
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

/* [-0, +0, m] Resumes the waiters of a future that ended. */
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
      int nres = 0, top = lua_gettop(L);
      lua_pushboolean(L, wp_future_status(f) == WP_OK);
      switch (wp_future_status(f)) {
      case WP_OK:
      case WP_ERROR:
        nres = wp_future_push(f, L);
        if (nres < 1 && wp_future_status(f) == WP_ERROR) {
          lua_pushliteral(L, "task failed");
          nres = 1;
        }
        break;
      case WP_DISCARDED:
        lua_pushliteral(L, "discarded");
        nres = 1;
        break;
      case WP_TIMEOUT:
        lua_pushliteral(L, "timeout");
        nres = 1;
        break;
      default:
        lua_pushliteral(L, "cancelled");
        nres = 1;
      }
      co_resume(h, co_new(h, L, nres + 1), nres + 1, L);
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

/* [-0, +0, m] Runs a timer's callback in a new host coroutine. */
static int fire_pmain(lua_State *L) {
  wtimer *t = lua_touserdata(L, 1);
  wpool_host *h = t->h;
  lua_rawgeti(L, LUA_REGISTRYINDEX, t->fn_ref);
  if (!uv_timer_get_repeat(&t->t)) wtimer_stop(t); /* after(): once */
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
  uv_timer_start(&t->t, wtimer_cb, ms, repeat ? ms : 0);
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

static void drain_finish(wpool_host *h) {
  int i;
  size_t queued;
  int running;
  drain_counts(h, &queued, &running);
  h->abandoned = running;
  for (i = 0; i < h->npools; i++) {
    if (!running) wp_pool_stop_wait(h->pools[i]); /* joins: all are idle */
    if (!running) wp_pool_release(h->pools[i]);
  }
  if (!running) {
    free(h->pools);
    h->pools = NULL;
    h->npools = 0;
  }
  wpl_log(h->dropped || running ? WPL_WARN : WPL_INFO, "shutdown.stopped",
          json_pack("{s:i, s:i, s:b}", "dropped", h->dropped, "abandoned",
                    running, "clean", !h->dropped && !running));
  if (h->dropped || running) h->exit_code = WPOOL_EXIT_DISCARDED;
  h->draining = 2;
  uv_timer_stop(&h->drain_timer);
  uv_stop(h->loop);
}

static void hard_stop(wpool_host *h, const char *reason) {
  size_t queued;
  int running, i;
  if (h->draining != 1) return;
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
  drain_counts(h, &queued, &running);
  if (queued == 0 && running == 0) {
    drain_finish(h);
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
  int running, i, n;
  if (h->draining || h->closed) return;
  h->draining = 1;
  host_call(h, run_handlers_pmain, h);
  n = wp_pool_list(NULL, 0);
  h->pools = calloc((size_t)(n + h->nadopted) + 1, sizeof *h->pools);
  h->npools = h->pools ? wp_pool_list(h->pools, n) : 0;
  if (h->npools > n) h->npools = n;
  for (i = 0; h->pools && i < h->nadopted; i++) {
    wp_pool_retain(h->adopted[i]);
    h->pools[h->npools++] = h->adopted[i];
  }
  drain_counts(h, &queued, &running);
  wpl_log(WPL_INFO, "shutdown.draining",
          json_pack("{s:s, s:i, s:I, s:i, s:f}", "reason", why, "pools",
                    h->npools, "queued", (json_int_t)queued, "running", running,
                    "deadline_s", h->drain_timeout));
  for (i = 0; i < h->npools; i++)
    wp_pool_shutdown(h->pools[i], 1);
  h->drain_start = h->last_progress = wp_now();
  uv_ref((uv_handle_t *)&h->drain_timer); /* the loop lives until drained */
  uv_timer_start(&h->drain_timer, drain_tick, 0, 50);
}

static void signal_cb(uv_signal_t *s, int signum) {
  wpool_host *h = s->data;
  if (h->draining == 0)
    wpool_host_shutdown(h, signum == SIGINT ? "SIGINT" : "SIGTERM");
  else if (h->draining == 1)
    hard_stop(h, signum == SIGINT ? "second SIGINT" : "second SIGTERM");
}

int wpool_host_handle_signals(wpool_host *h, double drain_timeout) {
  h->drain_timeout = drain_timeout;
  if (h->signals) return 0;
  if (uv_signal_init(h->loop, &h->sigint) ||
      uv_signal_init(h->loop, &h->sigterm))
    return WP_ESYS;
  h->sigint.data = h->sigterm.data = h;
  if (uv_signal_start(&h->sigint, signal_cb, SIGINT) ||
      uv_signal_start(&h->sigterm, signal_cb, SIGTERM))
    return WP_ESYS;
  uv_unref((uv_handle_t *)&h->sigint);
  uv_unref((uv_handle_t *)&h->sigterm);
  h->signals = 1;
  return 0;
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
  if (h->http) return UV_EEXIST;
  return wpl_http_serve(h, h->loop, addr, &h->http);
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
    h->nclosing = 3;
    uv_close((uv_handle_t *)&h->async, host_handle_closed);
    uv_close((uv_handle_t *)&h->idle, host_handle_closed);
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
  h->nclosing = 3 + 2 * h->signals;
  if (h->signals) {
    uv_close((uv_handle_t *)&h->sigint, host_handle_closed);
    uv_close((uv_handle_t *)&h->sigterm, host_handle_closed);
  }
  uv_close((uv_handle_t *)&h->async, host_handle_closed);
  uv_close((uv_handle_t *)&h->idle, host_handle_closed);
  uv_close((uv_handle_t *)&h->drain_timer, host_handle_closed);
}
