/*
 * host_drain.c: the shutdown story and the drain at exit.  A shutdown
 * (signal or wpool_host_shutdown) runs the on_shutdown handlers, drains
 * every pool of the process for at most drain_timeout seconds, then
 * discards what is left (the hard stop) and stops the loop.  The drain
 * also waits for the on_shutdown handlers to end (a handler may sleep,
 * await a luv close, or stop a pool), within the same deadline.  When the main
 * script ends with pools still busy, wpool_host_finish drains them with
 * the loop still running, so that a signal still bounds that drain.
 */
#include <stdlib.h>

#include "host_internal.h"

int wpl_on_shutdown(lua_State *L) {
  wpl_host_check(L, "on_shutdown");
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &wpl_shutdown_key);
  lua_pushvalue(L, 1);
  wpl_list_append(L, -2);
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
  h->story = STORY_DONE;
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
          json_pack("{s:i, s:i, s:i, s:b}", "dropped", h->dropped, "abandoned",
                    running, "handlers", h->handlers, "clean",
                    !h->dropped && !running));
  if ((h->dropped || running) && h->exit_code == 0)
    h->exit_code = WPOOL_EXIT_DISCARDED;
  drain_end(h);
}

void wpl_host_hard_stop(wpool_host *h, const char *reason) {
  size_t queued;
  int running, i;
  if (h->story != STORY_DRAINING) return;
  h->dropped += gather_pools(h, 1);
  drain_counts(h, &queued, &running);
  wpl_log(WPL_WARN, "shutdown.deadline_exceeded",
          json_pack("{s:s, s:f, s:I, s:i, s:i}", "reason", reason, "deadline_s",
                    h->drain_timeout, "queued", (json_int_t)queued, "running",
                    running, "handlers", h->handlers));
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
  if (queued == 0 && running == 0 && (h->exit_drain || h->handlers == 0)) {
    if (h->exit_drain) {
      release_pools(h);
      drain_end(h);
    } else {
      drain_finish(h);
    }
  } else if (h->exit_drain) {
    return; /* no deadline until a signal */
  } else if (now - h->drain_start >= h->drain_timeout) {
    wpl_host_hard_stop(h, "deadline");
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

/* [-0, +0, m] Starts every on_shutdown handler; the drain ends only when
 * they have ended too (or at its deadline). */
static int run_handlers_pmain(lua_State *L) {
  wpool_host *h = lua_touserdata(L, 1);
  lua_Integer i, n;
  int list;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &wpl_shutdown_key);
  list = lua_gettop(L);
  n = (lua_Integer)lua_rawlen(L, list);
  for (i = 1; i <= n; i++) {
    wpl_co *c;
    lua_rawgeti(L, list, i);
    c = wpl_co_new(h, L, 0);
    c->is_handler = 1; /* the drain waits for it */
    h->handlers++;
    wpl_co_resume(h, c, 0, L);
    lua_settop(L, list); /* drop the handle */
  }
  return 0;
}

void wpool_host_shutdown(wpool_host *h, const char *why) {
  size_t queued;
  int running;
  if (h->story != STORY_NONE || h->closed) return;
  h->story = STORY_DRAINING;
  h->exit_drain = 0;
  wpl_host_call(h, run_handlers_pmain, h);
  gather_pools(h, 0);
  drain_counts(h, &queued, &running);
  wpl_log(WPL_INFO, "shutdown.draining",
          json_pack("{s:s, s:i, s:I, s:i, s:f}", "reason", why, "pools",
                    h->npools, "queued", (json_int_t)queued, "running", running,
                    "deadline_s", h->drain_timeout));
  h->drain_start = h->last_progress = wp_now();
  drain_timer_start(h);
}

int wpool_host_finish(wpool_host *h) {
  wpl_story before = h->story;
  if (h->closed) return h->exit_code;
  wpl_host_take_signals(h); /* one taken while the loop was stopping */
  if (before != STORY_DONE && h->story == STORY_DONE)
    /* A hard stop ended the story here, and its uv_stop, outside uv_run,
     * would end the caller's next run at once: this run, which finds the
     * stop flag set, runs no callback and only clears it. */
    uv_run(h->loop, UV_RUN_NOWAIT);
  if (h->story == STORY_NONE && h->main != NULL && h->exit_code == 0) {
    wpl_host_call(h, wpl_host_stranded_pmain, h);
    h->exit_code = 1;
  }
  if (h->story == STORY_NONE) {
    while (h->timers) /* after an error in the main script */
      wpl_wtimer_stop(h->timers);
    h->exit_drain = 1;
    gather_pools(h, 0);
    if (h->npools == 0)
      h->exit_drain = 0;
    else
      drain_timer_start(h);
  }
  while ((h->story == STORY_DRAINING || h->exit_drain) &&
         uv_run(h->loop, UV_RUN_DEFAULT) != 0)
    ;
  return h->exit_code;
}

int wpl_host_adopt(lua_State *L, wp_pool *p) {
  wpool_host *h = wpl_host_of(L);
  wp_pool **v;
  if (h == NULL || h->closed) return 0;
  v = realloc(h->adopted, (size_t)(h->nadopted + 1) * sizeof *v);
  if (v == NULL) return 0;
  h->adopted = v;
  wp_pool_shutdown(p, 1);
  h->adopted[h->nadopted++] = p;
  return 1;
}
