/*
 * test_fault.c: allocation-failure injection through the public C API, in
 * the spirit of SQLite's malloc tests (docs/testing.md).
 *
 * Built only with -DWPOOL_FAULT_INJECTION=ON (core/fault.h), under ASan
 * and LSan.  A scripted scenario (create a pool, submit C and Lua tasks
 * with completion callbacks, cancel one, wait for them, run one more,
 * stop, and work a shared dictionary) runs again and again: run N makes
 * the N-th allocation of the core fail (and, in the persistent pass, every
 * one after it, the scenario then skipping the extra task), for N = 1, 2, ...
 * until a run completes without any injected failure. Every run must:
 *   - not crash, hang (every wait is bounded) or leak (LSan checks after
 *     each run, so a leak names its N);
 *   - see each failure as a clean error: WP_ENOMEM, or a task or init
 *     error that says "not enough memory";
 *   - leave the pool usable (after a one-shot failure, a last task must
 *     succeed) or cleanly stopped (every future resolved, every callback
 *     run once, stop returns, the pool's name is free again).
 * A worker whose state could not be made tries again at its next task, and
 * tasks that no worker can be started for fail: so even in the persistent
 * pass every future resolves before the pool is stopped.
 *
 *   test_fault            both passes, every N
 *   test_fault once       the one-shot pass only (or: persistent)
 *   test_fault N [P]      one run with failure N (P = 1: persistent), to
 *                         debug a failing N
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lualib.h>

#define WPOOL_FAULT_API_ONLY
#include "fault.h"
#include "wpool.h"

/* Under ASan: a leak check that can run more than once. */
int __lsan_do_recoverable_leak_check(void) __attribute__((weak));

#define WAIT_S 60.0 /* longer than any run needs: a hang, not a slow box */
#define NTASKS 6

static long current_n;
static int current_persist;

static void die(const char *fmt, ...) {
  va_list ap;
  fprintf(stderr, "test_fault: N=%ld%s: ", current_n,
          current_persist ? " (persistent)" : "");
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  abort();
}

/* A failure is clean when it is WP_ENOMEM. */
static void expect_ok_or_nomem(int r, const char *what) {
  if (r != 0 && r != WP_ENOMEM)
    die("%s: %s (%s), not ENOMEM", what, wp_strerror(r), wp_err_name(r));
}

static const char init_src[] = "function double(x) return x * 2 end\n"
                               "function echo(...) return ... end\n";

static int done_calls;
static void on_done(wp_future *f, void *ud) {
  (void)f;
  (void)ud;
  __atomic_add_fetch(&done_calls, 1, __ATOMIC_SEQ_CST);
}

/* Checks how a future ended: OK with want (when want is not NULL, the
 * first result as a string or an integer), or an error about memory. */
static void check_future(wp_future *f, const char *want, int64_t want_i) {
  wp_value v[2];
  int n;
  if (wp_future_wait(f, WAIT_S) != 0) die("a future never resolved");
  n = wp_future_values(f, v, 2);
  switch (wp_future_status(f)) {
  case WP_OK:
    if (want &&
        (n < 1 || v[0].type != WP_TSTRING || v[0].u.s.len != strlen(want) ||
         memcmp(v[0].u.s.ptr, want, v[0].u.s.len)))
      die("wrong string result");
    if (!want && want_i &&
        (n < 1 || v[0].type != WP_TINTEGER || v[0].u.i != want_i))
      die("wrong integer result");
    break;
  case WP_ERROR:
    /* The error value may itself be lost to memory (no value at all). */
    if (n >= 1 && v[0].type == WP_TSTRING &&
        !memmem(v[0].u.s.ptr, v[0].u.s.len, "not enough memory", 17))
      die("task error '%.*s'", (int)v[0].u.s.len, v[0].u.s.ptr);
    if (n >= 1 && v[0].type != WP_TSTRING && v[0].type != WP_TOTHER)
      die("task error of type %d", (int)v[0].type);
    break;
  case WP_CANCELLED:
  case WP_DISCARDED:
    break; /* the scenario cancels or stops some */
  default:
    die("future status %d", (int)wp_future_status(f));
  }
}

/* [-0, +0, -] Submits a Lua function task from the host state L. */
static int submit_lua(wp_pool *p, lua_State *L, wp_future **out) {
  int r;
  lua_settop(L, 0);
  if (luaL_loadstring(L, "local k = ... return function(x) "
                         "return tostring(x) .. k, {k, {x}} end") ||
      (lua_pushstring(L, "-lua"), lua_pcall(L, 1, 1, 0)))
    die("host chunk: %s", lua_tostring(L, -1));
  lua_pushinteger(L, 7);
  r = wp_submit_lua(p, L, 1, 1, "submit", out);
  lua_settop(L, 0);
  return r;
}

/* The shared dictionary part; each step may fail only with WP_ENOMEM. */
static void shdict_part(int run) {
  char name[64], big[600];
  wp_shdict *d;
  wp_shval v, out;
  int r;
  snprintf(name, sizeof name, "fault-%d", run);
  r = wp_shdict_open(name, 64 << 10, &d);
  expect_ok_or_nomem(r, "shdict_open");
  if (r) return;
  memset(big, 'b', sizeof big);
  v.type = WP_TSTRING;
  v.u.s.ptr = big;
  v.u.s.len = sizeof big;
  expect_ok_or_nomem(wp_shdict_set(d, "k", 1, &v, 0), "shdict_set");
  r = wp_shdict_get(d, "k", 1, &out);
  expect_ok_or_nomem(r, "shdict_get");
  if (r == 0) {
    if (out.type == WP_TSTRING &&
        (out.u.s.len != sizeof big || memcmp(out.u.s.ptr, big, sizeof big)))
      die("shdict_get: wrong value");
    wp_shval_free(&out);
  }
  v.type = WP_TINTEGER;
  v.u.i = 1;
  r = wp_shdict_incr(d, "n", 1, &v, &v, 0, &out);
  expect_ok_or_nomem(r, "shdict_incr");
  r = wp_shdict_add(d, "a", 1, &v, 10);
  if (r != WP_EEXISTS) expect_ok_or_nomem(r, "shdict_add");
  r = wp_shdict_cas(d, "a", 1, &v, &v);
  if (r < 0) expect_ok_or_nomem(r, "shdict_cas");
  wp_shdict_delete(d, "k", 1);
  wp_shdict_flush(d);
}

/* Runs double(21) and checks it returns 42. */
static void last_task(wp_pool *p) {
  wp_value arg, v;
  wp_future *f;
  int r;
  arg.type = WP_TINTEGER;
  arg.u.i = 21;
  /* A worker whose state could not be made earlier makes it now. */
  if ((r = wp_submit_values(p, "double", &arg, 1, &f)) != 0)
    die("submit after the failure: %s", wp_strerror(r));
  check_future(f, NULL, 42);
  if (wp_future_status(f) == WP_OK) {
    wp_future_release(f);
    return;
  }
  r = wp_future_values(f, &v, 1);
  if (r == 1 && v.type == WP_TSTRING)
    die("the pool is broken: '%.*s'", (int)v.u.s.len, v.u.s.ptr);
  die("the pool is broken: status %d", (int)wp_future_status(f));
}

/* One run of the scenario. */
static void scenario(lua_State *L, int run) {
  wp_options o;
  wp_pool *p;
  wp_future *fs[NTASKS + 2];
  const char *want_s[NTASKS + 2]; /* each future's first result */
  int64_t want_i[NTASKS + 2];
  wp_value args[1];
  char err[512], big[701];
  int r, i, nf = 0, ndone = 0;
  wp_options_init(&o);
  o.name = "fault";
  o.max_workers = 2;
  o.init = init_src;
  o.init_len = sizeof init_src - 1;
  done_calls = 0;
  r = wp_pool_new(&o, &p, err, sizeof err);
  if (r == WP_EINIT && !strstr(err, "not enough memory"))
    die("new: init failed with '%s'", err);
  if (r == WP_EEXISTS) die("new: the name of an earlier pool is still taken");
  if (r != WP_EINIT) expect_ok_or_nomem(r, "new");
  if (r) {
    if (wp_pool_find("fault")) die("a failed pool can be found");
    shdict_part(run);
    return;
  }
  /* Tasks: named with C values, one with a message too big to be inline,
   * and a Lua function with upvalues and a table result. */
  memset(big, 'x', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  for (i = 0; i < NTASKS; i++) {
    args[0].type = WP_TINTEGER;
    args[0].u.i = i + 1;
    r = wp_submit_values(p, "double", args, 1, &fs[nf]);
    expect_ok_or_nomem(r, "submit_values");
    want_s[nf] = NULL;
    want_i[nf] = 2 * (i + 1);
    if (r == 0) nf++;
  }
  args[0].type = WP_TSTRING;
  args[0].u.s.ptr = big;
  args[0].u.s.len = sizeof big - 1;
  r = wp_submit_values(p, "echo", args, 1, &fs[nf]);
  expect_ok_or_nomem(r, "submit_values (big)");
  want_s[nf] = big;
  want_i[nf] = 0;
  if (r == 0) nf++;
  r = submit_lua(p, L, &fs[nf]);
  expect_ok_or_nomem(r, "submit_lua");
  want_s[nf] = "7-lua";
  want_i[nf] = 0;
  if (r == 0) nf++;
  for (i = 0; i < nf; i++) {
    r = wp_future_on_done(fs[i], on_done, NULL);
    expect_ok_or_nomem(r, "on_done");
    ndone += r == 0;
  }
  if (nf > 0) wp_future_cancel(fs[0]); /* queued, running or done */
  /* Every future resolves, even with no memory left to start a worker. */
  for (i = 0; i < nf; i++)
    check_future(fs[i], want_s[i], want_i[i]);
  /* Still usable: once the failure is past, one more task succeeds. */
  if (!current_persist && wp_fault_failed() > 0) last_task(p);
  r = wp_pool_stop_wait(p);
  if (r != 0) die("stop_wait: %s", wp_strerror(r));
  if (wp_pool_find("fault")) die("a stopped pool can be found");
  for (i = 0; i < nf; i++) {
    if (wp_future_status(fs[i]) == WP_PENDING) die("pending after stop");
    check_future(fs[i], want_s[i], want_i[i]);
    wp_future_release(fs[i]);
  }
  if (__atomic_load_n(&done_calls, __ATOMIC_SEQ_CST) != ndone)
    die("%d of %d on_done callbacks ran", done_calls, ndone);
  wp_pool_release(p);
  shdict_part(run);
}

/* Runs the scenario with failure n; returns the failures injected. */
static long run_once(lua_State *L, long n, int persist) {
  long failed;
  current_n = n;
  current_persist = persist;
  wp_fault_arm(n, persist);
  scenario(L, (int)(persist * 100000 + n));
  failed = wp_fault_failed();
  wp_fault_arm(0, 0);
  if (__lsan_do_recoverable_leak_check && __lsan_do_recoverable_leak_check())
    die("leak (see the report above)");
  return failed;
}

int main(int argc, char **argv) {
  lua_State *L = luaL_newstate();
  int persist, first = 0, last = 1;
  long n;
  luaL_openlibs(L);
  if (argc > 1 && strcmp(argv[1], "once") == 0) {
    last = 0;
  } else if (argc > 1 && strcmp(argv[1], "persistent") == 0) {
    first = 1;
  } else if (argc > 1) {
    run_once(L, atol(argv[1]), argc > 2 && atoi(argv[2]));
    lua_close(L);
    return 0;
  }
  for (persist = first; persist <= last; persist++) {
    for (n = 1; run_once(L, n, persist) > 0; n++)
      ;
    fprintf(stderr, "test_fault: %s: %ld runs\n",
            persist ? "persistent" : "one-shot", n);
    if (n < 50) die("too few allocations: is the injector wired in?");
  }
  lua_close(L);
  return 0;
}
