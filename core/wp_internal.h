/*
 * wp_internal.h: what the files of core/ share and nothing outside sees.
 *
 * Lock order: the pool registry lock, then a pool's mu; a future's mu is a
 * leaf and is never held with any other lock.  No lock is held across a Lua
 * API call that can raise.
 */
#ifndef WPOOL_INTERNAL_H
#define WPOOL_INTERNAL_H

#include <stdatomic.h>
#include <stdint.h>

#include <lauxlib.h>
#include <lua.h>
#include <uv.h>

#include "wpool.h"

#define WP_HIDDEN __attribute__((visibility("hidden")))

/* ---- byte buffers ---------------------------------------------------- */

typedef struct wp__buf {
  char *data; /* malloc'd, or NULL */
  size_t len; /* bytes used */
  size_t cap; /* bytes allocated */
} wp__buf;

/* Makes room for n more bytes: 0, WP_ENOMEM, or WP_ETOOBIG past
 * WP_MAX_MSG. */
WP_HIDDEN int wp__buf_reserve(wp__buf *b, size_t n);
WP_HIDDEN void wp__buf_free(wp__buf *b);

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
  WP__T_REF,   /* varint index of an earlier table or function */
  WP__T_FUNC,  /* u32 length, bytecode, varint nups, pure byte, upvalues */
  WP__T_CFUNC, /* varint length, "lib.name" */
  WP__T_ENV,   /* the receiving state's global table */
  WP__T_MODULE /* varint length, name in package.loaded */
};

/* Task messages start with one of these kinds. */
enum { WP__TASK_NAMED = 'N', WP__TASK_FUNC = 'F' };

/* [-0, +0, e] Appends the n values from stack index first on, raising a
 * Lua error for one that cannot cross states.  argpos >= 1 numbers them in
 * messages as arguments of function `what` ("bad argument #3 to 'submit'");
 * argpos == 0 calls them results of a task. */
WP_HIDDEN void wp__encode(lua_State *L, wp__buf *b, int first, int n,
                          const char *what, int argpos);

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

/* ---- futures (future.c) ---------------------------------------------- */

struct wp_future {
  atomic_int refs;
  atomic_int status;      /* wp_status */
  wp_future *next, *prev; /* queue links, under pool->mu */
  wp_pool *pool;          /* memory reference, for cancel */
  uint64_t seq;           /* submission order, under pool->mu */
  int queued;             /* 1 while in the queue, under pool->mu */
  uv_mutex_t mu;          /* guards waiters, done_cb, result */
  uv_cond_t cv;           /* signalled on completion */
  int nwaiters;           /* threads in wp_future_wait */
  int done_set;           /* wp_future_on_done was called */
  wp_done_fn done_cb;     /* completion callback, or NULL */
  void *done_ud;
  char *result; /* varint count + values, malloc'd */
  size_t result_len;
  char *msg; /* the task message, malloc'd */
  size_t msg_len;
};

/* Takes ownership of msg (malloc'd).  The new future has two references:
 * the caller's and the queue's.  NULL on WP_ENOMEM (msg is then freed). */
WP_HIDDEN wp_future *wp__future_new(wp_pool *p, char *msg, size_t len);

/* Ends a pending future with status and result (ownership of result is
 * taken; NULL for none), wakes waiters and runs its callback.  Called
 * without any lock held. */
WP_HIDDEN void wp__future_complete(wp_future *f, wp_status status, char *result,
                                   size_t len);

/* Ends f with one string as its error value.  Never fails (falls back to a
 * result-less error when out of memory). */
WP_HIDDEN void wp__future_fail(wp_future *f, wp_status status, const char *msg);

/* ---- pools and workers (pool.c, worker.c) ---------------------------- */

typedef struct wp__worker wp__worker;

struct wp__worker {
  wp__worker *next; /* in pool->workers, under pool->mu */
  wp_pool *pool;
  uv_thread_t tid;
  lua_State *L;     /* owned; NULL until created */
  int id;           /* 1, 2, ... per pool */
  int started;      /* the thread was created */
  int closed;       /* the thread is about to return, under pool->mu */
  size_t mem;       /* bytes allocated by L */
  size_t mem_limit; /* 0: none */
  wp__buf out;      /* encoding buffer for results */
};

/* Creates w->L, runs the pool's open hook and init script.  On failure
 * returns WP_ENOMEM or WP_EINIT with a message in errbuf.  The state may
 * later move to another thread, as long as one thread uses it at a time. */
WP_HIDDEN int wp__worker_open(wp__worker *w, char *errbuf, size_t errlen);

/* Runs one task in w->L and completes f.  Replaces the state after a
 * memory error.  Never raises. */
WP_HIDDEN void wp__worker_run(wp__worker *w, wp_future *f);

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
} wp__pool_init;

WP_HIDDEN const wp__pool_init *wp__pool_init_of(wp_pool *p);

/* Retains / releases a pool's memory (not its workers). */
WP_HIDDEN void wp__pool_mretain(wp_pool *p);
WP_HIDDEN void wp__pool_mrelease(wp_pool *p);

/* Removes a queued future: 1 when removed, 0 when it had started. */
WP_HIDDEN int wp__pool_unqueue(wp_pool *p, wp_future *f);

#endif
