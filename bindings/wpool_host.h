/*
 * wpool_host.h: embedding wpool in a program that owns a libuv loop.
 *
 * A host ties one Lua state (the host state) to one uv_loop_t.  Code that
 * runs in coroutines started by the host (the main script, spawn, timers,
 * callbacks) can wait for tasks, sleep and join other coroutines: the
 * waiting coroutine is suspended and the loop keeps running.  Completions
 * reach the loop through one uv_async_t, drained in batches.
 *
 * Every function here is for the loop thread only.  See docs/embedding.md.
 */
#ifndef WPOOL_HOST_H
#define WPOOL_HOST_H

#include <lua.h>
#include <uv.h>

#include "wpool.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Exit status of a shutdown that discarded queued tasks or abandoned
 * running ones. */
#define WPOOL_EXIT_DISCARDED 3

typedef struct wpool_host wpool_host;

/* Attaches a host to loop and L (a main state with the standard libraries
 * open): loads the workerpool module into package.loaded.  The host lives
 * until wpool_host_close.  WP_ENOMEM, WP_EEXISTS (L already has a host),
 * WP_ESYS. */
WP_API int wpool_host_new(uv_loop_t *loop, lua_State *L, wpool_host **out);

/* [-(nargs+1), +0, -] Starts the function below its nargs arguments as a
 * host coroutine, running it until it first waits.  An error in it is
 * logged with its traceback; with is_main, it also ends the loop and makes
 * the exit status 1.  Returns 0 or WP_ENOMEM. */
WP_API int wpool_host_spawn(wpool_host *h, int nargs, int is_main);

/* Makes SIGINT and SIGTERM start the shutdown story: on_shutdown handlers
 * run, every pool drains for at most drain_timeout seconds, then what is
 * left is discarded; a second signal forces the hard stop at once.  When it
 * ends, the loop is stopped.  The host installs its own handlers (with
 * sigaction; wpool_host_close puts the former ones back); a host coroutine
 * busy in Lua when a signal comes is interrupted with "interrupted!" (at
 * once for SIGINT or a second signal, after a second for a first SIGTERM).
 * Call it from the loop thread.  WP_EEXISTS (another host of the process
 * handles them), WP_ESYS. */
WP_API int wpool_host_handle_signals(wpool_host *h, double drain_timeout);

/* Call once uv_run has returned.  Reports a main coroutine still suspended
 * with nothing left to wake it (on stderr, naming what it waits for; exit
 * status 1), then drains the pools that remain (live, collected or being
 * stopped) while running the loop, so that signals are still handled: a
 * SIGINT or SIGTERM meanwhile starts the shutdown story, which bounds the
 * drain.  A signal that arrived as the loop stopped is acted on here.
 * Returns the exit status (wpool_host_exit_code). */
WP_API int wpool_host_finish(wpool_host *h);

/* Starts the same shutdown story without a signal (why names it in logs). */
WP_API void wpool_host_shutdown(wpool_host *h, const char *why);

/* Serves GET /metrics, /healthz and /readyz on addr ("127.0.0.1:9100",
 * "[::1]:9100") from the loop (docs/guards.md).  Sets SIGPIPE to be ignored
 * when it has its default action, so that a client that disconnects costs
 * only its connection.  0 or a libuv error code (UV_EADDRINUSE, UV_EINVAL
 * for a malformed address...). */
WP_API int wpool_host_serve(wpool_host *h, const char *addr);

/* Readiness as /readyz reports it: 0 once shutdown began or any pool of
 * the process stopped. */
WP_API int wpool_host_ready(const wpool_host *h);

/* 0, 1 after an error in the main coroutine, WPOOL_EXIT_DISCARDED after a
 * shutdown that dropped work. */
WP_API int wpool_host_exit_code(const wpool_host *h);

/* Running tasks a hard stop had to abandon (their workers could not be
 * joined).  A program should then exit without lua_close. */
WP_API int wpool_host_abandoned(const wpool_host *h);

/* Closes the host's handles and releases what it holds.  Run the loop once
 * more afterwards (uv_run UV_RUN_DEFAULT) so the closes complete, then
 * lua_close(L) may follow. */
WP_API void wpool_host_close(wpool_host *h);

/* The module's entry point, for hosts that link wpool statically. */
WP_API int luaopen_workerpool(lua_State *L);

#ifdef __cplusplus
}
#endif
#endif
