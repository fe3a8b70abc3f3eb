/*
 * host_loop.c: the host object and its loop glue: wpool_host_new and
 * wpool_host_close, the uv_async_t through which the host's wpl_mailbox
 * (mailbox.c) brings completions from other threads to the loop (drained
 * in batches: libuv merges sends), the helpers every host file uses, and the
 * small accessors of wpool_host.h.  The other concerns live next to it:
 * host_sched.c (coroutines), host_timers.c, host_drain.c (shutdown),
 * host_signals.c, host_luv.c; host_internal.h is what they share.
 */
#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "host_internal.h"

const char wpl_host_key = 'h', wpl_cos_key = 'c', wpl_watch_key = 'w',
           wpl_ready_key = 'r', wpl_shutdown_key = 's';

/* ---- helpers --------------------------------------------------------- */

wpool_host *wpl_host_of(lua_State *L) {
  wpool_host *h;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &wpl_host_key);
  h = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return h;
}

wpool_host *wpl_host_check(lua_State *L, const char *what) {
  wpool_host *h = wpl_host_of(L);
  if (h == NULL || h->closed)
    luaL_error(L,
               "workerpool.%s needs a host event loop (run the script "
               "with `wpool run`)",
               what);
  return h;
}

uv_loop_t *wpl_host_loop(lua_State *L) {
  wpool_host *h = wpl_host_of(L);
  return h && !h->closed ? h->loop : NULL;
}

/* workerpool.in_host() -> boolean   [-0, +1, -] Whether L runs inside a
 * live wpool host, where spawn, after, every and on_shutdown work. */
int wpl_in_host(lua_State *L) {
  wpool_host *h = wpl_host_of(L);
  lua_pushboolean(L, h != NULL && !h->closed);
  return 1;
}

void wpl_host_update_ref(wpool_host *h) {
  if (h->closed) return;
  if (h->nwatched > 0 || h->offloads)
    uv_ref((uv_handle_t *)&h->async);
  else
    uv_unref((uv_handle_t *)&h->async);
}

/* [-0, +1, m] Pushes list registry[key][k] (k at the top, popped),
 * creating it when create is set; pushes nil otherwise. */
void wpl_list_of(lua_State *L, const void *key, int create) {
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
void wpl_list_append(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  lua_rawseti(L, idx, (lua_Integer)lua_rawlen(L, idx) + 1);
}

/* [-0, +0, -] Removes the userdata whose pointer is p from the list at idx
 * (keeping the order). */
void wpl_list_remove_ptr(lua_State *L, int idx, const void *p) {
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
void wpl_host_call(wpool_host *h, lua_CFunction fn, void *ud) {
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

static void async_cb(uv_async_t *a) {
  wpool_host *h = a->data;
  size_t n, i;
  wpl_msg *v = wpl_mailbox_take(h->mb, &n);
  for (i = 0; i < n; i++)
    wpl_host_deliver(h, &v[i]);
  free(v);
  wpl_host_update_ref(h);
}

int wpool_host_serve(wpool_host *h, const char *addr) {
  struct sigaction sa;
  int r;
  if (h->http) return WP_EEXISTS;
  /* A client that goes away must cost its connection, not the process. */
  if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL)
    signal(SIGPIPE, SIG_IGN);
  if ((r = wpl_http_serve(h, h->loop, addr, &h->http)) == 0) return 0;
  /* libuv's codes are negated errnos here. */
  if (r == UV_EINVAL) return WP_EINVAL;
  if (r == UV_ENOMEM) return WP_ENOMEM;
  errno = -r;
  return WP_ESYS;
}

const char *wpool_host_strerror(int err) {
  /* uv_strerror words errno's text the way wp_strerror does: lower case. */
  if (err == WP_ESYS && errno > 0) return uv_strerror(-errno);
  return wp_strerror(err);
}

int wpool_host_ready(const wpool_host *h) {
  return h->story == STORY_NONE && !h->closed && wp_pools_stopped() == 0;
}

int wpool_host_exit_code(const wpool_host *h) {
  return h->exit_code;
}

int wpool_host_abandoned(const wpool_host *h) {
  return h->abandoned;
}

/* ---- life cycle ------------------------------------------------------ */

/* [-0, +0, m] Registers the metatables of the host's Lua objects. */
void wpl_host_init(lua_State *L) {
  wpl_host_sched_init(L);
  wpl_host_timers_init(L);
}

/* [-0, +0, e] The Lua side of wpool_host_new. */
static int host_new_pmain(lua_State *L) {
  wpool_host *h = lua_touserdata(L, 1);
  if (lua_getglobal(L, "package") != LUA_TTABLE)
    return luaL_error(L, "wpool_host_new: the state has no package library "
                         "(open the standard libraries first)");
  lua_pop(L, 1);
  luaL_requiref(L, "workerpool", luaopen_workerpool, 0);
  lua_getglobal(L, "package"); /* require "luv": luv on the host's loop */
  lua_getfield(L, -1, "loaded");
  lua_pushlightuserdata(L, h);
  lua_pushcclosure(L, wpl_host_open_luv, 1);
  lua_call(L, 0, 1);
  lua_setfield(L, -2, "luv");
  lua_pop(L, 2);
  lua_newtable(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &wpl_cos_key);
  lua_newtable(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &wpl_watch_key);
  lua_newtable(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &wpl_ready_key);
  lua_newtable(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &wpl_shutdown_key);
  lua_pushlightuserdata(L, h);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &wpl_host_key);
  return 0;
}

int wpool_host_new(uv_loop_t *loop, lua_State *L, wpool_host **out) {
  wpool_host *h;
  int err = WP_ESYS, st, r = 0;
  *out = NULL;
  if (wpl_host_of(L)) return WP_EEXISTS;
  if ((h = calloc(1, sizeof *h)) == NULL) return WP_ENOMEM;
  atomic_init(&h->nsig[0], 0);
  atomic_init(&h->nsig[1], 0);
  h->loop = loop;
  h->L = L;
  h->drain_timeout = 25;
  h->closed = 1; /* until everything below is in place */
  if ((r = uv_async_init(loop, &h->async, async_cb)) != 0) goto err_async;
  h->async.data = h;
  uv_unref((uv_handle_t *)&h->async);
  if ((h->mb = wpl_mailbox_new(&h->async)) == NULL) {
    err = WP_ENOMEM;
    goto err_mb;
  }
  if ((r = uv_async_init(loop, &h->sig_async, wpl_host_sig_async_cb)) != 0)
    goto err_sig;
  h->sig_async.data = h;
  uv_unref((uv_handle_t *)&h->sig_async);
  if ((r = uv_idle_init(loop, &h->idle)) != 0) goto err_idle;
  h->idle.data = h;
  if ((r = uv_timer_init(loop, &h->drain_timer)) != 0) goto err_timer;
  h->drain_timer.data = h;
  uv_unref((uv_handle_t *)&h->drain_timer);
  lua_pushcfunction(L, host_new_pmain);
  lua_pushlightuserdata(L, h);
  if ((st = lua_pcall(L, 1, 0, 0)) != LUA_OK) {
    /* A memory error, or L lacks what the module needs (package): the
     * message stays on L for the caller. */
    err = st == LUA_ERRMEM ? WP_ENOMEM : WP_EINVAL;
    if (st == LUA_ERRMEM) lua_pop(L, 1);
    goto err_lua;
  }
  h->closed = 0;
  *out = h;
  return 0;
  /* Each step undoes the one before its label; h goes with the last of
   * its handles to close (wpl_host_handle_closed). */
err_lua:
  h->nclosing++;
  uv_close((uv_handle_t *)&h->drain_timer, wpl_host_handle_closed);
err_timer:
  h->nclosing++;
  uv_close((uv_handle_t *)&h->idle, wpl_host_handle_closed);
err_idle:
  h->nclosing++;
  uv_close((uv_handle_t *)&h->sig_async, wpl_host_handle_closed);
err_sig:
  wpl_mailbox_release(h->mb);
err_mb:
  h->nclosing++;
  uv_close((uv_handle_t *)&h->async, wpl_host_handle_closed);
err_async:
  if (h->nclosing == 0) free(h);
  if (err == WP_ESYS) errno = -r; /* libuv's codes are negated errnos */
  return err;
}

void wpl_host_handle_closed(uv_handle_t *handle) {
  wpool_host *h = handle->data;
  if (--h->nclosing == 0) free(h);
}

void wpool_host_close(wpool_host *h) {
  lua_State *L = h->L;
  wpl_msg *v;
  size_t n, i;
  offload *o;
  if (h->closed) return;
  wpl_host_signals_close(h); /* their former handlers come back */
  /* Nothing more arrives from other threads. */
  wpl_mailbox_close(h->mb);
  v = wpl_mailbox_take(h->mb, &n);
  for (i = 0; i < n; i++)
    if (v[i].kind == WPL_MSG_FUTURE) wp_future_release(v[i].ptr);
  free(v);
  while ((o = h->offloads) != NULL) {
    h->offloads = o->next;
    uv_thread_join(&o->tid);
    free(o);
  }
  /* luv handles the script left open */
  wpl_host_call(h, wpl_host_close_luv_pmain, h);
  while (h->timers)
    wpl_wtimer_stop(h->timers);
  wpl_http_close(h->http);
  h->http = NULL;
  wpl_host_call(h, wpl_host_close_parks_pmain, h);
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
  lua_rawsetp(L, LUA_REGISTRYINDEX, &wpl_host_key);
  wpl_mailbox_release(h->mb);
  /* h is freed when the last of its handles has closed. */
  h->nclosing = 4;
  uv_close((uv_handle_t *)&h->sig_async, wpl_host_handle_closed);
  uv_close((uv_handle_t *)&h->async, wpl_host_handle_closed);
  uv_close((uv_handle_t *)&h->idle, wpl_host_handle_closed);
  uv_close((uv_handle_t *)&h->drain_timer, wpl_host_handle_closed);
}
