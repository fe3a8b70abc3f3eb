/*
 * wp_internal.h: what the files of core/ share and nothing outside sees.
 *
 * Lock order: the pool registry lock, then a pool's mu; a pool's done_mu
 * is a leaf and is never held with any other lock; a slab class lock
 * (slab.c) is a leaf that may be taken under a pool's mu; the function
 * store's lock (fnstore.c) is a leaf taken while submitting, outside any
 * pool's mu.  No lock is held across a Lua API call that can raise.
 */
#ifndef WPOOL_INTERNAL_H
#define WPOOL_INTERNAL_H

#include <assert.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>

#include <lauxlib.h>
#include <lua.h>
#include <uv.h>

#include "wpool.h"

#define WP_HIDDEN __attribute__((visibility("hidden")))

/* ---- byte buffers ---------------------------------------------------- */

typedef struct wp__buf {
  char *data;   /* malloc'd, the caller's storage (borrowed), or NULL */
  size_t len;   /* bytes used */
  size_t cap;   /* bytes allocated */
  int borrowed; /* data is the caller's: growing copies it to the heap */
} wp__buf;

/* A buffer that starts in the caller's storage (typically on its stack)
 * and moves to the heap only when it outgrows it. */
#define WP__BUF_ON(storage)                                                    \
  { (storage), 0, sizeof(storage), 1 }

/* Makes room for n more bytes: 0, WP_ENOMEM, or WP_ETOOBIG past
 * WP_MAX_MSG.  Inline while there is room: the codec calls it for every
 * value. */
WP_HIDDEN int wp__buf_grow(wp__buf *b, size_t n);
static inline int wp__buf_reserve(wp__buf *b, size_t n) {
  return n <= b->cap - b->len ? 0 : wp__buf_grow(b, n);
}
WP_HIDDEN void wp__buf_free(wp__buf *b);

/* Blocks up to WP__SLAB_MAX bytes come from the size classes of slab.c,
 * larger ones from malloc. */
#define WP__SLAB_MAX 1024

/* A block of n bytes, 16-byte aligned, or NULL when memory runs out.
 * Freed with wp__slab_free only.  Any thread. */
WP_HIDDEN void *wp__slab_alloc(size_t n);

/* Frees a block of wp__slab_alloc; NULL is ignored.  Any thread. */
WP_HIDDEN void wp__slab_free(void *ptr);

/* Bytes the slab holds from the system now, or -1 in the builds where
 * every block comes from malloc (ASan, allocation-failure injection). */
WP_HIDDEN long wp__slab_mapped(void);

/* Slots out of the slab's chunks now, in use or in a thread's cache; -1
 * where blocks come from malloc. */
WP_HIDDEN long wp__slab_live(void);

/* Sets the most bytes of empty chunks the slab keeps for later bursts
 * (128 MiB unless set; it also keeps no more than the most it ever had
 * in use); returns the previous value, -1 where blocks come from malloc.
 * For tests. */
WP_HIDDEN long wp__slab_set_retain_max(long bytes);

/* Spins for up to WP__SPIN_NS while ready(arg) is false, and returns its
 * last answer.  A thread about to sleep on a condition variable spins
 * first: a round trip that completes meanwhile costs no futex wake-up.
 * Spinning is skipped on a machine with a single CPU. */
#define WP__SPIN_NS 20000
WP_HIDDEN int wp__spin(int (*ready)(void *), void *arg);

/* CPUs this process may run on (uv_available_parallelism, cached). */
WP_HIDDEN int wp__ncpus(void);

/* FNV-1a, 64 bits, of n bytes at p: the id of a function's bytecode
 * (codec.c) and the start of a shared-dictionary key's hash (shdict.c). */
static inline uint64_t wp__fnv1a(const void *p, size_t n) {
  const unsigned char *c = p;
  uint64_t h = 14695981039346656037ull;
  while (n--)
    h = (h ^ *c++) * 1099511628211ull;
  return h;
}

/* ---- value codec (codec.c) ------------------------------------------- */

/* Tags of the wire format; see docs/values.md. */
enum {
  WP__T_NIL,
  WP__T_FALSE,
  WP__T_TRUE,
  WP__T_INT,   /* 8 bytes, native order: messages stay in-process */
  WP__T_FLT,   /* 8 bytes IEEE-754 */
  WP__T_STR,   /* varint length, bytes */
  WP__T_TABLE, /* key/value pairs, then WP__T_END */
  WP__T_END,
  WP__T_REF,    /* varint index of an earlier table or function */
  WP__T_FUNC,   /* u64 id, u32 length, bytecode, varint nups, pure byte,
                   upvalues */
  WP__T_CFUNC,  /* varint length, "lib.name" */
  WP__T_ENV,    /* the receiving state's global table */
  WP__T_MODULE, /* varint length, name in package.loaded */
  WP__T_FUNCID  /* varint index of a record in the function store (its id,
                   length and bytecode, as after WP__T_FUNC), then as
                   WP__T_FUNC: varint nups, pure byte, upvalues */
};

/* A result message of one short string (a literal of less than 128
 * bytes), as the encoder writes it: the count 1, WP__T_STR, the length
 * (one varint byte), the bytes.  For results that must exist without
 * allocating (future.c); test_codec checks it against the encoder.  Use
 * (const char *)&name, sizeof name. */
#define WP__STR_RESULT(name, text)                                             \
  _Static_assert(sizeof(text) - 1 < 0x80, "one varint byte");                  \
  static const struct {                                                        \
    unsigned char count, tag, len;                                             \
    char s[sizeof(text) - 1];                                                  \
  } name = {1, WP__T_STR, sizeof(text) - 1, text}

/* Task messages start with one of these kinds. */
enum { WP__TASK_NAMED = 'N', WP__TASK_FUNC = 'F' };

/* [-0, +0, e] Appends the n values from stack index first on, raising a
 * Lua error for one that cannot cross states.  argpos >= 1 numbers them in
 * messages as arguments of function `what` ("bad argument #3 to 'submit'");
 * argpos == 0 calls them results of a task. */
WP_HIDDEN void wp__encode(lua_State *L, wp__buf *b, int first, int n,
                          const char *what, int argpos);
/* [-0, +0, e] The same without the count in front, after the Lua function
 * at fn, which the message holds already (written from its record,
 * wp__fn_record) as its first table or function: the values number theirs
 * from 1 on, and fn among them is a reference to it. */
WP_HIDDEN void wp__encode_after(lua_State *L, wp__buf *b, int fn, int first,
                                int n, const char *what, int argpos);

/* [-0, +0, -] Appends the n values from first on when they are all
 * scalars, or Lua functions whose upvalues are all _ENV that this state
 * has sent before; never raises.  Returns 0 (the caller then resets the
 * buffer and uses wp__encode) or 1. */
WP_HIDDEN int wp__encode_fast(lua_State *L, wp__buf *b, int first, int n);
/* The same without the count in front. */
WP_HIDDEN int wp__encode_fast_values(lua_State *L, wp__buf *b, int first,
                                     int n);

/* ---- submitting with a cached function (submit.c) -------------------- */

/* 1 when upvalues 1..n of the function at idx are all the global table
 * (the only upvalues a cached record may have).  [-0, +0, -] */
WP_HIDDEN int wp__fn_env_only(lua_State *L, int idx, int n);

/* Copies into out (cap bytes) what a message holds for the Lua function
 * at idx: a function whose upvalues, if any, are all the global table
 * (their count in *nenv), and which this state has sent before (its bytes
 * never change while it lives; its upvalues can, so a user of the record
 * checks them again with wp__fn_env_only).  1 when written, with *len and
 * *nenv set; 0 when it is not such a function or does not fit.
 * [-0, +0, -] */
WP_HIDDEN int wp__fn_record(lua_State *L, int idx, char *out, size_t cap,
                            size_t *len, int *nenv);

/* wp_submit_lua_opts, given rec: the wp__fn_record of the task at `task`
 * when it is that function, copied instead of encoded again (NULL: none).
 * The caller keeps the function alive while it reuses the record. */
WP_HIDDEN int wp__submit_lua_rec(wp_pool *p, lua_State *L, int task, int nargs,
                                 const char *what, const wp_task_opts *opts,
                                 wp_future **out, const char *rec, size_t rlen);

/* The one varint writer: v, 7 bits a byte, low first, at p (which has room
 * for WP__VARINT_MAX bytes); returns the end. */
#define WP__VARINT_MAX 10
static inline char *wp__varint_at(char *p, uint64_t v) {
  while (v >= 0x80) {
    *p++ = (char)(v | 0x80);
    v >>= 7;
  }
  *p++ = (char)v;
  return p;
}

/* Appends a varint / a whole C value.  0 or WP_ENOMEM / WP_ETOOBIG. */
WP_HIDDEN int wp__put_varint(wp__buf *b, uint64_t v);
WP_HIDDEN int wp__put_cvalue(wp__buf *b, const wp_value *v);

typedef struct wp__reader {
  const char *p;   /* next byte */
  const char *end; /* one past the last byte */
} wp__reader;

/* Reads a varint; returns 0 or WP_EINVAL on a truncated message. */
WP_HIDDEN int wp__get_varint(wp__reader *r, uint64_t *v);

/* [-0, +n, e] Pushes n values read from r.  cache is the stack index of the
 * worker's compiled-function cache, or 0. */
WP_HIDDEN void wp__decode(lua_State *L, wp__reader *r, int n, int cache);

/* Reads one value as a C value (tables and functions: WP_TOTHER, skipped).
 * Returns 0 or WP_EINVAL on a malformed message. */
WP_HIDDEN int wp__get_cvalue(wp__reader *r, wp_value *out);

/* Name of a registered C function, or NULL.  Never fails. */
WP_HIDDEN const char *wp__cfunction_name(lua_CFunction fn);

/* ---- the function store (fnstore.c) ---------------------------------- */

/* Interns a function record (len bytes: the 8-byte id, the 4-byte length
 * and the bytecode, as a message holds them after WP__T_FUNC) and writes
 * its index, the same for the same bytes.  The store copies rec and keeps
 * it until the process exits.  0, WP_EINVAL (not a record), or WP_ENOMEM
 * (no memory, or the store is full: 4096 records or 16 MiB).  Any thread;
 * takes the store's lock. */
WP_HIDDEN int wp__fnstore_intern(const char *rec, size_t len, uint32_t *index);

/* The record at index, with its length in *len; NULL when there is none.
 * Any thread, no lock: a record never changes or goes away. */
WP_HIDDEN const char *wp__fnstore_get(uint64_t index, size_t *len);

/* Tests: sets how many bytes of records the store may hold (records kept
 * stay); returns the previous limit. */
WP_HIDDEN size_t wp__fnstore_set_max_bytes(size_t n);

/* ---- fork (fork.c) ---------------------------------------------------- */

/* Installs the fork handlers once; wp_pool_new calls it, and the bindings
 * before they install theirs.  Any thread. */
WP_HIDDEN void wp__fork_watch(void);
/* How many forks this process is from the one that installed them: a pool
 * made at another generation is dead here (wp__pool_forked).  Any thread. */
WP_HIDDEN unsigned wp__fork_generation(void);

/* What each module with process-wide locks does around a fork: takes them
 * (PREPARE, in the forking thread), gives them back (PARENT, CHILD), and
 * in the child forgets what belonged to the parent's other threads. */
enum { WP__FORK_PREPARE, WP__FORK_PARENT, WP__FORK_CHILD };
WP_HIDDEN void wp__pools_atfork(int phase);
/* The phase for one lock made by init under once: taken at PREPARE,
 * given back after. */
WP_HIDDEN void wp__atfork_lock(int phase, uv_once_t *once, void (*init)(void),
                               uv_mutex_t *mu);
WP_HIDDEN void wp__shdict_atfork(int phase);
WP_HIDDEN void wp__fnstore_atfork(int phase);
WP_HIDDEN void wp__cfunction_atfork(int phase);
WP_HIDDEN void wp__slab_atfork(int phase);

typedef struct wp__worker wp__worker;

/* ---- futures (future.c) ---------------------------------------------- */

/* Sizes of the storage inside a future: a task message up to
 * WP__INLINE_MSG bytes shares the future's allocation, and results up to
 * WP__INLINE_RESULT bytes (a few scalars) need no allocation at all. */
#define WP__INLINE_MSG 512
#define WP__INLINE_RESULT 24

/* A future's status while one thread fills in its result, and that of a
 * running task whose cancel was accepted: readers still see WP_PENDING.
 * Whoever completes a WP__CANCELLING future ends it as WP_CANCELLED, so
 * that a cancel which returned 1 never loses to the task's own end or to
 * its deadline. */
#define WP__CLAIMED 100
#define WP__CANCELLING 101

/* Fields are ordered to pack: a small task's future and message fit in
 * 192 bytes of heap. */
struct wp_future {
  atomic_int refs;
  atomic_int status;       /* wp_status, WP__CLAIMED or WP__CANCELLING */
  atomic_int nwaiters;     /* threads sleeping in wp_future_wait */
  unsigned char queued;    /* in the queue, under pool->mu */
  unsigned char msg_owned; /* msg is malloc'd, not inline_msg */
  _Atomic(struct wp__done *) done; /* callbacks, newest first; once ended,
                                      the closed marker (future.c) */
  wp_future *next, *prev;          /* queue links, under pool->mu */
  wp_pool *pool;                   /* memory reference */
  uint64_t seq;                    /* submission order, under pool->mu */
  char *result;        /* varint count + values: result_buf, malloc'd, NULL */
  uint32_t result_len; /* both at most WP_MAX_MSG */
  uint32_t msg_len;    /* counted in the pool's queued_bytes while queued */
  char *msg;           /* the task message */
  char *name;          /* task name for logs, malloc'd, or NULL */
  char *tenant;        /* tenant, malloc'd, or NULL */
  int64_t timeout_ns;  /* deadline after start; 0: none */
  uint64_t t_submit;   /* uv_hrtime at submit */
  wp__worker *worker;  /* running it, under pool->mu */
  uint64_t t_start, t_end; /* uv_hrtime when it started and ended */
  char result_buf[WP__INLINE_RESULT];
  char inline_msg[]; /* the message, when it is small */
};

/* One completion callback of a future. */
typedef struct wp__done {
  struct wp__done *next;
  wp_done_fn cb;
  void *ud;
} wp__done;

/* Makes a future of the message in b: a small one is copied into the
 * future's own allocation, a larger heap one is taken (b is left empty
 * either way).  The new future has two references: the caller's and the
 * queue's.  NULL on WP_ENOMEM. */
WP_HIDDEN wp_future *wp__future_new(wp_pool *p, wp__buf *b);

/* Ends a pending future with status and a copy of the len result bytes
 * (NULL for none), wakes its waiters and runs its callbacks.  Only the
 * first completion counts: a later one returns 0.  A future whose cancel
 * was accepted ends as WP_CANCELLED whatever status says; out of memory
 * for a large result, as an error "not enough memory": the caller reads
 * the status it ended with from wp_future_status.  Called without any
 * lock held. */
WP_HIDDEN int wp__future_complete(wp_future *f, wp_status status,
                                  const char *result, size_t len);

/* When f ended ok with no results, returns 0; with exactly one nil,
 * boolean or number, writes it to v and returns 1; otherwise (pending,
 * not ok, more results, another type) returns -1.  Reads the result bytes
 * directly: the fast path of a wait that keeps a small result. */
WP_HIDDEN int wp__future_scalar(wp_future *f, wp_value *v);

/* Ends f with one string as its error value.  Never fails (falls back to a
 * result-less error when out of memory). */
WP_HIDDEN int wp__future_fail(wp_future *f, wp_status status, const char *msg);

/* ---- pools and workers (pool.c, worker.c) ---------------------------- */

struct wp__worker {
  wp__worker *next; /* in pool->workers, under pool->mu */
  wp_pool *pool;
  uv_thread_t tid;
  lua_State *L;          /* owned; NULL until created */
  void *heap;            /* L's free lists (worker.c), with L */
  int task_ref;          /* L's registry ref of its task_pmain closure */
  int id;                /* 1, 2, ... per pool */
  int stripe;            /* its counters' stripe, under pool->mu */
  int started_thread;    /* the thread was created */
  int detached;          /* stuck and left behind by stop: frees itself */
  int closed;            /* the thread is about to return, under pool->mu */
  int counted;           /* counted in nworkers, under pool->mu: from its
                            start until it leaves its loop or is abandoned
                            as stuck (wp__worker_uncount_locked) */
  int close_stuck;       /* abandoned while closing L, under pool->mu */
  size_t mem;            /* bytes allocated by L (worker thread only) */
  atomic_size_t mem_pub; /* mem, published for metrics */
  size_t mem_limit;      /* 0: none */
  int limit_hit;         /* the allocator refused past mem_limit */
  wp__buf out;           /* encoding buffer for results */
  /* The running task, under pool->mu unless noted. */
  wp_future *cur;                /* NULL when idle */
  uint64_t started;              /* uv_hrtime when cur started */
  uint64_t deadline;             /* uv_hrtime of cur's deadline, or 0 */
  uint64_t kill_at;              /* uv_hrtime of cur's first interrupt */
  int slow_reported;             /* a slow-task event was sent for cur */
  int stuck;                     /* abandoned: its thread exits after cur
                                    (or after closing L, see close_stuck) */
  int tasks_run;                 /* since the state was created */
  uint64_t tasks_done;           /* by this worker, for wp_pool_inspect */
  atomic_uint_fast64_t run_seq;  /* number of the running task; 0 idle */
  atomic_uint_fast64_t kill_seq; /* run_seq to interrupt */
  atomic_int kill_reason;        /* WP_TIMEOUT or WP_CANCELLED */
  atomic_uint_fast64_t closing;  /* uv_hrtime when L began to close, or 0 */
  volatile sig_atomic_t in_task; /* inside wp__worker_run (signals) */
  int task_phase;                /* decoding, calling, encoding (worker.c) */
};

/* Creates w->L, runs the pool's open hook and init script.  On failure
 * returns WP_ENOMEM or WP_EINIT with a message in errbuf.  The state may
 * later move to another thread, as long as one thread uses it at a time. */
WP_HIDDEN int wp__worker_open(wp__worker *w, char *errbuf, size_t errlen);

/* Runs one task in w->L and completes f.  Replaces the state after a
 * memory error.  Never raises.  Returns the status f ended with. */
WP_HIDDEN wp_status wp__worker_run(wp__worker *w, wp_future *f);

/* Asks the worker thread of w to interrupt task number seq (a signal makes
 * the thread install a count hook on its own state; an interrupt that
 * arrives before the task enters Lua is honoured when it does).  Needs
 * pool->mu. */
WP_HIDDEN void wp__worker_interrupt(wp__worker *w, uint64_t seq, int reason);

/* Fixes the interrupt signal for the life of the process: the first
 * wp_pool_new calls it (wp_set_interrupt_signal can no longer change it). */
WP_HIDDEN void wp__interrupt_signal_fix(void);

/* The worker the calling thread runs, or NULL. */
WP_HIDDEN wp__worker *wp__current_worker(void);
/* Makes w the calling thread's worker. */
WP_HIDDEN void wp__worker_bind(wp__worker *w);

/* Sends an event to the installed handler, if any. */
WP_HIDDEN void wp__emit(const wp_event *ev);

/* Records that f ended with status after running `seconds` (or was
 * dropped unstarted when seconds < 0).  w: the worker counting, in its
 * stripe; NULL: any other thread, in the shared stripe 0. */
WP_HIDDEN void wp__pool_count_end(wp_pool *p, const wp__worker *w,
                                  wp_status status, double seconds);

/* Records how long f waited in the queue, in w's stripe. */
WP_HIDDEN void wp__pool_count_dwell(wp_pool *p, const wp__worker *w,
                                    uint64_t ns);

/* Gives w a stripe of its own when one is free (else the shared one), and
 * takes it back once w's thread can count no more.  Need pool->mu. */
WP_HIDDEN void wp__stripe_take_locked(wp_pool *p, wp__worker *w);
WP_HIDDEN void wp__stripe_give_locked(wp_pool *p, wp__worker *w);

/* Closes w->L (if any), publishing in w->closing how long it takes so that
 * the watchdog can abandon a state whose __gc never returns. */
WP_HIDDEN void wp__worker_close(wp__worker *w);

/* What worker.c needs from a pool. */
typedef struct wp__pool_init {
  char *init; /* owned copy, or NULL */
  size_t init_len;
  char *init_name; /* owned copy */
  char *path;      /* owned copies, or NULL */
  char *cpath;
  wp_open_fn open_state;
  void *open_ud;
  size_t memory_limit; /* per state; 0: none */
  int max_tasks;       /* recycle a state after that many; 0: never */
} wp__pool_init;

WP_HIDDEN const wp__pool_init *wp__pool_init_of(wp_pool *p);

/* Stops counting w in the pool's nworkers (toward max_workers); the
 * second call for one worker does nothing.  Needs pool->mu. */
WP_HIDDEN void wp__worker_uncount_locked(wp_pool *p, wp__worker *w);

/* ---- metrics (stats.c) ----------------------------------------------- */

typedef struct wp__hist {
  atomic_uint_fast64_t buckets[WP_HIST_BUCKETS]; /* they sum to the count */
  atomic_uint_fast64_t sum_ns;
} wp__hist;

enum {
  WP__DROP_FULL,
  WP__DROP_STOPPED,
  WP__DROP_DISCARDED,
  WP__DROP_POLICY,
  WP__NDROPS
};

/* What a task's end is counted in.  Stripe 0 is shared: other threads,
 * and workers past the first WP__NSTRIPES - 1, count in it with atomic
 * adds.  Each other stripe belongs to one worker thread at a time
 * (stripes_used), the only writer of its counters, which it bumps with a
 * plain load and store: no locked instruction per task, and no cache line
 * shared with another worker.  Readers add the stripes up. */
#define WP__NSTRIPES 8

typedef struct wp__stripe {
  _Alignas(64) atomic_uint_fast64_t ended[WP_TIMEOUT + 1]; /* by wp_status */
  wp__hist duration, dwell;
} wp__stripe;

typedef struct wp__counters {
  /* Bumped by the threads submitting. */
  _Alignas(64) atomic_uint_fast64_t submitted;
  atomic_uint_fast64_t dropped[WP__NDROPS];
  atomic_uint_fast64_t memory_limit_hits;
  atomic_uint_fast64_t stuck_total;
  wp__stripe stripes[WP__NSTRIPES];
} wp__counters;

WP_HIDDEN void wp__count_drop(wp_pool *p, int reason, uint64_t n);

/* The reasons a drop summary names: the core's WP__DROP_* and then the
 * policy classes, which count as WP__DROP_POLICY. */
enum {
  WP__DROP_RATE_LIMITED = WP__NDROPS,
  WP__DROP_CONCURRENCY,
  WP__DROP_BREAKER_OPEN,
  WP__NSUMMARY
};

/* A (reason, tenant) row of the drop summaries. */
typedef struct wp__droprow {
  int reason;     /* WP__DROP_* */
  int has_tenant; /* else untenanted */
  uint64_t n;
  char tenant[64];
} wp__droprow;

/* ---- the pool (pool.c; watchdog.c and stats.c read it) ---------------- */

enum { WP__RUNNING, WP__DRAINING, WP__STOPPING, WP__STOPPED };

/* Fields are grouped by who writes them, so that the thread submitting
 * and the workers do not make each other's cache lines bounce: the queue
 * lock with what it guards on the hot path, then the counters the
 * submitter bumps, then those the workers bump. */
#define WP__CACHE_LINE 64

struct wp_pool {
  atomic_int refs;   /* handles; the last one stops the pool */
  unsigned fork_gen; /* wp__fork_generation() when it was made */
  char *name;        /* owned, unique while registered */
  wp_pool *reg_next; /* registry list, under the registry lock */
  int registered;    /* under the registry lock */
  wp__pool_init in;  /* what new worker states are made from */
  /* Set at creation, then read-only (resize changes max_workers under
   * mu). */
  size_t queue_cap; /* 0: unbounded */
  int block_when_full;
  int64_t submit_timeout_ns; /* < 0: wait without limit */
  int64_t task_timeout_ns;   /* 0: none */
  int64_t stuck_grace_ns;
  int64_t slow_ns; /* 0: no slow-task events */
  int64_t idle_ns; /* reaping period; < 0: never reap */
  /* Memory: all handles count one, futures and detached stuck workers one
   * each.  On a line of its own: every future made and freed bumps it,
   * and workers read the read-only fields above for every task. */
  _Alignas(WP__CACHE_LINE) atomic_int mrefs;
  /* The queue lock and the state it guards that every task touches. */
  _Alignas(WP__CACHE_LINE) uv_mutex_t mu;
  wp_future *qhead, *qtail; /* FIFO of queued futures */
  size_t nqueued;
  size_t nqueued_peak;   /* the highest nqueued since the pool began */
  size_t queued_bytes;   /* message bytes of the queued futures */
  uint64_t last_active;  /* when a task was last submitted, taken or done */
  uint64_t next_seq;     /* sequence number of the last submission */
  uint64_t task_counter; /* numbers running tasks for interrupts */
  uint64_t task_ns_avg;  /* moving average of how long tasks run */
  int max_workers, min_workers;
  int nworkers;       /* worker threads that count toward max_workers */
  int nidle;          /* workers waiting on work_cv */
  int nwaking;        /* of those, signalled and not yet awake */
  int nspinning;      /* workers spinning before they wait (at most 1):
                         they take new work without a signal */
  int nlight;         /* an idle worker in a light sleep (at most 1): it
                         looks at the queue again unasked (wait_locked) */
  int nrunning;       /* tasks executing (stuck ones excluded) */
  int nspace_waiters; /* submitters waiting on space_cv */
  int nwaiters;       /* threads waiting on state_cv */
  int nclosed;        /* exited workers still in the list, to join */
  int state;          /* WP__RUNNING ... WP__STOPPED */
  int paused;
  uint64_t pause_seq; /* while paused, tasks after this wait */
  /* Under mu, off the hot path. */
  uint64_t last_reap;    /* when a worker was last reaped */
  int nstuck;            /* workers declared stuck, still running */
  int next_id;           /* id of the next worker */
  unsigned stripes_used; /* bit i: stripe i is a worker's own */
  int joiner;            /* a stopping thread is joining the workers */
  uint64_t hard_at;      /* when a hard stop interrupted the running tasks
                            (wp_pool_abort), or 0 */
  wp__worker *workers;   /* every started, not yet joined worker */
  wp_future *stranded;   /* queued tasks no worker could be started for,
                            for the watchdog to fail (linked by next) */
  int strand_err;        /* why: WP_ENOMEM or WP_ESYS */
  wp__worker *spare;     /* the state wp_pool_new made, not yet started */
  uv_cond_t work_cv;     /* idle workers wait for tasks here */
  uv_cond_t light_cv;    /* the light sleeper, which submits never signal */
  uv_cond_t state_cv;    /* pause, stop and join waiters */
  uv_cond_t space_cv;    /* submitters waiting for room in the queue */
  /* What threads read without mu: queued_any, 1 while the queue holds a
   * future (written under mu when that changes), and the inbox, which
   * spinning workers watch for work; the inbox, futures submitted without mu
   * (newest first, linked by next) that the next holder of mu moves into
   * the queue (wp__pool_lock); takers_ready, 1 while every task queued
   * now would be taken without a wake-up or a new worker (see
   * publish_locked in pool.c), so a submit may skip mu. */
  _Alignas(WP__CACHE_LINE) atomic_int queued_any;
  atomic_int stopped; /* 1 once stopping began; readable without mu */
  _Atomic(wp_future *) inbox;
  atomic_int takers_ready;
  uv_mutex_t done_mu; /* threads waiting for a future of this pool */
  uv_cond_t done_cv;  /* sleep here; see future.c */
  /* The watchdog (watchdog.c). */
  uv_thread_t dog;
  uv_cond_t dog_cv;
  int dog_started, dog_exit;
  uint64_t drop_interval_ns;
  uint64_t next_drop_log;
  uint64_t drops_logged[WP__NDROPS];
  /* Drops counted with wp_pool_count_drop_tenant since the last summary,
   * under mu: rows by summary reason (wp__drop_reason) and tenant, and
   * how many of each core reason's drops the rows hold. */
  wp__droprow drop_rows[WP_DROP_TENANT_ROWS];
  int ndrop_rows;
  uint64_t drops_tabled[WP__NDROPS];
  wp__counters c;
};

/* Asserts the pool's invariants: the queue's links against its counters
 * (nqueued, queued_any, queued_bytes, each future's queued flag), the
 * worker gauges against each other and the state.  Called under mu at the
 * end of each mutation.  Only in builds without NDEBUG (the assertion
 * build, docs/testing.md); free elsewhere. */
#ifdef NDEBUG
#define wp__pool_check_locked(p) ((void)0)
#else
WP_HIDDEN void wp__pool_check_locked(const wp_pool *p);
#endif

/* Whether p was made before a fork of this process, so that its workers,
 * and maybe holders of its locks, are in the parent (fork.c).  Any
 * thread. */
static inline int wp__pool_forked(const wp_pool *p) {
  return p->fork_gen != wp__fork_generation();
}

/* Takes a pool's mu and moves the futures of its inbox into the queue;
 * every holder of mu takes it this way.  Releases it after publishing
 * what submitters read without it.  Waits on cv, giving mu up meanwhile,
 * the same way. */
WP_HIDDEN void wp__pool_lock(wp_pool *p);
WP_HIDDEN void wp__pool_unlock(wp_pool *p);
WP_HIDDEN void wp__pool_wait(wp_pool *p, uv_cond_t *cv);
WP_HIDDEN int wp__pool_timedwait(wp_pool *p, uv_cond_t *cv, uint64_t ns);

/* Starts the watchdog thread.  Needs nothing locked.  WP_ESYS. */
WP_HIDDEN int wp__watchdog_start(wp_pool *p);
/* Stops and joins it.  Needs nothing locked. */
WP_HIDDEN void wp__watchdog_stop(wp_pool *p);
/* Wakes it to look at the running tasks again.  Needs mu. */
WP_HIDDEN void wp__watchdog_poke(wp_pool *p);
/* Starts workers for queued tasks that no idle worker will take.  When
 * none could be started and no worker is left, the tasks that could run
 * now leave the queue for p->stranded, and the watchdog fails them ("not
 * enough memory to start a worker"), so that none waits forever.  Needs
 * mu. */
WP_HIDDEN void wp__grow_locked(wp_pool *p);

/* Retains / releases a pool's memory (not its workers). */
WP_HIDDEN void wp__pool_mretain(wp_pool *p);
WP_HIDDEN void wp__pool_mrelease(wp_pool *p);

/* Queues f, taking the queue's reference; a full queue makes it wait for
 * room unless nowait.  WP_ESTOPPED, WP_EFULL, WP_ESYS. */
WP_HIDDEN int wp__pool_enqueue(wp_pool *p, wp_future *f, int nowait);

/* Cancels f: 1 when removed from the queue (the caller completes it),
 * 2 when its running task was marked WP__CANCELLING and asked to stop, 0
 * when it already ended or its end has begun. */
WP_HIDDEN int wp__pool_cancel(wp_pool *p, wp_future *f);

#endif
