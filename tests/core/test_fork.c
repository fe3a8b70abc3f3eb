/*
 * test_fork.c: what a fork() leaves the child (core/fork.c).  A pool made
 * before the fork is dead in the child: its calls fail with WP_EFORKED or
 * do nothing, its pending futures end failed instead of hanging, and
 * releasing it neither joins nor frees.  The process-wide locks (slab,
 * function store, shared dictionaries, C-function names, the pool
 * registry) are free in the child even when other threads held them at
 * the fork, so the child can make pools of its own.  The child of a task
 * that forks ends when the task returns.
 *
 * Each child checks itself and reports through its exit status; an alarm
 * ends a child that hangs.  Under ThreadSanitizer a child starts no thread
 * (TSan refuses threads after a multi-threaded fork) and skips the checks
 * that need new workers.  Under AddressSanitizer a child of a busy parent
 * allocates nothing: GCC 12's ASan allocator does not take its own locks
 * around a fork, so such a child can hang in malloc whatever we do (seen:
 * about one fork in a hundred); it still takes every lock it can without
 * allocating.
 */
#include <criterion/criterion.h>

#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <uv.h>

#include "wpool.h"

#if defined(__SANITIZE_THREAD__)
#define CHILD_THREADS 0
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define CHILD_THREADS 0
#endif
#endif
#ifndef CHILD_THREADS
#define CHILD_THREADS 1
#endif
#if defined(__SANITIZE_ADDRESS__)
#define CHILD_MALLOC_UNDER_LOAD 0
#else
#define CHILD_MALLOC_UNDER_LOAD 1
#endif

#define INIT                                                                   \
  "function add(a, b) return a + b end\n"                                      \
  "function spin(s) local t = os.clock() + s\n"                                \
  "  while os.clock() < t do end return s end\n"

static wp_pool *make_pool(const char *name) {
  wp_options o;
  wp_pool *p = NULL;
  char err[256];
  int r;
  wp_options_init(&o);
  o.name = name;
  o.max_workers = 2;
  o.init = INIT;
  o.init_len = strlen(INIT);
  r = wp_pool_new(&o, &p, err, sizeof err);
  if (r != 0) return NULL;
  return p;
}

static wp_value vnum(double n) {
  wp_value v;
  v.type = WP_TNUMBER;
  v.u.n = n;
  return v;
}

/* add(a, b) on p, waited; -1 when anything fails. */
static double add_on(wp_pool *p, double a, double b) {
  wp_value args[2] = {vnum(a), vnum(b)}, v;
  wp_future *f;
  double got = -1;
  if (wp_submit_values(p, "add", args, 2, &f) != 0) return -1;
  if (wp_future_wait(f, 30) == 0 && wp_future_status(f) == WP_OK &&
      wp_future_values(f, &v, 1) == 1)
    got = v.type == WP_TINTEGER ? (double)v.u.i : v.u.n;
  wp_future_release(f);
  return got;
}

/* In a child: exit with code unless cond holds. */
#define CHECK(cond, code)                                                      \
  do {                                                                         \
    if (!(cond)) _exit(code);                                                  \
  } while (0)

/* Runs child() in a forked child and expects it to exit 0 within secs
 * seconds. */
static void in_child(void (*child)(void *), void *arg, unsigned secs) {
  int st = 0;
  pid_t pid = fork();
  cr_assert_neq(pid, -1, "fork");
  if (pid == 0) {
    alarm(secs);
    child(arg);
    _exit(0);
  }
  cr_assert_eq(waitpid(pid, &st, 0), pid);
  cr_assert(WIFEXITED(st), "the child died of signal %d (14: it hung)",
            WIFSIGNALED(st) ? WTERMSIG(st) : 0);
  cr_assert_eq(WEXITSTATUS(st), 0, "the child failed check %d",
               WEXITSTATUS(st));
}

/* Waits until p runs one task (spin, which allocates nothing) and the
 * rest of its workers are idle: under ASan the child's malloc would hang
 * if another thread held the allocator's lock at the fork. */
static void quiet_workers(wp_pool *p) {
  wp_pool_counts c;
  int i;
  for (i = 0; i < 10000; i++) {
    wp_pool_get_counts(p, &c);
    if (c.running == 1) break;
    usleep(1000);
  }
  cr_assert_eq(c.running, 1);
  usleep(100 * 1000); /* its decoding is done by now */
}

/* ---- a pool from before the fork --------------------------------------- */

typedef struct before {
  wp_pool *p;
  wp_future *running, *done;
} before;

static void child_sees_a_dead_pool(void *arg) {
  before *b = arg;
  wp_value args[2] = {vnum(1), vnum(2)}, v;
  wp_future *f;
  wp_pool_counts c;
  wp_pool_stats s;
  wp_worker_info info[4];
  wp_pool *list[4];
  size_t queued;
  double oldest;
  int interrupted = 7;

  CHECK(wp_submit_values(b->p, "add", args, 2, &f) == WP_EFORKED, 1);
  CHECK(strstr(wp_strerror(WP_EFORKED), "before fork") != NULL, 2);
  CHECK(strcmp(wp_err_name(WP_EFORKED), "EFORKED") == 0, 3);
  /* The running task's future ends failed instead of never. */
  CHECK(wp_future_wait(b->running, -1) == 0, 4);
  CHECK(wp_future_status(b->running) == WP_ERROR, 5);
  CHECK(wp_future_values(b->running, &v, 1) == 1 && v.type == WP_TSTRING &&
            strstr(v.u.s.ptr, "before fork") != NULL,
        6);
  CHECK(wp_future_cancel(b->running) == 0, 7);
  /* What ended before the fork is still there. */
  CHECK(wp_future_status(b->done) == WP_OK, 8);
  CHECK(wp_future_values(b->done, &v, 1) == 1, 9);
  /* The pool's calls: refused, or nothing to do, at once. */
  CHECK(wp_pool_pause(b->p) == WP_EFORKED, 10);
  wp_pool_resume(b->p);
  CHECK(wp_pool_resize(b->p, 3) == WP_EFORKED, 11);
  wp_pool_get_counts(b->p, &c);
  CHECK(c.stopped && c.workers == 0 && c.running == 0, 12);
  wp_pool_get_stats(b->p, &s);
  CHECK(s.running == 0 && s.workers == 0 && s.max_workers == 2, 13);
  CHECK(wp_pool_inspect(b->p, info, 4, &queued, &oldest) == 0, 14);
  CHECK(wp_pool_find("fork-before") == NULL, 15);
  CHECK(wp_pool_list(list, 4) == 0, 16);
  wp_pool_count_drop_tenant(b->p, WP_DROP_FULL, "t");
  CHECK(wp_pool_abort(b->p, &interrupted) == 0 && interrupted == 0, 17);
  CHECK(wp_pool_stop_wait(b->p) == 0, 18);
  CHECK(wp_pool_stop(b->p) == 0, 19);
  wp_future_release(b->running);
  wp_future_release(b->done);
  wp_pool_release(b->p); /* frees nothing, joins nothing */
  if (CHILD_THREADS) {
    /* A pool of the child's own, under the same name. */
    wp_pool *q = make_pool("fork-before");
    CHECK(q != NULL, 20);
    CHECK(add_on(q, 2, 3) == 5, 21);
    CHECK(wp_pool_stop_wait(q) == 0, 22);
    wp_pool_release(q);
  }
}

Test(fork, a_pool_made_before_is_dead_in_the_child) {
  before b;
  wp_value arg = vnum(0.5);
  b.p = make_pool("fork-before");
  cr_assert_not_null(b.p);
  cr_assert_eq(add_on(b.p, 1, 2), 3);
  {
    wp_value args[2] = {vnum(1), vnum(2)};
    cr_assert_eq(wp_submit_values(b.p, "add", args, 2, &b.done), 0);
    cr_assert_eq(wp_future_wait(b.done, 30), 0);
  }
  cr_assert_eq(wp_submit_values(b.p, "spin", &arg, 1, &b.running), 0);
  quiet_workers(b.p);
  in_child(child_sees_a_dead_pool, &b, 60);
  /* The parent's pool goes on. */
  cr_assert_eq(wp_future_wait(b.running, 30), 0);
  cr_assert_eq(wp_future_status(b.running), WP_OK);
  cr_assert_eq(add_on(b.p, 4, 5), 9);
  wp_future_release(b.running);
  wp_future_release(b.done);
  cr_assert_eq(wp_pool_stop_wait(b.p), 0);
  wp_pool_release(b.p);
}

/* ---- forks while other threads hold the process-wide locks ------------- */

static atomic_int inside;

/* A key callback runs under the dictionary's lock: this one keeps it
 * for a while. */
static void hold_lock(const char *k, size_t klen, void *ud) {
  (void)k;
  (void)klen;
  (void)ud;
  atomic_store(&inside, 1);
  usleep(300 * 1000);
}

static void list_keys(void *arg) {
  wp_shdict_keys(arg, 1, hold_lock, NULL);
}

static void child_sets_a_key(void *arg) {
  wp_shval v = {WP_TINTEGER, {.i = 7}};
  CHECK(wp_shdict_set(arg, "k", 1, &v, 0) == 0, 1);
  CHECK(wp_shdict_get(arg, "k", 1, &v) == 0 && v.u.i == 7, 2);
}

Test(fork, while_another_thread_holds_a_dictionary_lock) {
  wp_shdict *d = NULL;
  wp_shval v = {WP_TINTEGER, {.i = 1}};
  uv_thread_t t;
  cr_assert_eq(wp_shdict_open("fork-held", 0, &d), 0);
  cr_assert_eq(wp_shdict_set(d, "k", 1, &v, 0), 0);
  wp_pool_release(make_pool(NULL)); /* the handlers are installed */
  atomic_store(&inside, 0);
  cr_assert_eq(uv_thread_create(&t, list_keys, d), 0);
  while (!atomic_load(&inside))
    usleep(1000);
  /* The fork waits for the lock; without that, the child's copy of the
   * lock would stay held by a thread it does not have. */
  in_child(child_sets_a_key, d, 10);
  cr_assert_eq(uv_thread_join(&t), 0);
}

static atomic_int stop_load;

/* Submits Lua functions (the function store, the slab, the codec) and
 * uses a shared dictionary and the C-function names until told to stop. */
static void load(void *arg) {
  wp_pool *p = arg;
  lua_State *L = luaL_newstate();
  wp_shdict *d = NULL;
  wp_future *f;
  long i = 0;
  luaL_openlibs(L);
  luaL_loadstring(L, "return function(t) return #t.s + t.n end");
  lua_call(L, 0, 1);
  cr_assert_eq(wp_shdict_open("fork-load", 0, &d), 0);
  while (!atomic_load(&stop_load)) {
    char key[32];
    wp_shval v = {WP_TINTEGER, {.i = i}};
    lua_pushvalue(L, 1);
    lua_createtable(L, 0, 2);
    lua_pushliteral(L, "abc");
    lua_setfield(L, -2, "s");
    lua_pushinteger(L, i);
    lua_setfield(L, -2, "n");
    if (wp_submit_lua(p, L, -2, 1, "submit", &f) == 0) {
      if (i % 8 == 0) wp_future_wait(f, 30);
      wp_future_release(f);
    }
    lua_settop(L, 1);
    snprintf(key, sizeof key, "k%ld", i % 64);
    wp_shdict_set(d, key, strlen(key), &v, 0);
    if (i % 16 == 0) wp_register_cfunction("fork.load", luaopen_base);
    i++;
  }
  lua_close(L);
}

static void child_uses_everything(void *arg) {
  wp_shdict *d = NULL;
  wp_shval v;
  (void)arg;
  CHECK(wp_shdict_open("fork-load", 0, &d) == 0, 1);
  /* Locks taken without allocating: an integer read, the pool names. */
  CHECK(wp_shdict_get(d, "k0", 2, &v) == 0 && v.type == WP_TINTEGER, 9);
  CHECK(wp_pool_find("fork-load") == NULL, 10);
  if (!CHILD_MALLOC_UNDER_LOAD) return;
  v.type = WP_TINTEGER;
  v.u.i = 42;
  CHECK(wp_shdict_set(d, "child", 5, &v, 0) == 0, 2);
  CHECK(wp_shdict_get(d, "child", 5, &v) == 0 && v.u.i == 42, 3);
  CHECK(wp_register_cfunction("fork.child", luaopen_math) == 0, 4);
  if (CHILD_THREADS) {
    wp_pool *q = make_pool(NULL);
    lua_State *L = luaL_newstate();
    wp_future *f;
    wp_value r;
    CHECK(q != NULL, 5);
    luaL_openlibs(L);
    luaL_loadstring(L, "return function(x) return x * 2 end");
    lua_call(L, 0, 1);
    lua_pushinteger(L, 21);
    CHECK(wp_submit_lua(q, L, -2, 1, "submit", &f) == 0, 6);
    CHECK(wp_future_wait(f, 30) == 0 && wp_future_values(f, &r, 1) == 1 &&
              r.type == WP_TINTEGER && r.u.i == 42,
          7);
    wp_future_release(f);
    lua_close(L);
    CHECK(wp_pool_stop_wait(q) == 0, 8);
    wp_pool_release(q);
  }
}

Test(fork, while_other_threads_hold_the_process_locks) {
  wp_pool *p = make_pool("fork-load");
  wp_shdict *d = NULL;
  wp_shval v = {WP_TINTEGER, {.i = 0}};
  uv_thread_t t;
  int i;
  cr_assert_not_null(p);
  cr_assert_eq(wp_shdict_open("fork-load", 0, &d), 0);
  cr_assert_eq(wp_shdict_set(d, "k0", 2, &v, 0), 0);
  atomic_store(&stop_load, 0);
  cr_assert_eq(uv_thread_create(&t, load, p), 0);
  for (i = 0; i < 25; i++) {
    in_child(child_uses_everything, NULL, 60);
    usleep(2000);
  }
  atomic_store(&stop_load, 1);
  cr_assert_eq(uv_thread_join(&t), 0);
  cr_assert_eq(wp_pool_stop_wait(p), 0);
  wp_pool_release(p);
}

/* Makes, uses and stops pools until told to stop: the registry, worker
 * starts and joins, and stops race the forks. */
static void churn(void *arg) {
  (void)arg;
  while (!atomic_load(&stop_load)) {
    wp_pool *p = make_pool(NULL);
    if (p == NULL) continue;
    add_on(p, 1, 1);
    if (rand() % 2)
      wp_pool_stop_wait(p);
    else
      wp_pool_stop(p);
    wp_pool_release(p);
  }
}

static void child_makes_a_pool(void *arg) {
  (void)arg;
  if (CHILD_THREADS && CHILD_MALLOC_UNDER_LOAD) {
    wp_pool *q = make_pool("fork-churn");
    CHECK(q != NULL, 1);
    CHECK(add_on(q, 20, 22) == 42, 2);
    CHECK(wp_pool_stop_wait(q) == 0, 3);
    wp_pool_release(q);
  }
  CHECK(wp_pool_find("fork-churn") == NULL, 4);
}

Test(fork, while_other_threads_make_and_stop_pools) {
  uv_thread_t t[2];
  int i;
  atomic_store(&stop_load, 0);
  for (i = 0; i < 2; i++)
    cr_assert_eq(uv_thread_create(&t[i], churn, NULL), 0);
  for (i = 0; i < 50; i++)
    in_child(child_makes_a_pool, NULL, 60);
  atomic_store(&stop_load, 1);
  for (i = 0; i < 2; i++)
    cr_assert_eq(uv_thread_join(&t[i]), 0);
}

/* ---- a task that forks --------------------------------------------------- */

/* [-0, +1, -] fork_now(): fork() from inside a task; the child's pid to
 * the parent, 0 to the child. */
static int fork_now(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)fork());
  return 1;
}

static void open_fork(lua_State *L, void *ud) {
  (void)ud;
  lua_register(L, "fork_now", fork_now);
}

#define FORKER                                                                 \
  "function forker(fail)\n"                                                    \
  "  local pid = fork_now()\n"                                                 \
  "  if pid == 0 and fail then error('the child fails') end\n"                 \
  "  return pid\n"                                                             \
  "end\n"

/* Runs forker(fail) on p and returns how its child ended: its exit status,
 * or -1 when it was still running after 30 s (then killed). */
static int fork_in_task(wp_pool *p, int fail) {
  wp_value arg, v;
  wp_future *f;
  pid_t pid;
  int st = 0, i;
  arg.type = WP_TBOOLEAN;
  arg.u.b = fail;
  cr_assert_eq(wp_submit_values(p, "forker", &arg, 1, &f), 0);
  cr_assert_eq(wp_future_wait(f, 30), 0);
  cr_assert_eq(wp_future_status(f), WP_OK, "the parent's task ends as usual");
  cr_assert_eq(wp_future_values(f, &v, 1), 1);
  cr_assert_eq(v.type, WP_TINTEGER);
  pid = (pid_t)v.u.i;
  cr_assert_gt(pid, 0);
  wp_future_release(f);
  for (i = 0; i < 3000; i++) {
    if (waitpid(pid, &st, WNOHANG) == pid)
      return WIFEXITED(st) ? WEXITSTATUS(st) : 100 + WTERMSIG(st);
    usleep(10 * 1000);
  }
  kill(pid, SIGKILL);
  waitpid(pid, &st, 0);
  return -1;
}

Test(fork, the_child_of_a_task_that_forks_ends_with_the_task) {
  wp_options o;
  wp_pool *p = NULL;
  char err[256];
  wp_options_init(&o);
  o.name = "fork-in-task";
  o.max_workers = 2;
  o.idle_timeout = -1; /* a worker left in the child would wait forever */
  o.init = INIT FORKER;
  o.init_len = strlen(INIT FORKER);
  o.open_state = open_fork;
  cr_assert_eq(wp_pool_new(&o, &p, err, sizeof err), 0, "%s", err);
  cr_assert_eq(fork_in_task(p, 0), 0,
               "the child exits 0 when the task returns");
  cr_assert_eq(fork_in_task(p, 1), 1, "and 1 when the task fails");
  /* The parent's pool goes on. */
  cr_assert_eq(add_on(p, 2, 3), 5);
  cr_assert_eq(wp_pool_stop_wait(p), 0);
  wp_pool_release(p);
}
