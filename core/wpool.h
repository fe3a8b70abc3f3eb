/*
 * wpool.h: the public C API of the wpool engine.
 *
 * A pool runs tasks on up to max_workers OS threads.  Every worker thread
 * owns one Lua 5.4 state for its whole life; tasks are Lua functions (sent as
 * bytecode with copied upvalues) or the names of global functions that the
 * pool's init script defines.  Values cross between states only as copies
 * owned by C: they are encoded in the sender's thread and decoded in the
 * receiver's.
 *
 * Semantics follow gammazero/workerpool: workers are started lazily, reused,
 * and reaped one at a time once idle; tasks start in FIFO order; stop()
 * discards what is queued, stop_wait() drains it.
 *
 * Conventions:
 *   - Every function returning int returns 0 on success or a negative WP_E*
 *     code; wp_strerror() and wp_err_name() describe it.
 *   - Functions are thread-safe unless their comment says otherwise.
 *   - Functions that take a lua_State note their Lua stack effect the way
 *     the Lua manual does: [-pop, +push, x] where x is '-' (never raises),
 *     'm' (raises on memory errors only) or 'e' (may raise anything).
 *   - wp_ names are public; wp__ names (in wp_internal.h) are internal.
 */
#ifndef WPOOL_H
#define WPOOL_H

#include <stddef.h>
#include <stdint.h>

#include <lua.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define WP_API __attribute__((visibility("default")))
#else
#define WP_API
#endif

#define WP_VERSION "0.1.0"

/* Errors, generated from one list: name, message. */
#define WP_ERRNO_MAP(XX)                                                       \
  XX(STOPPED, -1, "stopped")                                                   \
  XX(NOMEM, -2, "not enough memory")                                           \
  XX(INVAL, -3, "invalid argument")                                            \
  XX(EXISTS, -4, "exists")                                                     \
  XX(TIMEDOUT, -5, "timeout")                                                  \
  XX(NOTFOUND, -6, "not found")                                                \
  XX(INIT, -7, "worker init failed")                                           \
  XX(TOOBIG, -9, "value too large")                                            \
  XX(DEADLOCK, -10, "would deadlock")                                          \
  XX(NOTNUM, -11, "not a number")                                              \
  XX(SYS, -12, "system error")                                                 \
  XX(FULL, -13, "full")                                                        \
  XX(FORKED, -14, "pool of the parent process (made before fork)")

typedef enum {
#define WP__ERR(name, code, msg) WP_E##name = (code),
  WP_ERRNO_MAP(WP__ERR)
#undef WP__ERR
} wp_errno;

/* Message and name of an error code; never NULL, never fails. */
WP_API const char *wp_strerror(int err);
WP_API const char *wp_err_name(int err);

/* Limits on values that cross states (see docs/values.md). */
#define WP_MAX_DEPTH 100        /* nesting of tables and functions */
#define WP_MAX_MSG (256u << 20) /* encoded bytes of one message */

/* ------------------------------------------------------------------ */
/* Pools                                                               */
/* ------------------------------------------------------------------ */

typedef struct wp_pool wp_pool;
typedef struct wp_future wp_future;

/* Called in every new worker state after the standard libraries are opened
 * and before the init script runs.  Runs in the worker thread inside a
 * protected call, so it may raise. */
typedef void (*wp_open_fn)(lua_State *L, void *ud);

typedef struct wp_options {
  const char *name;      /* unique per process; NULL generates "pool-N" */
  int max_workers;       /* 1 to 10000 */
  int min_workers;       /* kept warm, never reaped; 0..max_workers */
  double idle_timeout;   /* seconds before an idle worker is reaped; <0 off */
  const char *init;      /* Lua source run in every new worker, or NULL */
  size_t init_len;       /* bytes of init */
  const char *init_name; /* chunk name for init ("=init" when NULL) */
  const char *package_path;  /* copied into workers' package.path, or NULL */
  const char *package_cpath; /* copied into workers' package.cpath, or NULL */
  wp_open_fn open_state;     /* optional, see above */
  void *open_ud;
  /* Guards (docs/guards.md); 0 leaves each off.  Every duration that is
   * not 0 counts as at least WP_MIN_DURATION.  The range of each field
   * is its row in core/options.c, the same as workerpool.new's. */
  size_t queue_cap;         /* most queued tasks (to 2^40); 0: unbounded */
  int block_when_full;      /* 0: reject with WP_EFULL; 1: wait for room
                               (needs a queue_cap) */
  double submit_timeout;    /* longest wait for room, seconds; <0: none */
  double task_timeout;      /* default per-task deadline, seconds */
  double stuck_grace;       /* seconds past a deadline before a worker that
                               cannot be interrupted is declared stuck
                               (default 5) */
  double slow_task;         /* report tasks running longer, seconds */
  size_t memory_limit;      /* bytes per worker state */
  int max_tasks_per_worker; /* recycle a state after that many tasks */
  double drop_log_interval; /* seconds between drop summaries (60) */
} wp_options;

/* The shortest duration, in seconds: a positive duration (an option, a
 * task timeout) below it is rounded up to it, never down to 0 ("off"). */
#define WP_MIN_DURATION 1e-6

/* Fills opts with defaults: max_workers 1, idle_timeout 2 s, stuck_grace
 * 5 s, drop_log_interval 60 s, submit_timeout -1 (none); every other field
 * 0 or NULL. */
WP_API void wp_options_init(wp_options *opts);

/* Creates a pool and registers its name.  The first worker state is created
 * and its init script run in the calling thread, so a broken init is reported
 * here (the pool is findable by name only once this has succeeded: init
 * cannot reach its own pool): on WP_EINIT the message and traceback are written
 * to errbuf (when errlen > 0), truncated to errlen - 1 bytes.  Other failures:
 * WP_EINVAL (a field neither its default nor in its range, with the words
 * workerpool.new uses: "max_workers must be a positive integer"),
 * WP_EEXISTS (name taken), WP_ENOMEM; errbuf then says which option is
 * wrong.  The caller owns one reference to *out. */
WP_API int wp_pool_new(const wp_options *opts, wp_pool **out, char *errbuf,
                       size_t errlen);

/* Reference counting of handles.  The last release of a pool that is not
 * stopped performs stop_wait first (so it must not come from a worker of the
 * pool itself).  Futures keep the pool's memory, not its workers, alive.
 * Never fails. */
WP_API void wp_pool_retain(wp_pool *p);
WP_API void wp_pool_release(wp_pool *p);

/* Finds a live (not stopped) pool by name and returns a new reference, or
 * NULL. */
WP_API wp_pool *wp_pool_find(const char *name);

WP_API const char *wp_pool_name(const wp_pool *p);

/* Discards queued tasks (their futures resolve as WP_DISCARDED), lets running
 * tasks finish, joins every worker thread and closes its state.  Returns the
 * number discarded by this call.  Idempotent; several threads may call it at
 * once, and every caller returns only once the pool is fully stopped.
 * Returns WP_EDEADLOCK when called from a worker of p itself.
 * The guards stay on until the last worker has exited: deadlines interrupt
 * tasks, a worker stuck past its deadline + stuck_grace is abandoned (left
 * running, detached; it frees itself if it ever returns), and so is one
 * whose state takes longer than stuck_grace (at least 1 s) to close. */
WP_API int wp_pool_stop(wp_pool *p);

/* Like wp_pool_stop, but every queued task runs first.  Returns 0. */
WP_API int wp_pool_stop_wait(wp_pool *p);

/* Drains like wp_pool_stop_wait for at most `timeout` seconds (negative:
 * no limit), then stops hard as wp_pool_abort does: what is still queued is
 * discarded and running tasks are interrupted (they resolve as
 * WP_CANCELLED); a task that cannot be interrupted is abandoned after
 * stuck_grace.  A timeout of 0 is the hard stop.  Returns the number
 * discarded and, when interrupted is not NULL, stores there the number of
 * running tasks interrupted or abandoned (0 without a timeout), or
 * returns WP_EDEADLOCK from a worker of p.  Blocks until every worker has
 * exited or been abandoned. */
WP_API int wp_pool_stop_deadline(wp_pool *p, double timeout, int *interrupted);

/* wp_pool_stop_deadline(p, timeout, NULL). */
WP_API int wp_pool_stop_wait_for(wp_pool *p, double timeout);

/* Begins a stop without waiting for anything: drain (1) lets the queue run,
 * 0 discards it.  Returns the number discarded.  Any thread, a worker of p
 * included; finish with wp_pool_stop or wp_pool_stop_wait, which join. */
WP_API int wp_pool_shutdown(wp_pool *p, int drain);

/* Begins a hard stop without waiting: discards the queue like
 * wp_pool_shutdown(p, 0) and interrupts every running task the way
 * wp_future_cancel does; the watchdog abandons those still running
 * stuck_grace seconds later.  Returns the number discarded and stores in
 * *interrupted (when not NULL) the number of running tasks interrupted.
 * Any thread, a worker of p included (its own task is interrupted too);
 * finish with wp_pool_stop, which joins. */
WP_API int wp_pool_abort(wp_pool *p, int *interrupted);

/* How many pools of this process have begun stopping so far. */
WP_API int wp_pools_stopped(void);

/* Writes up to max new references to the live (not stopping) pools into
 * out and returns how many live pools there are. */
WP_API int wp_pool_list(wp_pool **out, int max);

/* Waits until every task submitted before the call has completed and all
 * workers are idle; later submissions are queued but do not start until
 * wp_pool_resume.  Returns at once on a stopped pool; WP_EDEADLOCK from a
 * worker of p.  Pausing a paused pool waits for the same condition. */
WP_API int wp_pool_pause(wp_pool *p);
WP_API void wp_pool_resume(wp_pool *p);

typedef struct wp_pool_counts {
  int stopped; /* 1 once stop or stop_wait has begun */
  int paused;
  size_t waiting; /* queued, not started */
  int running;    /* tasks executing now */
  int workers;    /* live worker states */
  int max_workers;
  size_t queue_cap;      /* 0: unbounded */
  int block_when_full;   /* submitters wait for room */
  double submit_timeout; /* how long they wait; < 0: no limit */
} wp_pool_counts;

WP_API void wp_pool_get_counts(wp_pool *p, wp_pool_counts *out);

/* Whether submitters wait for room in a full queue (on_full = "block"),
 * and how long (seconds; < 0: no limit).  Fixed at creation: no lock. */
WP_API int wp_pool_blocks_when_full(const wp_pool *p, double *timeout);

/* Changes max_workers while running: growth starts workers for queued
 * tasks at once; on shrinking, running tasks finish and the extra workers
 * then exit.  WP_EINVAL when n < 1 or n < min_workers, WP_ESTOPPED. */
WP_API int wp_pool_resize(wp_pool *p, int n);

/* ------------------------------------------------------------------ */
/* Metrics                                                             */
/* ------------------------------------------------------------------ */

/* Histogram buckets: upper bounds 2^k ms for k = 0..WP_HIST_BUCKETS-2
 * (1 ms .. 8.192 s), the last one unbounded.  Counts are per bucket (not
 * cumulative). */
#define WP_HIST_BUCKETS 15

typedef struct wp_hist {
  uint64_t buckets[WP_HIST_BUCKETS];
  uint64_t count;
  double sum; /* seconds */
} wp_hist;

typedef struct wp_pool_stats {
  uint64_t submitted;
  uint64_t ok, error, timeout, cancelled; /* completed, by result */
  uint64_t dropped_full, dropped_stopped, /* refused or dropped */
      dropped_discarded, dropped_policy;
  uint64_t memory_limit_hits;               /* states replaced */
  uint64_t stuck_total;                     /* workers declared stuck */
  size_t queued, queued_bytes;              /* now */
  int running, workers, stuck, max_workers; /* now */
  size_t memory;                            /* bytes in worker states */
  size_t memory_max;                        /* the largest state */
  wp_hist duration;                         /* start to end */
  wp_hist dwell;                            /* submit to start */
  size_t queued_peak;                       /* most queued at once */
} wp_pool_stats;

/* A consistent-enough snapshot: counters are read without stopping the
 * pool.  Never fails. */
WP_API void wp_pool_get_stats(wp_pool *p, wp_pool_stats *out);

/* What each worker is doing now (wp_pool_inspect). */
#define WP_INSPECT_TEXT 128
typedef struct wp_worker_info {
  int id;
  int state;   /* 0 idle, 1 running, 2 stuck (abandoned past a deadline) */
  int overdue; /* its task is past its deadline, being interrupted */
  char task[WP_INSPECT_TEXT];   /* the task's name, truncated; "" none */
  char tenant[WP_INSPECT_TEXT]; /* its tenant, truncated; "" none */
  int has_task, has_tenant;     /* whether the task has a name / tenant */
  double running_s;             /* how long the task has run; 0 idle */
  uint64_t tasks_done;          /* tasks this worker ended */
  size_t memory;                /* bytes allocated by its state */
} wp_worker_info;

/* Writes up to max workers of p (in no particular order) into out, the
 * queue length into *queued and the age in seconds of the oldest queued
 * task into *oldest_s (0 when none), and returns how many workers there
 * are.  Takes p's lock briefly; no allocation.  Any thread. */
WP_API int wp_pool_inspect(wp_pool *p, wp_worker_info *out, int max,
                           size_t *queued, double *oldest_s);

/* Why a task was dropped before it ran, generated from one list: name,
 * reason (the `reason` of WP_EV_DROPPED, the label of the dropped metrics,
 * the key of pool:stats().dropped).  Its error name is "E" #name (the
 * NAME of a Lua refusal: "ERATE_LIMITED", ...).
 *   FULL          the queue was full
 *   POLICY        any policy refusal not classed below
 *   RATE_LIMITED  a rate limit; these three count as WP_DROP_POLICY in
 *   CONCURRENCY   a concurrency cap; wp_pool_stats.dropped_policy, and the
 *   BREAKER_OPEN  an open circuit breaker; summaries name them apart
 *   STOPPED       submitted to a stopped pool (counted by the pool)
 *   DISCARDED     queued, then discarded by a stop (counted by the pool) */
#define WP_DROP_MAP(XX)                                                        \
  XX(FULL, "full")                                                             \
  XX(POLICY, "policy")                                                         \
  XX(RATE_LIMITED, "rate_limited")                                             \
  XX(CONCURRENCY, "concurrency")                                               \
  XX(BREAKER_OPEN, "breaker_open")                                             \
  XX(STOPPED, "stopped")                                                       \
  XX(DISCARDED, "discarded")

typedef enum {
#define WP__DROP(name, str) WP_DROP_##name,
  WP_DROP_MAP(WP__DROP)
#undef WP__DROP
} wp_drop_reason;

/* The reason of a drop ("full", "rate_limited", ...); "unknown" for any
 * other value.  Never fails. */
WP_API const char *wp_drop_reason_name(int why);

/* Counts a task the caller gave up on before it reached the pool: refused
 * by a policy (WP_DROP_POLICY and the classes after it), or still facing a
 * full queue after waiting on its own (WP_DROP_FULL, see
 * wp_task_opts.nowait).  The pool counts WP_DROP_STOPPED and
 * WP_DROP_DISCARDED itself; callers do not pass them. */
WP_API void wp_pool_count_drop(wp_pool *p, wp_drop_reason why);

/* Like wp_pool_count_drop, and the drop summary (WP_EV_DROPPED) reports
 * it under why's own reason and tenant (NULL: none; copied, truncated to
 * 63 bytes).  The caller bounds how many distinct tenants it passes (the
 * bindings pass "other" past tenant_label_limit); past the pool's table
 * of WP_DROP_TENANT_ROWS rows per summary interval a tenant is reported
 * as "other".  Takes p's lock briefly; no allocation.  Any thread. */
#define WP_DROP_TENANT_ROWS 128
WP_API void wp_pool_count_drop_tenant(wp_pool *p, wp_drop_reason why,
                                      const char *tenant);

/* ------------------------------------------------------------------ */
/* Events                                                              */
/* ------------------------------------------------------------------ */

typedef enum {
  WP_EV_POOL_CREATED,  /* n: max_workers */
  WP_EV_POOL_RESIZED,  /* n: new max_workers, n2: old */
  WP_EV_POOL_DRAINING, /* n: queued, n2: running */
  WP_EV_POOL_DRAINED,  /* every queued task ran */
  WP_EV_POOL_STOPPED,  /* n: discarded by stop */
  WP_EV_TASK_ERROR,    /* task, message (with traceback) */
  WP_EV_TASK_SLOW,     /* task, seconds: running time so far */
  WP_EV_TASK_TIMEOUT,  /* task, seconds: its timeout */
  WP_EV_WORKER_STUCK,  /* task, worker, seconds: time past its deadline;
                          or, with message "closing its Lua state", the
                          time it has spent closing its state */
  WP_EV_MEMORY_LIMIT,  /* task, worker, n: the limit in bytes */
  WP_EV_DROPPED        /* n: tasks dropped in the last `seconds`, reason,
                          tenant (one event per reason and tenant) */
} wp_event_type;

typedef struct wp_event {
  wp_event_type type;
  const char *pool;    /* borrowed for the call */
  const char *task;    /* task name, or NULL */
  const char *message; /* error text, or NULL */
  const char *reason;  /* WP_EV_DROPPED: a reason of WP_DROP_MAP */
  int worker;          /* worker id, or 0 */
  int64_t n, n2;
  double seconds;
  const char *tenant; /* the task's tenant, or NULL */
} wp_event;

/* Installs the process-wide event sink (NULL: none).  fn is called from
 * any thread, without any pool lock held, and must not block.  Call it
 * before creating pools. */
typedef void (*wp_event_fn)(const wp_event *ev);
WP_API void wp_set_event_handler(wp_event_fn fn);

/* ------------------------------------------------------------------ */
/* Interrupts                                                          */
/* ------------------------------------------------------------------ */

/* Chooses how a running task is interrupted (deadline, cancel, hard
 * stop).  Process-wide; call it before the first wp_pool_new, which
 * fixes the choice for the life of the process.
 *   - sig > 0: the watchdog sends that signal to the worker's thread; the
 *     library installs its handler (sigaction, SA_RESTART) the first time
 *     it interrupts a task, and never restores the former one.  Choose a
 *     signal nothing else in the process uses.  The default, without a
 *     call, is SIGRTMIN+5.  A C call that the signal interrupts (EINTR)
 *     makes workerpool.sleep return early.
 *   - sig = 0: no signal at all.  Every task runs with a count hook that
 *     looks for an interrupt every 1000 Lua instructions (a small cost on
 *     tight loops); a task sleeping or blocked in C is interrupted only
 *     once it is back in Lua.
 * Returns 0; WP_EINVAL for a signal that cannot be caught (negative,
 * above SIGRTMAX, SIGKILL, SIGSTOP); WP_EEXISTS once a pool was created
 * (asking for the signal already fixed returns 0).  Thread-safe. */
WP_API int wp_set_interrupt_signal(int sig);
/* The interrupt signal: chosen, fixed or default; 0 for none. */
WP_API int wp_interrupt_signal(void);

/* ------------------------------------------------------------------ */
/* Per-task options                                                    */
/* ------------------------------------------------------------------ */

typedef struct wp_task_opts {
  const char *name;   /* for logs and metrics, or NULL (copied) */
  const char *tenant; /* for policies, or NULL (copied) */
  double timeout;     /* seconds; 0: the pool's task_timeout; <0: none */
  int nowait;         /* a full queue returns WP_EFULL at once, and the
                         refusal is not counted: the caller retries, and
                         counts a final refusal with wp_pool_count_drop */
} wp_task_opts;

/* True in a worker whose running task has been asked to stop (deadline or
 * cancel): long C calls such as sleeps should return early.  Any thread. */
WP_API int wp_interrupted(void);

/* ------------------------------------------------------------------ */
/* Values for C hosts                                                  */
/* ------------------------------------------------------------------ */

typedef enum {
  WP_TNIL,
  WP_TBOOLEAN,
  WP_TINTEGER,
  WP_TNUMBER,
  WP_TSTRING,
  WP_TOTHER /* a table or function: only Lua can read it */
} wp_type;

typedef struct wp_value {
  wp_type type;
  union {
    int b;
    int64_t i;
    double n;
    struct {
      const char *ptr; /* borrowed; not NUL-terminated */
      size_t len;
    } s;
  } u;
} wp_value;

/* ------------------------------------------------------------------ */
/* Submitting                                                          */
/* ------------------------------------------------------------------ */

/* Queues a call of the global function `handler` of the worker states with
 * C values as arguments.  Strings are copied.  On success *out holds a new
 * future reference owned by the caller (NULL out: the future is dropped).
 * Fails with WP_ESTOPPED, WP_EINVAL, WP_ENOMEM, WP_ETOOBIG, or WP_ESYS when
 * no worker thread could be started. */
WP_API int wp_submit_values(wp_pool *p, const char *handler,
                            const wp_value *args, int nargs, wp_future **out);

/* [-0, +0, e] Queues the task at stack index `task` (a string naming a
 * handler, or a Lua function) with the `nargs` values that follow it.
 * Values that cannot cross states raise a Lua error naming the argument
 * (`what` is the function name used in the message, e.g. "submit"); nothing
 * is queued then.  Returns 0 and a new future reference in *out (when out is
 * not NULL), or without raising WP_ESTOPPED, WP_ENOMEM or WP_ESYS. */
WP_API int wp_submit_lua(wp_pool *p, lua_State *L, int task, int nargs,
                         const char *what, wp_future **out);

/* Like wp_submit_lua with per-task options (opts may be NULL).  With
 * block_when_full, waits for room up to the pool's submit_timeout; returns
 * WP_EFULL when the queue stays full. */
WP_API int wp_submit_lua_opts(wp_pool *p, lua_State *L, int task, int nargs,
                              const char *what, const wp_task_opts *opts,
                              wp_future **out);

/* ------------------------------------------------------------------ */
/* Futures                                                             */
/* ------------------------------------------------------------------ */

/* The statuses of a future, generated from one list: name, Lua name.
 *   PENDING    queued or running (0)
 *   OK         returned; results available
 *   ERROR      raised; the error value is the only result
 *   DISCARDED  dropped by stop() before it started
 *   CANCELLED  cancelled: removed from the queue, or interrupted
 *   TIMEOUT    interrupted, or abandoned as stuck, at its deadline */
#define WP_STATUS_MAP(XX)                                                      \
  XX(PENDING, "pending")                                                       \
  XX(OK, "ok")                                                                 \
  XX(ERROR, "error")                                                           \
  XX(DISCARDED, "discarded")                                                   \
  XX(CANCELLED, "cancelled")                                                   \
  XX(TIMEOUT, "timeout")

typedef enum {
#define WP__STATUS(name, str) WP_##name,
  WP_STATUS_MAP(WP__STATUS)
#undef WP__STATUS
} wp_status;

/* The name of a status as Lua sees it (f:status(), a policy's done hook):
 * "pending", "ok", ...; "unknown" for any other value.  Never fails. */
WP_API const char *wp_status_name(int status);

/* Name of the pool f was submitted to; valid while f is referenced. */
WP_API const char *wp_future_pool_name(const wp_future *f);

WP_API void wp_future_retain(wp_future *f);
WP_API void wp_future_release(wp_future *f);

/* Seconds the task ran (0 if it never started, or before it ended). */
WP_API double wp_future_run_time(const wp_future *f);

/* Current status; never blocks. */
WP_API wp_status wp_future_status(wp_future *f);

/* Blocks until the task ends or `timeout` seconds pass (negative: forever).
 * Returns 0 or WP_ETIMEDOUT. */
WP_API int wp_future_wait(wp_future *f, double timeout);

/* Cancels a task: a queued one is removed and never runs; a running one
 * is interrupted at its next Lua instruction (docs/guards.md).  Returns 1
 * when the task will resolve as WP_CANCELLED (even if it returns or hits
 * its deadline before the interrupt lands), 0 when it already ended or its
 * end has begun.  Any thread. */
WP_API int wp_future_cancel(wp_future *f);

/* Calls cb(f, ud) once the future has ended: at once in the calling thread
 * when it already has, else later in whichever thread ends it (a worker, the
 * watchdog, or a thread calling stop or cancel).  Several callbacks may be
 * registered; each runs once, in registration order.  cb must not block.
 * WP_ENOMEM. */
typedef void (*wp_done_fn)(wp_future *f, void *ud);
WP_API int wp_future_on_done(wp_future *f, wp_done_fn cb, void *ud);

/* Results of an ended future as C values: writes up to max of them to out
 * and returns how many the task produced (WP_ERROR: one, the error value;
 * discarded or cancelled: one, that word), or WP_EINVAL while pending.  Strings
 * borrow from the future and stay valid while the caller holds its reference.
 */
WP_API int wp_future_values(wp_future *f, wp_value *out, int max);

/* [-0, +n, e] Pushes the results of an ended future (n values; for WP_ERROR
 * the error value; for discarded and cancelled the string "discarded" or
 * "cancelled") and returns n, or WP_EINVAL while pending.  Raises when a
 * value cannot be rebuilt here (a module this state cannot require). */
WP_API int wp_future_push(wp_future *f, lua_State *L);

/* ------------------------------------------------------------------ */
/* Worker states                                                       */
/* ------------------------------------------------------------------ */

/* In a worker state: its pool (borrowed) and its id (1, 2, ... per pool).
 * In any other state: NULL and 0.  [-0, +0, -] */
WP_API wp_pool *wp_state_pool(lua_State *L);
WP_API int wp_state_worker_id(lua_State *L);

/* Makes a C function of a library travel between states by name, as the
 * standard libraries' functions do ("lib.fn", resolved in the receiving
 * state through package.loaded).  Call before submitting tasks that
 * capture it; re-registering the same pair is a no-op.  WP_ENOMEM. */
WP_API int wp_register_cfunction(const char *qualname, lua_CFunction fn);

/* Monotonic clock in seconds. */
WP_API double wp_now(void);

/* ------------------------------------------------------------------ */
/* Shared dictionaries                                                 */
/* ------------------------------------------------------------------ */

/* A process-wide dictionary keyed by strings holding nil, booleans, numbers
 * and strings, with optional expiry.  Every operation takes the dict's lock
 * briefly and never calls Lua.  Dictionaries live until process exit. */
typedef struct wp_shdict wp_shdict;

typedef struct wp_shval {
  wp_type type; /* WP_TNIL (absent), WP_TBOOLEAN, WP_TINTEGER, WP_TNUMBER,
                   WP_TSTRING */
  union {
    int b;
    int64_t i;
    double n;
    struct {
      char *ptr; /* in results: malloc'd, caller frees; in arguments:
                    borrowed */
      size_t len;
    } s;
  } u;
} wp_shval;

#define WP_SHDICT_DEFAULT_CAPACITY (1u << 20)

/* Opens (creating on first use with `capacity` bytes; 0 means the default)
 * the dictionary `name`.  A later open ignores capacity.  The returned
 * pointer is valid for the process' life.  WP_ENOMEM, WP_EINVAL, WP_ESYS. */
WP_API int wp_shdict_open(const char *name, size_t capacity, wp_shdict **out);

/* Reads k into *out (WP_TNIL when absent or expired).  WP_ENOMEM. */
WP_API int wp_shdict_get(wp_shdict *d, const char *k, size_t klen,
                         wp_shval *out);

/* Stores v (WP_TNIL deletes) with ttl seconds (<= 0: no expiry).
 * WP_ENOMEM when it does not fit; nothing stored is lost then. */
WP_API int wp_shdict_set(wp_shdict *d, const char *k, size_t klen,
                         const wp_shval *v, double ttl);

/* Like set, only when k is absent: WP_EEXISTS otherwise. */
WP_API int wp_shdict_add(wp_shdict *d, const char *k, size_t klen,
                         const wp_shval *v, double ttl);

/* Atomically adds step to the number at k and stores the sum in *out.
 * When k is absent: with init (non-NULL) stores init + step with ttl, else
 * WP_ENOTFOUND.  A non-number value gives WP_ENOTNUM.  Integers stay
 * integers unless step or the value is a float. */
WP_API int wp_shdict_incr(wp_shdict *d, const char *k, size_t klen,
                          const wp_shval *step, const wp_shval *init,
                          double ttl, wp_shval *out);

/* Stores nv only if the current value equals old (WP_TNIL: absent); returns
 * 1 when stored, 0 when not, or WP_ENOMEM.  Keeps the key's expiry. */
WP_API int wp_shdict_cas(wp_shdict *d, const char *k, size_t klen,
                         const wp_shval *old, const wp_shval *nv);

WP_API int wp_shdict_delete(wp_shdict *d, const char *k, size_t klen);

/* Remaining seconds to live in *out (0: no expiry); WP_ENOTFOUND. */
WP_API int wp_shdict_ttl(wp_shdict *d, const char *k, size_t klen, double *out);

/* Calls fn for up to max live keys (0: all) and returns how many. The dict
 * is locked meanwhile: fn must not call back into the dict. */
typedef void (*wp_shdict_key_fn)(const char *k, size_t klen, void *ud);
WP_API int wp_shdict_keys(wp_shdict *d, size_t max, wp_shdict_key_fn fn,
                          void *ud);

/* Removes every key. */
WP_API void wp_shdict_flush(wp_shdict *d);

/* Bytes in use and capacity. */
WP_API void wp_shdict_usage(wp_shdict *d, size_t *used, size_t *capacity);

/* Frees a string held by a wp_shval result.  Never fails. */
WP_API void wp_shval_free(wp_shval *v);

#ifdef __cplusplus
}
#endif
#endif /* WPOOL_H */
