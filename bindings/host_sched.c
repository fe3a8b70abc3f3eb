/*
 * host_sched.c: the coroutine scheduler of a host.  Coroutines started by
 * the host (the main script, workerpool.spawn, timer and on_done
 * callbacks) are "host coroutines".  When one calls a waiting function,
 * the function records what it waits for ("parks" it) and yields; the
 * event that it waited for resumes it: a future's completion (delivered
 * by the loop's mailbox), a timer, a blocking call run on a helper thread,
 * a joined coroutine, or the callback of workerpool.await.  Every entry
 * into Lua from a loop callback goes through lua_pcall (wpl_host_call), so
 * an error in a callback is logged and the loop goes on.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "host_internal.h"

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

/* The host coroutine running in L, or NULL when L cannot be parked. */
static wpl_co *co_current(lua_State *L) {
  wpool_host *h = wpl_host_of(L);
  wpl_co *c;
  if (h == NULL || h->closed || L == h->L || !lua_isyieldable(L)) return NULL;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &wpl_cos_key);
  lua_pushthread(L);
  lua_rawget(L, -2);
  c = lua_touserdata(L, -1);
  lua_pop(L, 2);
  return c;
}

/* ---- running coroutines ---------------------------------------------- */

static void resume_all(wpool_host *h, lua_State *L, int list, int mask);
static void idle_cb(uv_idle_t *idle);

/* [-0, +0, m] Queues c to be resumed on the next loop iteration. */
static void ready_push(wpool_host *h, wpl_co *c) {
  lua_State *L = h->L;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &wpl_ready_key);
  lua_rawgeti(L, LUA_REGISTRYINDEX, c->ref);
  wpl_list_append(L, -2);
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
  /* Nothing made room on co's stack since it died: room for the message
   * and for luaL_traceback after it. */
  if (!lua_checkstack(co, LUA_MINSTACK)) luaL_error(L, "not enough memory");
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
  if (c->is_handler) {
    c->is_handler = 0;
    h->handlers--;
  }
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
  lua_rawgetp(L, LUA_REGISTRYINDEX, &wpl_cos_key);
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
      wpl_co_resume(h, c, 0, L);
  }
}

void wpl_co_resume(wpool_host *h, wpl_co *c, int nargs, lua_State *from) {
  lua_State *outer = h->running;
  int nres, st;
  c->parked = PARK_NONE;
  c->joined = NULL;
  h->parked_now = NULL;
  h->running = c->co;
  st = lua_resume(c->co, from, nargs, &nres);
  h->running = outer;
  if (lua_gethook(c->co) == wpl_host_interrupt_hook) {
    /* The signal's interrupt now concerns whoever runs next, if anyone. */
    int mask = lua_gethookmask(c->co), count = lua_gethookcount(c->co);
    lua_sethook(c->co, NULL, 0, 0);
    if (outer) lua_sethook(outer, wpl_host_interrupt_hook, mask, count);
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
wpl_co *wpl_co_new(wpool_host *h, lua_State *L, int nargs) {
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
  lua_rawgetp(L, LUA_REGISTRYINDEX, &wpl_cos_key);
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
  wpool_host *h = wpl_host_check(L, "spawn");
  wpl_co *c;
  int nargs = lua_gettop(L) - 1;
  luaL_checktype(L, 1, LUA_TFUNCTION);
  c = wpl_co_new(h, L, nargs);
  lua_pushvalue(L, 1); /* keep the handle: resuming may finish it */
  wpl_co_resume(h, c, nargs, L);
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
  wpl_list_append(L, -2);
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
  wpl_list_of(L, &wpl_watch_key, 0);
  fresh = lua_isnil(L, -1);
  lua_pop(L, 1);
  lua_pushlightuserdata(L, f);
  wpl_list_of(L, &wpl_watch_key, 1);
  lua_insert(L, -2);
  wpl_list_append(L, -2);
  lua_pop(L, 1);
  if (fresh) { /* no Lua call from here on */
    h->nwatched++;
    wpl_host_update_ref(h);
    if (wpl_mailbox_watch(h->mb, f) != 0) {
      h->nwatched--;
      wpl_host_update_ref(h);
      luaL_error(L, "not enough memory");
    }
  }
}

int wpl_host_watch(lua_State *L, wp_future *f) {
  wpool_host *h = wpl_host_of(L);
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
    wpl_list_of(L, &wpl_watch_key, 0);
    if (lua_istable(L, -1)) wpl_list_remove_ptr(L, -1, c);
    c->f = NULL;
    lua_pushboolean(c->co, 0);
    wpl_co_resume(h, c, 1, L);
  } else if (c->parked == PARK_SLEEP) {
    wpl_co_resume(h, c, 0, L);
  }
  return 0;
}

static void park_timer_cb(uv_timer_t *t) {
  ptimer *pt = (ptimer *)t;
  wpl_co *c = pt->c;
  c->timer = NULL;
  uv_close((uv_handle_t *)t, ptimer_close_cb);
  wpl_host_call(c->h, park_timeout_pmain, c);
}

static void offload_main(void *arg) {
  offload *o = arg;
  o->result = o->op(o->ud);
  wpl_mailbox_post(o->mb, WPL_MSG_OFFLOAD, o);
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
  wpl_host_update_ref(c->h);
  park(c, PARK_CALL);
  return 1;
}

/* ---- delivering completions ------------------------------------------ */

/* [-0, +n, e] Pushes the arguments of an on_done callback for the ended
 * future at 1 (light userdata): ok, then the results or the reason.
 * Raises when a result cannot be decoded in this state. */
static int done_args_pmain(lua_State *L) {
  wp_future *f = lua_touserdata(L, 1);
  lua_settop(L, 0);
  return wpl_push_outcome(L, f);
}

/* [-0, +0, m] Resumes the waiters of a future that ended.  Each on_done
 * callback gets its results decoded in a protected call: one that cannot
 * be decoded here gives that callback false and the decode error, and the
 * other waiters are still woken (a waiting f:wait raises that error). */
static int deliver_future_pmain(lua_State *L) {
  wp_future *f = lua_touserdata(L, 1);
  wpool_host *h = wpl_host_of(L);
  lua_Integer i, n;
  int list;
  lua_pushlightuserdata(L, f);
  wpl_list_of(L, &wpl_watch_key, 0);
  list = lua_gettop(L);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &wpl_watch_key);
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
      wpl_co_resume(h, wpl_co_new(h, L, nargs), nargs, L);
      lua_settop(L, top - 1);
    } else {
      wpl_co *c = lua_touserdata(L, -1);
      lua_pop(L, 1);
      if (c && c->parked == PARK_FUTURE && c->f == f) {
        unpark_timer(c);
        c->f = NULL;
        lua_pushboolean(c->co, 1);
        wpl_co_resume(h, c, 1, L);
      }
    }
  }
  return 0;
}

/* [-0, +0, m] Resumes the coroutine whose blocking call returned. */
static int deliver_offload_pmain(lua_State *L) {
  offload *o = lua_touserdata(L, 1);
  lua_pushinteger(o->c->co, o->result);
  wpl_co_resume(o->c->h, o->c, 1, L);
  return 0;
}

void wpl_host_deliver(wpool_host *h, wpl_msg *m) {
  if (m->kind == WPL_MSG_FUTURE) {
    wp_future *f = m->ptr;
    h->nwatched--;
    wpl_host_call(h, deliver_future_pmain, f);
    wp_future_release(f);
  } else {
    offload *o = m->ptr, **pp;
    uv_thread_join(&o->tid);
    for (pp = &h->offloads; *pp != o; pp = &(*pp)->next)
      ;
    *pp = o->next;
    wpl_host_call(h, deliver_offload_pmain, o);
    free(o);
  }
}

/* [-0, +0, m] Resumes every coroutine queued by ready_push. */
static int run_ready_pmain(lua_State *L) {
  wpool_host *h = lua_touserdata(L, 1);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &wpl_ready_key);
  lua_newtable(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &wpl_ready_key);
  resume_all(h, L, lua_gettop(L), 1 << PARK_NONE | 1 << PARK_READY);
  return 0;
}

static void idle_cb(uv_idle_t *idle) {
  wpool_host *h = idle->data;
  uv_idle_stop(idle);
  wpl_host_call(h, run_ready_pmain, h);
}

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
    wpl_co_resume(c->h, c, n, L);
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
 * callback runs.  When fn fails at once, luv's way (it returns nil and a
 * message without calling callback), await returns that message as the
 * callback's first argument (luv passes errors first) instead of waiting
 * for a call that never comes. */
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
        wpl_host_of(L) ? ", not a luv callback or a coroutine the script made"
                       : ": run the script with `wpool run`");
  aw = lua_newuserdatauv(L, sizeof *aw, 1);
  aw->c = c;
  aw->state = AWAIT_CALLING;
  lua_pushvalue(L, 1);
  lua_rotate(L, 2, 1); /* fn, fn, args..., aw */
  lua_pushvalue(L, -1);
  lua_pushcclosure(L, await_cb, 1);     /* fn, fn, args..., aw, cb */
  lua_rotate(L, -2, 1);                 /* fn, fn, args..., cb, aw */
  lua_insert(L, 2);                     /* fn, aw, fn, args..., cb */
  st = lua_pcall(L, n, LUA_MULTRET, 0); /* fn, aw, results... */
  if (st != LUA_OK) {
    aw->state = AWAIT_DONE; /* a later call of the callback is ignored */
    return lua_error(L);
  }
  if (aw->state == AWAIT_CALLING && lua_gettop(L) >= 4 && lua_isnil(L, 3) &&
      lua_type(L, 4) == LUA_TSTRING) {
    aw->state = AWAIT_DONE; /* failed at once; a late call is ignored */
    lua_settop(L, 4);
    return 1;
  }
  lua_settop(L, 2);
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

int wpl_host_on_done(lua_State *L, wp_future *f) {
  wpool_host *h = wpl_host_check(L, "on_done");
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_pushvalue(L, 2);
  watch_add(h, L, f);
  return 0;
}

/* The body of an on_done coroutine for a detached future: calls upvalue 2
 * with upvalues 3 .. 2 + upvalue 1.   [-0, +0, e] */
static int call_ended(lua_State *L) {
  int i, n = (int)lua_tointeger(L, lua_upvalueindex(1));
  luaL_checkstack(L, n + 1, NULL);
  for (i = 2; i <= n + 2; i++)
    lua_pushvalue(L, lua_upvalueindex(i));
  lua_callk(L, n, 0, 0, wpl_k_none);
  return 0;
}

int wpl_host_on_done_ended(lua_State *L, int n) {
  wpool_host *h = wpl_host_check(L, "on_done");
  wpl_co *c;
  lua_pushinteger(L, n);
  lua_insert(L, -(n + 2)); /* n, cb, values... */
  lua_pushcclosure(L, call_ended, n + 2);
  c = wpl_co_new(h, L, 0);
  lua_pop(L, 1); /* the handle: the ready list keeps it */
  c->parked = PARK_READY;
  ready_push(h, c);
  return 0;
}

static void push_co_name(lua_State *L, wpl_co *c) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, c->ref);
  luaL_tolstring(L, -1, NULL);
  lua_remove(L, -2);
}

/* [-0, +0, m] Writes to stderr what the main coroutine, still suspended
 * when nothing is left to wake it, waits for, with its traceback. */
int wpl_host_stranded_pmain(lua_State *L) {
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

/* [-(nargs+1), +0, m] */
static int spawn_pmain(lua_State *L) {
  wpool_host *h = wpl_host_of(L);
  int is_main = (int)lua_tointeger(L, 1);
  int nargs = lua_gettop(L) - 2;
  wpl_co *c;
  lua_remove(L, 1);
  c = wpl_co_new(h, L, nargs);
  c->is_main = is_main;
  if (is_main) h->main = c;
  wpl_co_resume(h, c, nargs, L);
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
    return WP_ENOMEM; /* spawn_pmain raises nothing but memory errors */
  }
  return 0;
}

/* [-0, +0, -] Stops every parked coroutine's timer. */
int wpl_host_close_parks_pmain(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &wpl_cos_key);
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    unpark_timer(lua_touserdata(L, -1));
    lua_pop(L, 1);
  }
  return 0;
}

static const luaL_Reg thread_methods[] = {
    {"join", thread_join}, {"status", thread_status}, {NULL, NULL}};

void wpl_host_sched_init(lua_State *L) {
  luaL_newmetatable(L, WPL_THREAD_MT);
  lua_newtable(L);
  luaL_setfuncs(L, thread_methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}
