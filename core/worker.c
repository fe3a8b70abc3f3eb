/*
 * worker.c: one worker's Lua state, from creation to close, and the running
 * of one task in it.
 *
 * A state is created with an allocator that counts its bytes (and can cap
 * them), opens the standard libraries, inherits package.path/cpath, runs
 * the pool's open hook and then its init script.  Every entry into Lua goes
 * through lua_pcall of a C function (the pmain pattern of lua.c), so nothing
 * a task does can unwind past the worker loop; after every task the stack
 * is reset, and checked to hold only what the pcall left (assert: the
 * assertion build of docs/testing.md).
 *
 * Interrupting a running task (deadline, cancel): the watchdog cannot touch
 * another thread's state, so it sends the worker thread a signal, and the
 * handler, running on that thread, installs a count hook with lua_sethook,
 * the one Lua call meant for signal handlers (lua.c does the same on
 * Ctrl-C).  Tasks that are never interrupted pay for no hook.  The hook
 * runs at every instruction and raises "timeout" or "cancelled" until the
 * task has unwound, so pcall cannot swallow it.  The signal is
 * SIGRTMIN+5 unless the embedder chose another, or none
 * (wp_set_interrupt_signal): with none, every task runs with a count hook
 * that looks for an interrupt every POLL_COUNT instructions instead.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lualib.h>

#include "wp_internal.h"

/* Registry keys (their addresses). */
static const char worker_key = 'w'; /* light userdata: the wp__worker */

/* The signal that asks a worker thread to interrupt its task: until the
 * first pool fixes it (wp__interrupt_signal_fix), what
 * wp_set_interrupt_signal chose, or -1 for the default SIGRTMIN+5 (not a
 * constant); from then on the signal, or 0 for the polling hook.  Read
 * without the lock once fixed: it never changes again, and worker
 * threads start after the pool that fixed it. */
static struct {
  pthread_mutex_t mu;
  int sig;
  int fixed;
} isig = {PTHREAD_MUTEX_INITIALIZER, -1, 0};

/* With no signal, how often (in instructions) a task looks for an
 * interrupt. */
#define POLL_COUNT 1000

static _Thread_local wp__worker *current;

/* Where the running task is (wp__worker.task_phase), for msgh. */
enum { TASK_PREP, TASK_CALL, TASK_RESULTS };

int wp_set_interrupt_signal(int sig) {
  int r = 0;
  if (sig < 0 || sig > SIGRTMAX || sig == SIGKILL || sig == SIGSTOP)
    return WP_EINVAL;
  pthread_mutex_lock(&isig.mu);
  if (isig.fixed)
    r = isig.sig == sig ? 0 : WP_EEXISTS;
  else
    isig.sig = sig;
  pthread_mutex_unlock(&isig.mu);
  return r;
}

int wp_interrupt_signal(void) {
  int sig;
  pthread_mutex_lock(&isig.mu);
  sig = isig.sig < 0 ? SIGRTMIN + 5 : isig.sig;
  pthread_mutex_unlock(&isig.mu);
  return sig;
}

void wp__interrupt_signal_fix(void) {
  pthread_mutex_lock(&isig.mu);
  if (!isig.fixed) { /* written once: workers read it without the lock */
    if (isig.sig < 0) isig.sig = SIGRTMIN + 5;
    isig.fixed = 1;
  }
  pthread_mutex_unlock(&isig.mu);
}

wp__worker *wp__current_worker(void) {
  return current;
}

void wp__worker_bind(wp__worker *w) {
  current = w;
}

int wp_interrupted(void) {
  wp__worker *w = current;
  uint64_t seq;
  if (w == NULL) return 0;
  seq = atomic_load(&w->run_seq);
  return seq != 0 && atomic_load(&w->kill_seq) == seq;
}

static void poll_hook(lua_State *L, lua_Debug *ar);

/* The hook a task runs with while not interrupted: none, or with no
 * signal, the polling one. */
static void set_quiet_hook(lua_State *L) {
  if (isig.sig == 0 && current && current->in_task)
    lua_sethook(L, poll_hook, LUA_MASKCOUNT, POLL_COUNT);
  else
    lua_sethook(L, NULL, 0, 0);
}

/* Count hook, at every instruction: raises until the interrupted task has
 * unwound, so the first instruction after a pcall that caught the error
 * raises again, one level further out. */
static void interrupt_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  if (current && current->in_task && wp_interrupted()) {
    lua_sethook(L, interrupt_hook, LUA_MASKCOUNT, 1);
    luaL_error(L, "%s",
               atomic_load(&current->kill_reason) == WP_TIMEOUT ? "timeout"
                                                                : "cancelled");
  }
  set_quiet_hook(L); /* left from an earlier task */
}

/* With no interrupt signal: every POLL_COUNT instructions of a task. */
static void poll_hook(lua_State *L, lua_Debug *ar) {
  if (current && current->in_task && wp_interrupted()) interrupt_hook(L, ar);
}

static void on_interrupt_signal(int sig) {
  int saved = errno;
  (void)sig;
  if (current && current->in_task && current->L && wp_interrupted())
    lua_sethook(current->L, interrupt_hook, LUA_MASKCOUNT, 1);
  errno = saved;
}

static void install_handler(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_interrupt_signal;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  sigaction(isig.sig, &sa, NULL);
}

void wp__worker_interrupt(wp__worker *w, uint64_t seq, int reason) {
  static uv_once_t once = UV_ONCE_INIT;
  assert(isig.fixed && seq != 0);
  if (atomic_load(&w->kill_seq) != seq) w->kill_at = uv_hrtime();
  atomic_store(&w->kill_reason, reason);
  atomic_store(&w->kill_seq, seq);
  if (isig.sig == 0) return; /* the polling hook will see it */
  uv_once(&once, install_handler);
  pthread_kill(w->tid, isig.sig);
}

/* Free lists per state.  Blocks of up to HEAP_MAX bytes, in classes of
 * HEAP_STEP, freed by a state are kept for its next allocations of the same
 * class (up to HEAP_KEEP bytes in all) instead of going back to malloc: a
 * garbage collection frees thousands of small blocks at once, more than
 * glibc's per-thread cache holds, and glibc consolidates the rest before
 * every allocation of 1 KB or more (docs/performance.md, Pipelines).  A
 * heap belongs to one state and is used only by the thread running it. */
#define HEAP_STEP 16
#define HEAP_MAX 512
#define HEAP_KEEP (256 * 1024)

typedef struct heap {
  wp__worker *w;
  size_t kept;                      /* bytes on the lists */
  void *free[HEAP_MAX / HEAP_STEP]; /* singly linked through word 0 */
} heap;

/* n - 1 < HEAP_MAX: 1 <= n <= HEAP_MAX (n == 0 wraps). */
#define HEAP_SMALL(n) ((size_t)(n)-1 < HEAP_MAX)
#define HEAP_CLASS(n) (((n)-1) / HEAP_STEP)

/* A block of at least n bytes (n >= 1), or NULL. */
static void *heap_get(heap *h, size_t n) {
  if (HEAP_SMALL(n)) {
    size_t c = HEAP_CLASS(n);
    void *p = h->free[c];
    if (p == NULL) return malloc((c + 1) * HEAP_STEP);
    h->free[c] = *(void **)p;
    h->kept -= (c + 1) * HEAP_STEP;
    return p;
  }
  return malloc(n);
}

/* Releases p, a block Lua knows as n bytes: heap_get's for n, or a
 * larger one kept by a shrink (worker_alloc). */
static void heap_put(heap *h, void *p, size_t n) {
  if (HEAP_SMALL(n) && h->kept < HEAP_KEEP) {
    size_t c = HEAP_CLASS(n);
    *(void **)p = h->free[c];
    h->free[c] = p;
    h->kept += (c + 1) * HEAP_STEP;
    return;
  }
  free(p);
}

static void heap_destroy(heap *h) {
  size_t c;
  for (c = 0; c < HEAP_MAX / HEAP_STEP; c++) {
    void *p = h->free[c];
    while (p) {
      void *next = *(void **)p;
      free(p);
      p = next;
    }
  }
  free(h);
}

static void *worker_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  heap *h = ud;
  wp__worker *w = h->w;
  if (ptr == NULL) osize = 0;
  if (nsize == 0) {
    if (ptr) heap_put(h, ptr, osize);
    w->mem -= osize;
  } else if (w->mem_limit && nsize > osize &&
             w->mem + (nsize - osize) > w->mem_limit) {
    w->limit_hit = 1;
    return NULL;
  } else {
    void *p;
    if (ptr == NULL)
      p = heap_get(h, nsize);
    else if (!HEAP_SMALL(osize) && !HEAP_SMALL(nsize))
      p = realloc(ptr, nsize);
    else if (HEAP_SMALL(osize) && HEAP_SMALL(nsize) &&
             HEAP_CLASS(osize) == HEAP_CLASS(nsize))
      p = ptr;
    else if ((p = heap_get(h, nsize)) != NULL) {
      memcpy(p, ptr, osize < nsize ? osize : nsize);
      heap_put(h, ptr, osize);
    } else if (nsize < osize) {
      p = ptr; /* a shrink never fails; the block is big enough */
    }
    if (p == NULL) return NULL;
    ptr = p;
    w->mem = w->mem - osize + nsize;
  }
  atomic_store_explicit(&w->mem_pub, w->mem, memory_order_relaxed);
  return nsize ? ptr : NULL;
}

/* [-0, +1, m] Message handler: appends a traceback to string errors;
 * a number becomes a string first, as in lua.c.  Around a task it only
 * treats what the task itself raised (task_pmain's TASK_CALL): the errors
 * of decoding and of encoding the results stay as they are. */
static int msgh(lua_State *L) {
  const char *msg = "(error object is nil)";
  if (current && current->in_task && current->task_phase != TASK_CALL) return 1;
  if (lua_type(L, 1) == LUA_TSTRING || lua_type(L, 1) == LUA_TNUMBER)
    msg = lua_tostring(L, 1);
  else if (!lua_isnil(L, 1))
    return 1; /* tables, booleans...: kept as they are */
  luaL_traceback(L, L, msg, 1);
  return 1;
}

static void copy_error(lua_State *L, char *errbuf, size_t errlen) {
  const char *msg = lua_tostring(L, -1);
  if (errlen == 0) return;
  snprintf(errbuf, errlen, "%s", msg ? msg : "(error object is not a string)");
}

static int task_pmain(lua_State *L);

/* [-2, +0, e] The protected part of wp__worker_open. */
static int open_pmain(lua_State *L) {
  wp__worker *w = lua_touserdata(L, 1);
  const wp__pool_init *in = wp__pool_init_of(w->pool);
  lua_settop(L, 0);
  luaL_openlibs(L);
  lua_pushlightuserdata(L, w);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &worker_key);
  /* task_pmain, with this state's cache of task functions (id ->
   * function) as its upvalue, in the registry's array part: one cheap
   * lookup per task. */
  lua_newtable(L);
  lua_pushcclosure(L, task_pmain, 1);
  w->task_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_getglobal(L, "package");
  if (in->path) {
    lua_pushstring(L, in->path);
    lua_setfield(L, -2, "path");
  }
  if (in->cpath) {
    lua_pushstring(L, in->cpath);
    lua_setfield(L, -2, "cpath");
  }
  lua_pop(L, 1);
  if (in->open_state) in->open_state(L, in->open_ud);
  lua_settop(L, 0);
  if (in->init) {
    lua_pushcfunction(L, msgh);
    if (luaL_loadbufferx(L, in->init, in->init_len, in->init_name, "t") ||
        lua_pcall(L, 0, 0, 1))
      lua_error(L);
  }
  return 0;
}

int wp__worker_open(wp__worker *w, char *errbuf, size_t errlen) {
  heap *h = calloc(1, sizeof *h);
  lua_State *L = NULL;
  int st;
  if (h != NULL) {
    h->w = w;
    L = lua_newstate(worker_alloc, h);
  }
  if (L == NULL) {
    /* lua_newstate freed what it made into h's lists: free them too */
    if (h != NULL) heap_destroy(h);
    if (errlen) snprintf(errbuf, errlen, "not enough memory");
    return WP_ENOMEM;
  }
  lua_pushcfunction(L, open_pmain);
  lua_pushlightuserdata(L, w);
  st = lua_pcall(L, 1, 0, 0);
  if (st != LUA_OK) {
    copy_error(L, errbuf, errlen);
    lua_close(L);
    heap_destroy(h);
    return st == LUA_ERRMEM ? WP_ENOMEM : WP_EINIT;
  }
  assert(lua_gettop(L) == 0);
  w->L = L;
  w->heap = h;
  w->tasks_run = 0;
  return 0;
}

void wp__worker_close(wp__worker *w) {
  if (w->L == NULL) return;
  if (atomic_load(&w->closing) == 0) /* else set by the caller already */
    atomic_store(&w->closing, uv_hrtime());
  lua_close(w->L);
  heap_destroy(w->heap);
  w->heap = NULL;
  w->L = NULL;
  atomic_store(&w->closing, 0);
}

/* What a task ended with, filled by task_pmain. */
typedef struct task_run {
  wp__worker *w;
  wp_future *f;
  wp_status status;
} task_run;

/* Whether the n values from first are all nil, booleans, numbers or
 * strings: results that wp__encode_fast writes as wp__encode would (it
 * would not number a function returned twice). */
static int scalars_only(lua_State *L, int first, int n) {
  for (int i = 0; i < n; i++) {
    int t = lua_type(L, first + i);
    if (t != LUA_TNIL && t != LUA_TBOOLEAN && t != LUA_TNUMBER &&
        t != LUA_TSTRING)
      return 0;
  }
  return 1;
}

/* [-1, +0, e] Decodes and calls the task of run->f, then encodes its
 * results into run->w->out.  Upvalue 1: the state's cache of task
 * functions.  It runs in wp__worker_run's one protected call, whose
 * message handler adds a traceback to what the task raises; w->task_phase
 * says where an error came from. */
static int task_pmain(lua_State *L) {
  task_run *run = lua_touserdata(L, 1);
  wp__worker *w = run->w;
  wp_future *f = run->f;
  wp__buf *out = &w->out;
  wp__reader r;
  uint64_t n;
  int base;
  lua_settop(L, 0);
  lua_pushvalue(L, lua_upvalueindex(1)); /* 1: the function cache */
  base = lua_gettop(L);
  r.p = f->msg;
  r.end = f->msg + f->msg_len;
  if (r.p == r.end) return luaL_error(L, "empty task message");
  if (*r.p++ == WP__TASK_NAMED) {
    const char *name = r.p;
    if (wp__get_varint(&r, &n) || n > (uint64_t)(r.end - r.p))
      return luaL_error(L, "malformed task message");
    name = r.p;
    r.p += n;
    lua_pushglobaltable(L);
    lua_pushlstring(L, name, (size_t)n);
    if (lua_rawget(L, -2) != LUA_TFUNCTION) {
      lua_pushlstring(L, name, (size_t)n);
      return luaL_error(L,
                        "no handler '%s' in pool '%s' (the init script "
                        "must define a global function of that name)",
                        lua_tostring(L, -1), wp_pool_name(run->w->pool));
    }
    lua_remove(L, -2);
  }
  if (wp__get_varint(&r, &n) || n > INT32_MAX)
    return luaL_error(L, "malformed task message");
  wp__decode(L, &r, (int)n, 1);
  w->task_phase = TASK_CALL;
  lua_call(L, lua_gettop(L) - base - 1, LUA_MULTRET);
  w->task_phase = TASK_RESULTS;
  out->len = 0;
  run->status = WP_OK;
  if (!scalars_only(L, base + 1, lua_gettop(L) - base) ||
      !wp__encode_fast(L, out, base + 1, lua_gettop(L) - base)) {
    out->len = 0;
    wp__encode(L, out, base + 1, lua_gettop(L) - base, NULL, 0);
  }
  return 0;
}

/* [-1, +0, e] Encodes the error value a task raised into w->out, as its
 * one result (a value that cannot be sent becomes its tostring). */
static int task_error_pmain(lua_State *L) {
  wp__worker *w = lua_touserdata(L, 1);
  lua_settop(L, 2);
  w->out.len = 0;
  if (lua_type(L, 2) != LUA_TSTRING && lua_type(L, 2) != LUA_TTABLE &&
      lua_type(L, 2) != LUA_TNUMBER && lua_type(L, 2) != LUA_TBOOLEAN &&
      lua_type(L, 2) != LUA_TNIL)
    luaL_tolstring(L, 2, NULL);
  wp__encode(L, &w->out, -1, 1, NULL, 0);
  return 0;
}

/* Sends a task event about f from its worker. */
static void task_event(wp__worker *w, wp_future *f, wp_event_type type,
                       const char *msg, double seconds, int64_t n) {
  wp_event ev;
  memset(&ev, 0, sizeof ev);
  ev.type = type;
  ev.pool = wp_pool_name(w->pool);
  ev.task = f->name;
  ev.tenant = f->tenant;
  ev.message = msg;
  ev.worker = w->id;
  ev.seconds = seconds;
  ev.n = n;
  wp__emit(&ev);
}

/* Reports the error value of a finished task when it is a string. */
static void error_event(wp__worker *w, wp_future *f) {
  wp__reader r;
  uint64_t n;
  wp_value v;
  char msg[4096];
  r.p = w->out.data;
  r.end = w->out.data + w->out.len;
  if (wp__get_varint(&r, &n) || n < 1 || wp__get_cvalue(&r, &v) ||
      v.type != WP_TSTRING)
    snprintf(msg, sizeof msg, "(error object is not a string)");
  else {
    size_t cut = v.u.s.len < 4000 ? v.u.s.len : 4000;
    /* Never split a UTF-8 character: back off over continuation bytes. */
    for (int i = 0; i < 3 && cut < v.u.s.len &&
                    ((unsigned char)v.u.s.ptr[cut] & 0xC0) == 0x80;
         i++)
      cut--;
    snprintf(msg, sizeof msg, "%.*s", (int)cut, v.u.s.ptr);
  }
  task_event(w, f, WP_EV_TASK_ERROR, msg, 0, 0);
}

wp_status wp__worker_run(wp__worker *w, wp_future *f) {
  lua_State *L = w->L;
  const wp__pool_init *in = wp__pool_init_of(w->pool);
  task_run run;
  int st, done;
  wp_status status;
  run.w = w;
  run.f = f;
  run.status = WP_ERROR;
  assert(L != NULL && lua_gettop(L) == 0 && w->cur == f && current == w);
  w->limit_hit = 0;
  w->in_task = 1;
  /* An interrupt sent since the take (while init ran, say) found in_task
   * 0 and installed nothing: honour it now.  One sent from here on finds
   * in_task 1. */
  atomic_signal_fence(memory_order_seq_cst);
  if (wp_interrupted())
    lua_sethook(L, interrupt_hook, LUA_MASKCOUNT, 1);
  else
    set_quiet_hook(L);
  lua_pushcfunction(L, msgh);
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->task_ref); /* task_pmain */
  lua_pushlightuserdata(L, &run);
  w->task_phase = TASK_PREP;
  st = lua_pcall(L, 1, 0, 1);
  /* Balanced: the handler, then nothing or the error value. */
  assert(lua_gettop(L) == (st == LUA_OK ? 1 : 2));
  if (st != LUA_OK && st != LUA_ERRMEM && w->task_phase == TASK_CALL &&
      !wp_interrupted()) { /* the task raised: that value is its result */
    lua_pushcfunction(L, task_error_pmain);
    lua_pushlightuserdata(L, w);
    lua_pushvalue(L, -3);
    st = lua_pcall(L, 2, 0, 0);
    lua_remove(L, -2 + (st == LUA_OK)); /* the value, or keep the new error */
    run.status = WP_ERROR;
  }
  w->in_task = 0;
  lua_sethook(L, NULL, 0, 0);
  /* The task forked and this is the child: its pool, and every other
   * thread, stayed in the parent, so nothing here can end the task or run
   * another.  The child ends as a forked child should, with no atexit
   * handler and no stdio buffer flushed twice: 0 when the task returned, 1
   * when it failed (docs/api.md, "After fork()"). */
  if (wp__pool_forked(w->pool))
    _exit(st == LUA_OK && run.status == WP_OK ? 0 : 1);
  if (wp_interrupted()) { /* asked to stop: that is how it ended */
    status = (wp_status)atomic_load(&w->kill_reason);
    done = wp__future_fail(f, status,
                           status == WP_TIMEOUT ? "timeout" : "cancelled");
    if (done) status = wp_future_status(f); /* a cancel may have won */
    if (done && status == WP_TIMEOUT)
      task_event(w, f, WP_EV_TASK_TIMEOUT, NULL,
                 (double)(w->deadline - w->started) / 1e9, 0);
  } else if (st == LUA_OK) {
    done = wp__future_complete(f, run.status, w->out.data, w->out.len);
    status = done ? wp_future_status(f) : run.status;
    if (done && status == WP_ERROR && run.status == WP_OK) /* no memory */
      task_event(w, f, WP_EV_TASK_ERROR, "not enough memory", 0, 0);
    else if (done && status == WP_ERROR)
      error_event(w, f);
  } else {
    const char *msg = w->limit_hit          ? "memory limit exceeded"
                      : st == LUA_ERRMEM    ? "not enough memory"
                      : lua_tostring(L, -1) ? lua_tostring(L, -1)
                                            : "task failed";
    done = wp__future_fail(f, WP_ERROR, msg);
    status = done ? wp_future_status(f) : WP_ERROR;
    if (done && status == WP_ERROR && !w->limit_hit)
      task_event(w, f, WP_EV_TASK_ERROR, msg, 0, 0);
  }
  if (w->limit_hit) { /* even when the task caught the error itself */
    atomic_fetch_add(&w->pool->c.memory_limit_hits, 1);
    task_event(w, f, WP_EV_MEMORY_LIMIT, "memory limit exceeded", 0,
               (int64_t)w->mem_limit);
  }
  if (st == LUA_ERRMEM || w->limit_hit) {
    wp__worker_close(w); /* replaced before the next task */
  } else {
    lua_settop(L, 0);
    if (in->max_tasks && ++w->tasks_run >= in->max_tasks)
      wp__worker_close(w); /* recycled */
  }
  if (w->out.cap > (1u << 20)) wp__buf_free(&w->out); /* don't hoard */
  return done ? status : WP_PENDING;
}

wp_pool *wp_state_pool(lua_State *L) {
  wp__worker *w;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &worker_key);
  w = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return w ? w->pool : NULL;
}

int wp_state_worker_id(lua_State *L) {
  wp__worker *w;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &worker_key);
  w = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return w ? w->id : 0;
}
