/*
 * host_internal.h: what the files of the host runtime share (host_loop.c,
 * host_sched.c, host_timers.c, host_drain.c, host_signals.c, host_luv.c):
 * the host object, a host coroutine, the registry keys, and the functions
 * one concern offers the others.  Everything here is for the loop thread
 * unless it says otherwise, and has hidden visibility.
 *
 * Registry layout (keys are the addresses of the wpl_*_key constants):
 *   wpl_host_key     light userdata: the wpool_host
 *   wpl_cos_key      thread -> light userdata wpl_co, for live host
 *                    coroutines
 *   wpl_watch_key    light userdata future -> list of waiters (wpl_co
 *                    userdata or on_done functions)
 *   wpl_ready_key    list of wpl_co to resume on the next loop iteration
 *   wpl_shutdown_key list of on_shutdown handlers
 */
#ifndef WPOOL_HOST_INTERNAL_H
#define WPOOL_HOST_INTERNAL_H

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>

#include "lbind.h"
#include "http.h"
#include "mailbox.h"
#include "wpool_host.h"

#define WPL_THREAD_MT "workerpool.thread"
#define WPL_TIMER_MT "workerpool.timer"

WPL_HIDDEN extern const char wpl_host_key, wpl_cos_key, wpl_watch_key,
    wpl_ready_key, wpl_shutdown_key;

enum {
  PARK_NONE,
  PARK_FUTURE,
  PARK_SLEEP,
  PARK_JOIN,
  PARK_CALL,
  PARK_READY,
  PARK_AWAIT
};
enum { CO_RUNNING, CO_DONE, CO_ERROR };

/* The shutdown story (host_drain.c) of a host: it begins once and ends
 * once. */
typedef enum {
  STORY_NONE,     /* not begun */
  STORY_DRAINING, /* pools drain until done, the deadline or a 2nd signal */
  STORY_DONE      /* ended: the loop was stopped */
} wpl_story;

typedef struct ptimer ptimer;
typedef struct offload offload;
typedef struct wtimer wtimer;

/* A host coroutine; the userdata is also the handle spawn returns.
 * Uservalue 1: the thread; 2: list of joiners. */
typedef struct wpl_co {
  wpool_host *h;
  lua_State *co;
  int ref;               /* registry reference to this userdata while running */
  int state;             /* CO_* */
  int parked;            /* PARK_* */
  int is_main;           /* errors end the loop */
  int is_handler;        /* an on_shutdown handler the drain waits for */
  wp_future *f;          /* awaited future, while PARK_FUTURE */
  struct wpl_co *joined; /* awaited coroutine, while PARK_JOIN */
  void *awaiter;         /* its await, while PARK_AWAIT */
  ptimer *timer;         /* sleep or wait timeout, or NULL */
  int nres;              /* results (or 1: the error) on the thread's stack */
} wpl_co;

struct ptimer {
  uv_timer_t t;
  wpl_co *c;
};

struct offload {
  offload *next; /* in h->offloads */
  uv_thread_t tid;
  wpl_blocking_fn op;
  void *ud;
  wp_pool *p; /* the pool the call stops or pauses (borrowed), or NULL */
  int result;
  wpl_co *c;
  wpl_mailbox *mb;
};

struct wtimer {
  uv_timer_t t;
  wpool_host *h;
  wtimer *next, *prev; /* in h->timers while active */
  int fn_ref;          /* the callback, while active */
  int active;
  int refs;          /* the userdata's and the running timer's */
  double period_ns;  /* every(): the period; 0 for after() */
  uint64_t start_ns; /* every(): loop time when it was created, in ns */
  uint64_t ticks;    /* every(): the index of the tick last scheduled */
};

struct wpool_host {
  uv_loop_t *loop;
  lua_State *L;
  wpl_mailbox *mb; /* from other threads: WPL_MSG_FUTURE, WPL_MSG_OFFLOAD */
  uv_async_t async;
  uv_idle_t idle;     /* runs coroutines that yielded plainly */
  int nwatched;       /* futures with host waiters */
  offload *offloads;  /* blocking calls in progress */
  wtimer *timers;     /* active every/after timers */
  wpl_co *parked_now; /* set by park(), checked by co_resume */
  int exit_code;
  int closed;
  wpl_co *main; /* the main coroutine while it runs */
  /* signals (see the top of this file) */
  lua_State *volatile running;    /* host coroutine being resumed, or NULL */
  uv_async_t sig_async;           /* wakes the loop for a signal */
  atomic_int nsig[2];             /* SIGINT, SIGTERM received */
  int nsig_seen[2];               /* ... and acted on */
  volatile uint64_t interrupt_at; /* hrtime at which the hook raises */
  int signals;                    /* our handlers are installed */
  pthread_t sig_tid;              /* the loop's thread, where they act */
  struct sigaction old_sa[2];     /* the handlers they replaced */
  /* shutdown */
  uv_timer_t drain_timer;
  wpl_story story; /* where the shutdown story is */
  int handlers;    /* on_shutdown handlers started and not yet ended */
  int exit_drain;  /* pools drain at exit, with no deadline */
  double drain_timeout, drain_start, last_progress;
  wp_pool **pools; /* references to the pools being drained */
  int npools, cap_pools;
  int dropped, abandoned;
  int nclosing;      /* handles still closing after wpool_host_close */
  wp_pool **adopted; /* collected pools draining in the background */
  int nadopted;
  wpl_http_server *http; /* the endpoints' server, or NULL */
};

/* ---- host_loop.c: the host object and helpers ------------------------ */

/* The host of L, or NULL.   [-0, +0, -] */
WPL_HIDDEN wpool_host *wpl_host_of(lua_State *L);
/* The host of L; raises "workerpool.<what> needs a host event loop ..."
 * when there is none.   [-0, +0, e] */
WPL_HIDDEN wpool_host *wpl_host_check(lua_State *L, const char *what);
/* The mailbox async handle keeps the loop alive only while something
 * waits for another thread. */
WPL_HIDDEN void wpl_host_update_ref(wpool_host *h);
/* Runs fn(L, ud) protected in the host state; an error is logged. */
WPL_HIDDEN void wpl_host_call(wpool_host *h, lua_CFunction fn, void *ud);
/* [-0, +1, m] Pushes list registry[key][k] (k at the top, popped),
 * creating it when create is set; pushes nil otherwise. */
WPL_HIDDEN void wpl_list_of(lua_State *L, const void *key, int create);
/* [-1, +0, m] Appends the value at the top to the list at idx. */
WPL_HIDDEN void wpl_list_append(lua_State *L, int idx);
/* [-0, +0, -] Removes the userdata whose pointer is p from the list at idx
 * (keeping the order). */
WPL_HIDDEN void wpl_list_remove_ptr(lua_State *L, int idx, const void *p);
WPL_HIDDEN void wpl_host_handle_closed(uv_handle_t *handle);

/* ---- host_sched.c: coroutines ---------------------------------------- */

/* [-0, +1, m] Creates a host coroutine for the function below its nargs
 * arguments at the top of L (all moved into it), pushing its handle. */
WPL_HIDDEN wpl_co *wpl_co_new(wpool_host *h, lua_State *L, int nargs);
/* Resumes c with the nargs values on its stack; from: the state resuming
 * it. */
WPL_HIDDEN void wpl_co_resume(wpool_host *h, wpl_co *c, int nargs,
                              lua_State *from);
/* Acts on one message of the mailbox (WPL_MSG_*). */
WPL_HIDDEN void wpl_host_deliver(wpool_host *h, wpl_msg *m);
/* [-0, +0, m] Writes to stderr what the main coroutine, still suspended
 * when nothing is left to wake it, waits for.  ud: the host. */
WPL_HIDDEN int wpl_host_stranded_pmain(lua_State *L);
/* [-0, +0, -] Stops every parked coroutine's timer.  ud: the host. */
WPL_HIDDEN int wpl_host_close_parks_pmain(lua_State *L);
/* [-0, +0, m] Registers the metatable of coroutine handles. */
WPL_HIDDEN void wpl_host_sched_init(lua_State *L);

/* ---- host_timers.c --------------------------------------------------- */

/* Stops an active timer and drops its callback.  [-0, +0, -] */
WPL_HIDDEN void wpl_wtimer_stop(wtimer *t);
/* [-0, +0, m] Registers the metatable of timer handles. */
WPL_HIDDEN void wpl_host_timers_init(lua_State *L);

/* ---- host_drain.c ---------------------------------------------------- */

/* A second signal (or the deadline): discards what is still queued. */
WPL_HIDDEN void wpl_host_hard_stop(wpool_host *h, const char *reason);

/* ---- host_signals.c -------------------------------------------------- */

/* The count hook a signal arms in the running host coroutine. */
WPL_HIDDEN void wpl_host_interrupt_hook(lua_State *L, lua_Debug *ar);
/* Acts on the signals counted since the last call. */
WPL_HIDDEN void wpl_host_take_signals(wpool_host *h);
WPL_HIDDEN void wpl_host_sig_async_cb(uv_async_t *a);
/* Puts the former SIGINT/SIGTERM handlers back, if h had taken them. */
WPL_HIDDEN void wpl_host_signals_close(wpool_host *h);

/* ---- host_luv.c ------------------------------------------------------ */

/* [-0, +1, e] luaopen for package.loaded.luv (upvalue 1: the host). */
WPL_HIDDEN int wpl_host_open_luv(lua_State *L);
/* [-0, +0, e] Closes every luv handle still open. */
WPL_HIDDEN int wpl_host_close_luv_pmain(lua_State *L);

#endif
