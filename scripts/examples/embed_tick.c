/*
 * embed_tick.c: wpool embedded in a C program that owns its event loop,
 * the way a game server would use it.
 *
 * A 60 Hz libuv timer drives the "game".  Each tick calls the Lua function
 * on_tick(n), which hands a few simulation steps to a pool of worker states
 * and returns at once; results come back on the loop thread through
 * f:on_done callbacks while the ticks go on.  After 120 ticks (two seconds)
 * the timer stops, the last results arrive, and the program prints what it
 * saw and how late the ticks ran.  Exit status 0 when every result arrived.
 * Ticks run at a fixed rate: tick n is due at start + n * 16.67 ms, so the
 * millisecond timer's rounding never accumulates.
 *
 * Build: part of the CMake build (target embed_tick), or against an install
 * (docs/embedding.md): cc embed_tick.c $(pkg-config --cflags --libs wpool)
 */
#include <stdio.h>
#include <stdlib.h>

#include <lauxlib.h>
#include <lualib.h>
#include <uv.h>

#include "wpool_host.h"

#define TICKS 120
#define TICK_HZ 60 /* a tick every 16.67 ms */
#define TASKS_PER_TICK 4

static const char script[] =
    "local workerpool = require 'workerpool'\n"
    "pool = workerpool.new{ name = 'physics', max_workers = 2, init = [[\n"
    "  function step(entity, tick)\n"
    "    local x = entity * 1000 + tick\n"
    "    for _ = 1, 2000 do x = (x * 1103515245 + 12345) % 2147483648 end\n"
    "    return entity, tick, x\n"
    "  end ]] }\n"
    "results, last = 0, {}\n"
    "function on_tick(n)\n"
    "  for e = 1, TASKS_PER_TICK do\n"
    "    pool:submit('step', e, n):on_done(function(ok, entity, tick)\n"
    "      assert(ok, entity)\n"
    "      assert(tick == n, 'a result reached the wrong callback')\n"
    "      results = results + 1\n"
    "      last[entity] = tick\n"
    "    end)\n"
    "  end\n"
    "end\n";

typedef struct game {
  uv_timer_t timer;
  wpool_host *host;
  lua_State *L;
  int ticks;
  uint64_t start;    /* loop time of the first tick, ms */
  uint64_t max_late; /* worst lateness of a tick, ms */
} game;

/* Loop time (ms) at which tick n (0-based) is due, rounded up. */
static uint64_t tick_due(const game *g, int n) {
  return g->start + ((uint64_t)n * 1000 + TICK_HZ - 1) / TICK_HZ;
}

static void on_timer(uv_timer_t *t) {
  game *g = (game *)t;
  uint64_t now = uv_now(t->loop), due;
  if (g->ticks == 0) g->start = now;
  due = tick_due(g, g->ticks);
  if (now > due && now - due > g->max_late) g->max_late = now - due;
  g->ticks++;
  lua_getglobal(g->L, "on_tick");
  lua_pushinteger(g->L, g->ticks);
  wpool_host_spawn(g->host, 1, 0); /* runs on_tick as a host coroutine */
  if (g->ticks == TICKS) {
    uv_close((uv_handle_t *)t, NULL);
    return;
  }
  uv_update_time(t->loop); /* the next tick: against the start, not now */
  now = uv_now(t->loop);
  due = tick_due(g, g->ticks);
  uv_timer_start(t, on_timer, due > now ? due - now : 0, 0);
}

int main(void) {
  uv_loop_t loop;
  game g = {0};
  long results;
  int ok;
  if (uv_loop_init(&loop) != 0) return 1;
  if ((g.L = luaL_newstate()) == NULL) return 1;
  luaL_openlibs(g.L);
  if (wpool_host_new(&loop, g.L, &g.host) != 0) return 1;
  lua_pushinteger(g.L, TASKS_PER_TICK);
  lua_setglobal(g.L, "TASKS_PER_TICK");
  if (luaL_dostring(g.L, script) != LUA_OK) {
    fprintf(stderr, "embed_tick: %s\n", lua_tostring(g.L, -1));
    return 1;
  }
  uv_timer_init(&loop, &g.timer);
  uv_timer_start(&g.timer, on_timer, 0, 0);
  uv_run(&loop, UV_RUN_DEFAULT); /* until the timer closed and all arrived */

  lua_getglobal(g.L, "results");
  results = (long)lua_tointeger(g.L, -1);
  lua_pop(g.L, 1);
  ok = results == (long)TICKS * TASKS_PER_TICK;
  printf("ticks: %d at %.2f ms, worst lateness %llu ms\n", g.ticks,
         1000.0 / TICK_HZ, (unsigned long long)g.max_late);
  printf("results received on the loop thread: %ld of %d\n", results,
         TICKS * TASKS_PER_TICK);

  wpool_host_close(g.host);
  uv_run(&loop, UV_RUN_DEFAULT);
  lua_close(g.L); /* the pool drains and stops here */
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return ok ? 0 : 1;
}
