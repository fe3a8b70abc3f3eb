/*
 * lbind.h: internal interface between the files of the `workerpool` Lua
 * module.  Only luaopen_workerpool is exported from the module; everything
 * here has hidden visibility and the wpl_ prefix.
 */
#ifndef WPOOL_LBIND_H
#define WPOOL_LBIND_H

#include <lauxlib.h>
#include <lua.h>
#include <uv.h>

#include "wpool.h"

#define WPL_HIDDEN __attribute__((visibility("hidden")))

/* Metatable names (also the __name shown in error messages). */
#define WPL_POOL_MT "workerpool.pool"
#define WPL_FUTURE_MT "workerpool.future"
/* The metatable of a detached future (wpl_future_detach). */
#define WPL_ENDED_MT "workerpool.future (ended)"
#define WPL_SHARED_MT "workerpool.shared"

/* ---- pool and future handles (lworkerpool.c) ------------------------- */

/* A field of each userdata names its class: checking an argument compares
 * its size and that pointer, with no metatable lookup. */
extern WPL_HIDDEN const char wpl_pool_class[];
extern WPL_HIDDEN const char wpl_future_class[];

typedef struct wpl_pool {
  wp_pool *p;      /* a handle reference, or NULL once collected */
  int owner;       /* made by workerpool.new: collecting it stops the pool */
  const char *cls; /* wpl_pool_class */
} wpl_pool;

/* What a future userdata holds once it was detached from its core future
 * (see wpl_future_detach): the task ended ok with these results. */
enum {
  WPL_LIVE = 0,    /* f: a reference to the core future, or NULL before
                      submit succeeded */
  WPL_ENDED_NONE,  /* no result */
  WPL_ENDED_NIL,   /* one nil */
  WPL_ENDED_FALSE, /* one boolean */
  WPL_ENDED_TRUE,
  WPL_ENDED_INT,  /* one integer, in i */
  WPL_ENDED_FLOAT /* one float, in n */
};

typedef struct wpl_future {
  union {
    wp_future *f; /* while WPL_LIVE */
    lua_Integer i;
    lua_Number n;
  };
  const char *cls;       /* wpl_future_class */
  unsigned char kind;    /* WPL_LIVE or WPL_ENDED_* */
  unsigned char tracked; /* policies' done hooks watch f: never detached */
} wpl_future;

/* Methods of pools and futures carry the metatables as upvalues: making a
 * future sets its metatable without a lookup by name.  The third is the
 * metatable of a detached future: the same methods, no __gc. */
#define WPL_FUTURE_MT_UPVALUE lua_upvalueindex(2)
#define WPL_ENDED_MT_UPVALUE lua_upvalueindex(3)

/* [-0, +0, -] When the live future userdata at idx, not tracked by
 * policies, ended ok with no result or one nil, boolean or number: keeps
 * that result in the userdata, releases the core future and gives the
 * userdata the metatable at WPL_ENDED_MT_UPVALUE, which has no __gc (the
 * collector then frees it, and lua_close passes it, without calling a
 * finalizer).  Returns 1 when it did, else 0.  Called from a function with
 * the metatables as upvalues. */
WPL_HIDDEN int wpl_future_detach(lua_State *L, int idx);
/* [-0, +n, -] Pushes the results of the detached future u; returns n. */
WPL_HIDDEN int wpl_future_results(lua_State *L, const wpl_future *u);

/* [-0, +0, v] The pool userdata at idx, or raises. */
static inline wpl_pool *wpl_topool(lua_State *L, int idx) {
  /* A light userdata has a pointer but a raw length of 0: it fails the
   * size check before its pointer is read. */
  wpl_pool *u = lua_touserdata(L, idx);
  if (u == NULL || lua_rawlen(L, idx) != sizeof *u || u->cls != wpl_pool_class)
    luaL_typeerror(L, idx, WPL_POOL_MT);
  return u;
}

/* [-0, +0, v] The live pool handle at 1 (self), or raises. */
static inline wpl_pool *wpl_checkpool(lua_State *L) {
  wpl_pool *u = wpl_topool(L, 1);
  if (u->p == NULL) luaL_error(L, "attempt to use a collected pool");
  return u;
}

/* A continuation that returns no results: for calls and yields whose
 * caller returns nothing once they end. */
WPL_HIDDEN int wpl_k_none(lua_State *L, int status, lua_KContext ctx);

/* [-0, +n, e] Pushes what waiting for the ended future f gives Lua: true
 * and its results, or false and the reason (the task's error value, or
 * the status name: "discarded", "cancelled", "timeout").  Returns n.
 * Raises when a result cannot be rebuilt in this state.  The one mapping
 * from a status to Lua values: f:wait, submit_wait and on_done use it. */
WPL_HIDDEN int wpl_push_outcome(lua_State *L, wp_future *f);

/* ---- submitting (lsubmit.c) ------------------------------------------ */

/* The pool methods submit, post, submit_wait and map (see each in
 * lsubmit.c).  They need both metatables as upvalues. */
WPL_HIDDEN int wpl_pool_submit(lua_State *L);
WPL_HIDDEN int wpl_pool_post(lua_State *L);
/* [-0, +1, m] Pushes a new function cache for the pool methods. */
WPL_HIDDEN int wpl_push_fncache(lua_State *L);
WPL_HIDDEN int wpl_pool_submit_wait(lua_State *L);
WPL_HIDDEN int wpl_pool_map(lua_State *L);

/* [-0, +0, m] Registers the shared-dictionary metatable. */
WPL_HIDDEN void wpl_shared_init(lua_State *L);

/* workerpool.shared(name [, opts]) -> dict   [-0, +1, e] */
WPL_HIDDEN int wpl_shared_open(lua_State *L);

/* Errors (docs/architecture.md, "Errors"): misuse raises; a runtime
 * failure returns nil, message, NAME, where NAME is wp_err_name of a WP_E*
 * code, or for a policy refusal wpl_refusal_name of its drop class.  Lua
 * code compares NAMEs, never messages. */

/* [-0, +0, m] Registers metatable name with gc as its __gc (a box that
 * frees what it holds). */
WPL_HIDDEN void wpl_gc_metatable(lua_State *L, const char *name,
                                 lua_CFunction gc);

/* [-0, +3, m] Pushes nil, wp_strerror(err) and wp_err_name(err); returns
 * 3, the runtime-failure return of every module function. */
WPL_HIDDEN int wpl_pusherr(lua_State *L, int err);
/* The NAME of a policy refusal of class why: "E" and the drop reason in
 * capitals, as WP_DROP_MAP spells it ("ERATE_LIMITED", "EBREAKER_OPEN",
 * "EPOLICY", ...).  Never fails. */
WPL_HIDDEN const char *wpl_refusal_name(wp_drop_reason why);

/* ---- logs (log.c) ---------------------------------------------------- */

#include <jansson.h>

enum { WPL_DEBUG, WPL_INFO, WPL_WARN, WPL_ERROR, WPL_OFF };

/* Writes one JSON line: ts, level, event, then the fields (stolen; may be
 * NULL).  Any thread; never fails. */
WPL_HIDDEN void wpl_log(int level, const char *event, json_t *fields);
WPL_HIDDEN int wpl_log_enabled(int level);
/* Level by name ("debug", "info", "warn", "error", "off"), or -1. */
WPL_HIDDEN int wpl_log_level_parse(const char *name);
/* Its lock around a fork (wpl_fork_watch). */
WPL_HIDDEN void wpl_log_atfork(int phase);
WPL_HIDDEN void wpl_log_set_level(int level);
/* Appends to path from now on (NULL: back to stderr); 0 or an errno. */
WPL_HIDDEN int wpl_log_set_file(const char *path);
WPL_HIDDEN int wpl_lua_log(lua_State *L);
/* Bytes of the valid UTF-8 sequence (RFC 3629: no overlongs, surrogates or
 * code points past U+10FFFF) at the start of s, which holds n > 0 bytes;
 * 0 when none starts there.  Any thread; no Lua. */
WPL_HIDDEN size_t wpl_utf8_len(const char *s, size_t n);
/* Whether s (n bytes) is valid UTF-8.  Any thread; no Lua. */
WPL_HIDDEN int wpl_utf8_valid(const char *s, size_t n);
/* A new JSON string of s (len bytes) with every byte that is not part of a
 * valid UTF-8 sequence replaced by '?'; NULL only out of memory.  Any
 * thread; no Lua.  wpl_json_str takes a C string (NULL gives "?"). */
WPL_HIDDEN json_t *wpl_json_text(const char *s, size_t len);
WPL_HIDDEN json_t *wpl_json_str(const char *s);
/* Turns a core event into a log line (the core's event handler). */
WPL_HIDDEN void wpl_log_event(const wp_event *ev);
/* Makes wpl_log_event the core's event sink, once per process, unless the
 * embedder chose one (wpool_host_set_event_sink).  Any thread. */
WPL_HIDDEN void wpl_log_default_sink(void);
WPL_HIDDEN int wpl_lua_set_log_level(lua_State *L);

/* ---- metrics (metrics.c) ---------------------------------------------- */

/* [-0, +1, m] pool:stats() as a table. */
WPL_HIDDEN int wpl_push_stats(lua_State *L, wp_pool *p);
/* [-0, +1, e] Every live pool's metrics, Prometheus text format, then
 * what this state's collectors add. */
WPL_HIDDEN int wpl_push_metrics(lua_State *L);
/* pool:inspect() for p.   [-0, +1, m] */
WPL_HIDDEN int wpl_push_inspect(lua_State *L, wp_pool *p);
/* Whether any live pool is wedged: tasks wait while every worker is stuck
 * or past its deadline.  Any thread; no Lua. */
WPL_HIDDEN int wpl_pools_wedged(void);
/* GET /debug/pools: every live pool's view as a JSON array, malloc'd (the
 * caller frees), or NULL out of memory.  Any thread; no Lua. */
WPL_HIDDEN char *wpl_pools_json(size_t *len);
/* workerpool.metrics_collector(name, fn | nil)   [-0, +0, e] */
WPL_HIDDEN int wpl_metrics_collector(lua_State *L);
/* The same text, malloc'd (the caller frees), or NULL out of memory.  Any
 * thread; no Lua. */
WPL_HIDDEN char *wpl_metrics_text(size_t *len);
/* [-0, +0, m] Registers the metatables metrics.c uses. */
WPL_HIDDEN void wpl_metrics_init(lua_State *L);
/* Counts one admission decision of p's policies for the tenant (NULL:
 * none): admitted, or refused for `reason` (NULL: "policy"), which also
 * counts a drop of p with its class and tenant label.  Any thread; no
 * Lua; never fails (a full dictionary loses the count). */
WPL_HIDDEN void wpl_metrics_admission(wp_pool *p, const char *tenant,
                                      int admitted, const char *reason);
/* The drop class of a policy's refusal reason: WP_DROP_RATE_LIMITED for
 * "rate_limited...", WP_DROP_CONCURRENCY for "concurrency...",
 * WP_DROP_BREAKER_OPEN for "open" and "half_open", else WP_DROP_POLICY
 * (NULL too).  Any thread; no Lua. */
WPL_HIDDEN wp_drop_reason wpl_refusal_class(const char *reason);
/* Remembers pool p (a new reference) for workerpool_pool_stopped, with
 * its tenant_label_limit; forgets an earlier pool of the same name.  Any
 * thread; no Lua. */
WPL_HIDDEN void wpl_metrics_pool_created(wp_pool *p, int tenant_label_limit);
/* Its locks around a fork; a child forgets the parent's pools. */
WPL_HIDDEN void wpl_metrics_atfork(int phase);

/* The health and metrics endpoints: http.h. */

/* ---- the host event loop (host_*.c) -------------------------------- */

/* In a coroutine run by a host loop these park the coroutine and return 1:
 * the caller must then `return lua_yieldk(L, 0, ctx, k)`, and k finds the
 * outcome on top of the stack when it is resumed (see each function).
 * Elsewhere they return 0 and the caller blocks its thread instead. */

/* Resumed with true when f ended, false on timeout.  timeout < 0: none. */
WPL_HIDDEN int wpl_host_park_future(lua_State *L, wp_future *f, double timeout);
/* Resumed with nothing once the time has passed. */
WPL_HIDDEN int wpl_host_park_sleep(lua_State *L, double seconds);
/* Runs op(ud) on a helper thread; resumed with its integer result.  p is
 * the pool that op stops or pauses (a shutdown then drains and bounds it
 * too), or NULL; the caller keeps it referenced until resumed. */
typedef int (*wpl_blocking_fn)(void *ud);
WPL_HIDDEN int wpl_host_park_call(lua_State *L, wp_pool *p, wpl_blocking_fn op,
                                  void *ud);

/* Takes over the reference to a collected owner's pool: the pool drains
 * without blocking the loop and is joined when the host closes.  Returns
 * 0 outside a host (the caller then stops the pool itself). */
WPL_HIDDEN int wpl_host_adopt(lua_State *L, wp_pool *p);

/* workerpool.in_host(): whether the calling state runs in a host loop. */
WPL_HIDDEN int wpl_in_host(lua_State *L);
/* Module functions that need a host loop (they raise without one). */
WPL_HIDDEN int wpl_spawn(lua_State *L);
WPL_HIDDEN int wpl_after(lua_State *L);
WPL_HIDDEN int wpl_every(lua_State *L);
WPL_HIDDEN int wpl_await(lua_State *L);
WPL_HIDDEN int wpl_on_shutdown(lua_State *L);
/* [-1, +0, e] In a host state, has the function at the top called (in a
 * host coroutine, with ok, results...) once f ends, and returns 1.
 * Elsewhere returns 0 and leaves the stack alone. */
WPL_HIDDEN int wpl_host_watch(lua_State *L, wp_future *f);

/* ---- policies (policy.c) --------------------------------------------- */

/* pool:use(policy) for the pool handle at 1.   [-0, +1, e] */
WPL_HIDDEN int wpl_policy_use(lua_State *L, wp_pool *p);
/* [-0, +0|1|2|3, e] Runs the admission of p's policies in this state for a
 * task with options o whose function or handler is at stack index tslot:
 * returns 0 (no policies: nothing pushed), 1 (admitted: the task table
 * pushed), -1 (refused: nil, the reason and its NAME pushed, the failure
 * return of submit; the drop is counted) or
 * 2 (degraded: a policy named a handler to run instead; it replaced the
 * task at tslot, and the reason is pushed). */
WPL_HIDDEN int wpl_policy_admit(lua_State *L, wp_pool *p, const wp_task_opts *o,
                                int tslot);
/* pool:policies() for p.   [-0, +1, e] */
WPL_HIDDEN int wpl_policy_list(lua_State *L, wp_pool *p);
/* [-0, +0, m] Marks the future userdata at fut as run degraded for the
 * refusal reason at why. */
WPL_HIDDEN void wpl_policy_mark_degraded(lua_State *L, int fut, int why);
/* [-0, +1, m] Pushes the refusal the future at fut ran degraded for, or
 * false. */
WPL_HIDDEN int wpl_policy_degraded(lua_State *L, int fut);
/* [-0, +0, e] After a successful submit: arranges for every policy's done
 * to run, on this state's thread, when the future at fut ends; task is the
 * index of the task table. */
WPL_HIDDEN void wpl_policy_track(lua_State *L, wp_pool *p, int task, int fut);
/* [-0, +0, e] After a failed submit: gives back what the policies took. */
WPL_HIDDEN void wpl_policy_undo(lua_State *L, wp_pool *p, int task);
/* [-0, +0, e] Runs the done hooks of f (ended) now, if this state tracks
 * it outside a host; waiting for a task makes its hooks run before the
 * wait returns. */
WPL_HIDDEN void wpl_policy_finish(lua_State *L, wp_future *f);
/* [-0, +0, e] Runs the done hooks of tasks that ended, outside a host. */
WPL_HIDDEN void wpl_policy_poll(lua_State *L);
/* [-0, +0, m] Registers what policy.c needs in a state. */
WPL_HIDDEN void wpl_policy_init(lua_State *L);
/* Its lock around a fork; a child forgets the parent's pools. */
WPL_HIDDEN void wpl_policy_atfork(int phase);
/* [-0, +1, m] Pushes a borrowed handle to p (a new reference). */
WPL_HIDDEN void wpl_push_borrowed(lua_State *L, wp_pool *p);

/* f:on_done(cb) for the future userdata at 1 holding f.  [-0, +0, e] */
WPL_HIDDEN int wpl_host_on_done(lua_State *L, wp_future *f);
/* [-(n+1), +0, e] f:on_done(cb) for a future that ended without a core
 * future: runs cb (below the n values at the top) with those values in a
 * new host coroutine on the loop's next pass. */
WPL_HIDDEN int wpl_host_on_done_ended(lua_State *L, int n);
/* [-0, +0, m] Registers the metatables the host files use. */
WPL_HIDDEN void wpl_host_init(lua_State *L);
/* The loop of L's host, or NULL when L's state has none (a worker state,
 * plain lua5.4).  Loop thread. */
WPL_HIDDEN uv_loop_t *wpl_host_loop(lua_State *L);

/* Redis (lredis.c): [-0, +0, m] sets the redis.* functions in the module
 * table at the top; wpl_redis_down: 1 while some Redis client of the
 * process is disconnected (/readyz answers 503).  Any thread. */
WPL_HIDDEN void wpl_redis_open(lua_State *L);
WPL_HIDDEN int wpl_redis_down(void);
/* Its lock around a fork. */
WPL_HIDDEN void wpl_redis_atfork(int phase);

#endif
