/*
 * wpool_host.h: embedding wpool in a program that owns a libuv loop.
 *
 * A host ties one Lua state (the host state) to one uv_loop_t.  Code that
 * runs in coroutines started by the host (the main script, spawn, timers,
 * callbacks) can wait for tasks, sleep and join other coroutines: the
 * waiting coroutine is suspended and the loop keeps running.  Completions
 * reach the loop through one uv_async_t, drained in batches.
 *
 * Every function taking a wpool_host is for the loop thread only; the
 * logging settings at the end are process-wide and any thread may call
 * them.  See docs/embedding.md.
 *
 * Errors: every function that can fail returns 0 or a negative WP_E* code
 * of wpool.h (wp_strerror, wp_err_name), and no other domain.  WP_ESYS
 * means the system refused (a libuv handle, sigaction, bind, listen...),
 * and leaves errno saying why; wpool_host_strerror words both.
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
 * until wpool_host_close.  WP_EEXISTS (L already has a host), WP_ENOMEM,
 * WP_ESYS (a libuv handle could not be made), WP_EINVAL (loading the
 * module into L raised an error, L lacking the package library say: the
 * error message is then left at the top of L's stack). */
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

/* Serves GET /metrics, /healthz, /readyz and /debug/pools on addr
 * ("127.0.0.1:9100", "[::1]:9100") from the loop (docs/guards.md).  Sets
 * SIGPIPE to be ignored when it has its default action, so that a client
 * that disconnects costs only its connection.  WP_EEXISTS (already
 * serving), WP_EINVAL (a malformed address), WP_ENOMEM, WP_ESYS (errno
 * says why: EADDRINUSE...). */
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

/* The message of an error code returned by a function of this header:
 * wp_strerror's, except that for WP_ESYS it words errno ("address already
 * in use"), so call it before anything else can change errno.  Never
 * NULL. */
WP_API const char *wpool_host_strerror(int err);

/* ---- logging: process-wide, any thread -------------------------------- */

/* Levels of the JSON log lines (docs/logging.md). */
enum {
  WPOOL_LOG_DEBUG,
  WPOOL_LOG_INFO,
  WPOOL_LOG_WARN,
  WPOOL_LOG_ERROR,
  WPOOL_LOG_OFF
};

/* Lines below level are skipped.  WPOOL_LOG_OFF until set (the wpool
 * command sets WPOOL_LOG_INFO).  0 or WP_EINVAL. */
WP_API int wpool_host_set_log_level(int level);

/* The level named "debug", "info", "warn", "error" or "off", or
 * WP_EINVAL. */
WP_API int wpool_host_log_level(const char *name);

/* Appends the log lines to path from now on (NULL: back to stderr, the
 * default).  0, WP_ENOMEM or WP_ESYS (errno says why the file could not be
 * opened; the former destination stays). */
WP_API int wpool_host_set_log_file(const char *path);

/* Installs fn as the sink of the core's events (wp_event, wpool.h; NULL:
 * none), in place of the default that turns each into a JSON log line.
 * Once an embedder has called it, luaopen_workerpool never installs the
 * default again (without it, the first luaopen_workerpool of the process
 * does).  fn runs on any thread, without a pool lock held, and must not
 * block. */
WP_API void wpool_host_set_event_sink(wp_event_fn fn);

/* The default sink: writes ev as a JSON log line.  A sink of the embedder
 * may call it to keep the log. */
WP_API void wpool_host_log_event(const wp_event *ev);

/* The module's entry point, for hosts that link wpool statically. */
WP_API int luaopen_workerpool(lua_State *L);

#ifdef __cplusplus
}
#endif
#endif
