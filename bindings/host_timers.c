/*
 * host_timers.c: workerpool.after and workerpool.every: libuv timers on the
 * host loop whose callbacks run in new host coroutines, every() at a fixed
 * rate against its start time.
 */
#include <math.h>
#include <stdlib.h>

#include "host_internal.h"

static void wtimer_release(wtimer *t) {
  if (--t->refs == 0) free(t);
}

static void wtimer_close_cb(uv_handle_t *handle) {
  wtimer_release((wtimer *)handle);
}

/* Stops an active timer and drops its callback.  [-0, +0, -] */
void wpl_wtimer_stop(wtimer *t) {
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
    wpl_wtimer_stop(t); /* after(): once */
  else
    wtimer_schedule(t); /* before the callback, which may cancel it */
  wpl_co_resume(h, wpl_co_new(h, L, 0), 0, L);
  return 0;
}

static void wtimer_cb(uv_timer_t *handle) {
  wtimer *t = (wtimer *)handle;
  wpl_host_call(t->h, fire_pmain, t);
}

/* [-0, +1, e] after/every: a timer calling fn (at 2) once or repeatedly. */
static int new_timer(lua_State *L, const char *what, int repeat) {
  wpool_host *h = wpl_host_check(L, what);
  double s = (double)luaL_checknumber(L, 1);
  uint64_t ms;
  int fn_ref;
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
  lua_pushvalue(L, 2);
  fn_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* may raise: nothing owned yet */
  if ((t = calloc(1, sizeof *t)) == NULL) {
    luaL_unref(L, LUA_REGISTRYINDEX, fn_ref);
    return luaL_error(L, "not enough memory");
  }
  t->fn_ref = fn_ref;
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
  if (was) wpl_wtimer_stop(*ud);
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

static const luaL_Reg timer_methods[] = {
    {"cancel", timer_cancel}, {"active", timer_active}, {NULL, NULL}};

void wpl_host_timers_init(lua_State *L) {
  luaL_newmetatable(L, WPL_TIMER_MT);
  lua_newtable(L);
  luaL_setfuncs(L, timer_methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, timer_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
}
