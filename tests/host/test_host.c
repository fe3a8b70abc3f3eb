/*
 * test_host.c: Criterion tests of the embedding API (wpool_host.h) driven
 * from C, the way a program with its own libuv loop uses it: create a
 * host, run a script in it, set the event sink and the logging, handle
 * signals, serve, close, and check that the loop closes cleanly (nothing
 * left open, nothing leaked under ASan).  Criterion runs each test in a
 * process of its own; under TSan the stand-in runs them one after another
 * in one process, so every test puts back what it changed.
 */
#include <criterion/criterion.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lualib.h>
#include <uv.h>

#include "host_internal.h" /* white box: the signal counts */
#include "http.h"
#include "wpool_host.h"

/* Criterion's runner does not fail a test for what LSan reports at exit:
 * tests that look for leaks ask LSan themselves (ASan builds). */
#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/lsan_interface.h>
#define ASSERT_NO_LEAK() cr_assert_eq(__lsan_do_recoverable_leak_check(), 0)
#else
#define ASSERT_NO_LEAK() ((void)0)
#endif

typedef struct env {
  uv_loop_t loop;
  lua_State *L;
  wpool_host *h;
} env;

static void env_open(env *e) {
  cr_assert_eq(uv_loop_init(&e->loop), 0);
  cr_assert_not_null(e->L = luaL_newstate());
  luaL_openlibs(e->L);
  cr_assert_eq(wpool_host_new(&e->loop, e->L, &e->h), 0);
}

/* Closes the host, then the state, then the loop, which must have nothing
 * left open. */
static void env_close(env *e) {
  wpool_host_close(e->h);
  uv_run(&e->loop, UV_RUN_DEFAULT);
  lua_close(e->L);
  uv_run(&e->loop, UV_RUN_DEFAULT);
  cr_assert_eq(uv_loop_close(&e->loop), 0);
}

/* Runs chunk as the main coroutine until the loop ends; the exit code. */
static int run_main(env *e, const char *chunk) {
  cr_assert_eq(luaL_loadstring(e->L, chunk), LUA_OK);
  cr_assert_eq(wpool_host_spawn(e->h, 0, 1), 0);
  uv_run(&e->loop, UV_RUN_DEFAULT);
  return wpool_host_finish(e->h);
}

static lua_Integer global_int(lua_State *L, const char *name) {
  lua_Integer v;
  lua_getglobal(L, name);
  v = lua_tointeger(L, -1);
  lua_pop(L, 1);
  return v;
}

Test(host, runs_a_script) {
  env e;
  wpool_host *again;
  env_open(&e);
  cr_assert_eq(wpool_host_new(&e.loop, e.L, &again), WP_EEXISTS);
  cr_assert_eq(wpool_host_ready(e.h), 1);
  cr_assert_eq(run_main(&e, "local wp = require 'workerpool'\n"
                            "local pool = wp.new{max_workers = 2}\n"
                            "sum = pool:submit_wait(function(a, b)\n"
                            "  return a + b end, 2, 3)\n"
                            "wp.sleep(0.01)\n"
                            "local t = wp.spawn(function()\n"
                            "  wp.sleep(0.01) return 7 end)\n"
                            "local ok, v = t:join()\n"
                            "joined = ok and v\n"
                            "pool:stop_wait()\n"),
               0);
  cr_assert_eq(global_int(e.L, "sum"), 5);
  cr_assert_eq(global_int(e.L, "joined"), 7);
  cr_assert_eq(wpool_host_exit_code(e.h), 0);
  cr_assert_eq(wpool_host_abandoned(e.h), 0);
  env_close(&e);
}

Test(host, main_error_gives_exit_code_1) {
  env e;
  env_open(&e);
  cr_assert_eq(run_main(&e, "error('boom')"), 1);
  env_close(&e);
}

/* A Lua error while loading the module is WP_EINVAL with its message left
 * on the stack, not WP_ENOMEM; what was made is closed. */
Test(host, new_reports_a_lua_error_honestly) {
  uv_loop_t loop;
  lua_State *L;
  wpool_host *h = (wpool_host *)&loop;
  cr_assert_eq(uv_loop_init(&loop), 0);
  cr_assert_not_null(L = luaL_newstate()); /* no package library */
  cr_assert_eq(wpool_host_new(&loop, L, &h), WP_EINVAL);
  cr_assert_null(h);
  cr_assert_eq(lua_gettop(L), 1);
  cr_assert_not_null(strstr(lua_tostring(L, -1), "package"));
  uv_run(&loop, UV_RUN_DEFAULT); /* the handles it made close */
  cr_assert_eq(uv_loop_close(&loop), 0);
  lua_close(L);
  ASSERT_NO_LEAK(); /* the host itself went with its handles */
}

static atomic_int nevents;

static void counting_sink(const wp_event *ev) {
  atomic_fetch_add(&nevents, 1);
  wpool_host_log_event(ev); /* and keep the JSON log */
}

Test(host, event_sink_and_logging) {
  char path[] = "/tmp/wpool_test_host_XXXXXX", buf[4096];
  FILE *fp;
  size_t n;
  env e;
  int fd, r;
  cr_assert_eq(wpool_host_log_level("warn"), WPOOL_LOG_WARN);
  cr_assert_eq(wpool_host_log_level("off"), WPOOL_LOG_OFF);
  cr_assert_eq(wpool_host_log_level("loud"), WP_EINVAL);
  cr_assert_eq(wpool_host_set_log_level(42), WP_EINVAL);
  r = wpool_host_set_log_file("/nonexistent-dir/wpool.log");
  cr_assert_eq(r, WP_ESYS);
  cr_assert_eq(errno, ENOENT);
  cr_assert_str_eq(wpool_host_strerror(r), "no such file or directory");
  cr_assert_geq(fd = mkstemp(path), 0);
  close(fd);
  cr_assert_eq(wpool_host_set_log_file(path), 0);
  cr_assert_eq(wpool_host_set_log_level(WPOOL_LOG_INFO), 0);
  /* Set before the module is opened: luaopen_workerpool keeps it. */
  wpool_host_set_event_sink(counting_sink);
  env_open(&e);
  cr_assert_eq(run_main(&e, "local wp = require 'workerpool'\n"
                            "local p = wp.new{max_workers = 1, name = 'sunk'}\n"
                            "p:submit_wait(function() return 1 end)\n"
                            "p:stop_wait()\n"),
               0);
  env_close(&e);
  cr_assert_gt(atomic_load(&nevents), 0);
  cr_assert_eq(wpool_host_set_log_file(NULL), 0);
  cr_assert_eq(wpool_host_set_log_level(WPOOL_LOG_OFF), 0);
  wpool_host_set_event_sink(wpool_host_log_event);
  cr_assert_not_null(fp = fopen(path, "r"));
  n = fread(buf, 1, sizeof buf - 1, fp);
  buf[n] = '\0';
  fclose(fp);
  unlink(path);
  cr_assert_not_null(strstr(buf, "\"event\":\"pool.created\""), "%s", buf);
  cr_assert_not_null(strstr(buf, "\"pool\":\"sunk\""), "%s", buf);
}

static void raise_term(uv_timer_t *t) {
  raise(SIGTERM);
  uv_close((uv_handle_t *)t, NULL);
}

static const char shutdown_script[] =
    "local wp = require 'workerpool'\n"
    "wp.on_shutdown(function() shut = (shut or 0) + 1 end)\n"
    "wp.sleep(10)\n";

/* SIGTERM, raised on the loop thread while the main coroutine sleeps. */
static void expect_shutdown_story(env *e) {
  uv_timer_t t;
  uv_timer_init(&e->loop, &t);
  uv_timer_start(&t, raise_term, 20, 0);
  cr_assert_eq(run_main(e, shutdown_script), 0);
  cr_assert_eq(global_int(e->L, "shut"), 1);
  cr_assert_eq(wpool_host_ready(e->h), 0);
}

Test(host, signals_start_the_shutdown_story) {
  struct sigaction before, after;
  lua_State *L2;
  wpool_host *h2;
  env e;
  cr_assert_eq(sigaction(SIGTERM, NULL, &before), 0);
  env_open(&e);
  cr_assert_eq(wpool_host_handle_signals(e.h, 5), 0);
  cr_assert_eq(wpool_host_handle_signals(e.h, 5), 0); /* again: no-op */
  /* One host per process takes them. */
  cr_assert_not_null(L2 = luaL_newstate());
  luaL_openlibs(L2);
  cr_assert_eq(wpool_host_new(&e.loop, L2, &h2), 0);
  cr_assert_eq(wpool_host_handle_signals(h2, 5), WP_EEXISTS);
  wpool_host_close(h2);
  expect_shutdown_story(&e);
  env_close(&e);
  lua_close(L2);
  cr_assert_eq(sigaction(SIGTERM, NULL, &after), 0);
  cr_assert(after.sa_handler == before.sa_handler);
}

/* The drain waits for on_shutdown handlers that suspend (here a sleep),
 * not only for the pools; before, it ended at its first check and the
 * handler was cut off. */
Test(host, drain_waits_for_shutdown_handlers) {
  uv_timer_t t;
  env e;
  env_open(&e);
  cr_assert_eq(wpool_host_handle_signals(e.h, 30), 0);
  uv_timer_init(&e.loop, &t);
  uv_timer_start(&t, raise_term, 20, 0);
  cr_assert_eq(run_main(&e, "local wp = require 'workerpool'\n"
                            "wp.on_shutdown(function()\n"
                            "  wp.sleep(0.2) cleaned = 1 end)\n"
                            "wp.on_shutdown(function() quick = 1 end)\n"
                            "wp.sleep(10)\n"),
               0);
  cr_assert_eq(global_int(e.L, "quick"), 1);
  cr_assert_eq(global_int(e.L, "cleaned"), 1);
  env_close(&e);
}

/* A host on another thread that is refused the signals must not redirect
 * them: they still reach the first host's loop thread. */
static void *refused_host(void *arg) {
  env e;
  (void)arg;
  env_open(&e);
  cr_assert_eq(wpool_host_handle_signals(e.h, 5), WP_EEXISTS);
  env_close(&e);
  return NULL;
}

Test(host, a_refused_host_leaves_the_signals_alone) {
  pthread_t tid;
  env e;
  env_open(&e);
  cr_assert_eq(wpool_host_handle_signals(e.h, 5), 0);
  cr_assert_eq(pthread_create(&tid, NULL, refused_host, NULL), 0);
  cr_assert_eq(pthread_join(tid, NULL), 0);
  expect_shutdown_story(&e);
  env_close(&e);
}

static int l_raise_term(lua_State *L) {
  (void)L;
  raise(SIGTERM);
  return 0;
}

/* A SIGTERM raised by the main script's last call, while a luv handle
 * keeps the loop alive: the story still runs and ends the loop. */
Test(host, sigterm_as_the_script_ends_with_luv_alive) {
  env e;
  env_open(&e);
  cr_assert_eq(wpool_host_handle_signals(e.h, 5), 0);
  lua_register(e.L, "raise_term", l_raise_term);
  cr_assert_eq(run_main(&e,
                        "local wp, uv = require 'workerpool', require 'luv'\n"
                        "local t = uv.new_timer()\n"
                        "t:start(60000, 0, function() end)\n"
                        "wp.on_shutdown(function() shut = 1 end)\n"
                        "raise_term()\n"),
               0);
  cr_assert_eq(global_int(e.L, "shut"), 1);
  env_close(&e);
}

/* The same with the signal raised in a luv callback after the script
 * ended, and in the callback that lets the script end. */
Test(host, sigterm_from_a_luv_callback_as_the_script_ends) {
  static const char *const scripts[] = {
      "local wp, uv = require 'workerpool', require 'luv'\n"
      "wp.on_shutdown(function() shut = 1 end)\n"
      "local t = uv.new_timer()\n"
      "t:start(10, 0, function() raise_term() end)\n",
      "local wp, uv = require 'workerpool', require 'luv'\n"
      "wp.on_shutdown(function() shut = 1 end)\n"
      "local keep = uv.new_timer()\n"
      "keep:start(60000, 0, function() end)\n"
      "wp.await(function(cb)\n"
      "  local t = uv.new_timer()\n"
      "  t:start(10, 0, function() t:close() raise_term() cb() end)\n"
      "end)\n"};
  size_t i;
  for (i = 0; i < sizeof scripts / sizeof *scripts; i++) {
    env e;
    env_open(&e);
    cr_assert_eq(wpool_host_handle_signals(e.h, 5), 0);
    lua_register(e.L, "raise_term", l_raise_term);
    cr_assert_eq(run_main(&e, scripts[i]), 0);
    cr_assert_eq(global_int(e.L, "shut"), 1, "script %zu", i);
    env_close(&e);
  }
}

/* A second signal that finish finds while the story drains forces the hard
 * stop there, outside uv_run: the loop must still run normally afterwards,
 * so that one run after wpool_host_close completes the closes. */
Test(host, hard_stop_in_finish_leaves_the_loop_usable) {
  env e;
  env_open(&e);
  cr_assert_eq(wpool_host_handle_signals(e.h, 30), 0);
  /* One task holds the only worker until the test lets it go; the others
   * wait behind it, for the hard stop to discard. */
  cr_assert_eq(luaL_dostring(e.L, "local wp = require 'workerpool'\n"
                                  "pool = wp.new{max_workers = 1}\n"
                                  "pool:submit(function()\n"
                                  "  local d = require('workerpool')\n"
                                  "    .shared('hard_stop')\n"
                                  "  while not d:get('go') do end\n"
                                  "end)\n"
                                  "for i = 1, 3 do\n"
                                  "  pool:submit(function() end)\n"
                                  "end\n"),
               LUA_OK);
  wpool_host_shutdown(e.h, "test"); /* the story drains */
  raise(SIGTERM);                   /* counted; the loop does not run */
  /* Under TSan the handler may run a little later: wait until it has. */
  while (atomic_load(&e.h->nsig[1]) == 0)
    usleep(1000);
  cr_assert_eq(wpool_host_finish(e.h), WPOOL_EXIT_DISCARDED);
  cr_assert_eq(luaL_dostring(e.L, "require('workerpool').shared('hard_stop')"
                                  ":set('go', true)"),
               LUA_OK);
  wpool_host_close(e.h);
  uv_run(&e.loop, UV_RUN_DEFAULT);
  cr_assert_not(uv_loop_alive(&e.loop));
  lua_close(e.L);
  cr_assert_eq(uv_loop_close(&e.loop), 0);
}

/* An allocator that fails every growing allocation once budget reaches 0
 * (budget < 0: never). */
static long budget = -1;

static void *failing_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  (void)ud;
  if (nsize == 0) {
    free(ptr);
    return NULL;
  }
  if (budget == 0 && (ptr == NULL || nsize > osize)) return NULL;
  if (budget > 0) budget--;
  return realloc(ptr, nsize);
}

/* workerpool.after under memory errors at every step: each call either
 * makes a timer or raises, and nothing leaks (LSan). */
Test(host, timers_leak_nothing_when_memory_runs_out) {
  uv_loop_t loop;
  lua_State *L;
  wpool_host *h;
  int i, made = 0;
  cr_assert_eq(uv_loop_init(&loop), 0);
  cr_assert_not_null(L = lua_newstate(failing_alloc, NULL));
  luaL_openlibs(L);
  cr_assert_eq(wpool_host_new(&loop, L, &h), 0);
  cr_assert_eq(luaL_dostring(L, "local wp = require 'workerpool'\n"
                                "return function()\n"
                                "  return wp.after(1000, print) end"),
               LUA_OK);
  for (i = 0; i < 600; i++) {
    lua_pushvalue(L, -1);
    budget = i % 6;
    if (lua_pcall(L, 0, 1, 0) == LUA_OK) made++;
    budget = -1;
    lua_pop(L, 1);
  }
  cr_assert_gt(made, 0);
  cr_assert_lt(made, 600);
  lua_pop(L, 1);
  wpool_host_close(h); /* stops the timers */
  uv_run(&loop, UV_RUN_DEFAULT);
  lua_close(L);
  uv_run(&loop, UV_RUN_DEFAULT);
  cr_assert_eq(uv_loop_close(&loop), 0);
  ASSERT_NO_LEAK();
}

static void hello(wpool_host *h, wpl_http_reply *r) {
  (void)h;
  r->body = "hello\n";
  r->len = 6;
}

Test(host, serve_errors_are_wp_codes) {
  struct sockaddr_storage ss;
  struct sockaddr_in sin;
  uv_tcp_t taken;
  char addr[64];
  int len = sizeof ss, r;
  env e;
  env_open(&e);
  cr_assert_eq(wpool_host_serve(e.h, "nonsense"), WP_EINVAL);
  uv_ip4_addr("127.0.0.1", 0, &sin);
  uv_tcp_init(&e.loop, &taken);
  cr_assert_eq(uv_tcp_bind(&taken, (struct sockaddr *)&sin, 0), 0);
  cr_assert_eq(uv_listen((uv_stream_t *)&taken, 1, NULL), 0);
  cr_assert_eq(uv_tcp_getsockname(&taken, (struct sockaddr *)&ss, &len), 0);
  snprintf(addr, sizeof addr, "127.0.0.1:%d",
           ntohs(((struct sockaddr_in *)&ss)->sin_port));
  r = wpool_host_serve(e.h, addr);
  cr_assert_eq(r, WP_ESYS);
  cr_assert_eq(errno, EADDRINUSE);
  cr_assert_str_eq(wpool_host_strerror(r), "address already in use");
  uv_close((uv_handle_t *)&taken, NULL);
  cr_assert_eq(wpool_host_serve(e.h, "127.0.0.1:0"), 0);
  cr_assert_eq(wpool_host_serve(e.h, "127.0.0.1:0"), WP_EEXISTS);
  /* Routes: a new one, and taken ones. */
  cr_assert_eq(wpl_http_route("/test/hello", hello), 0);
  cr_assert_eq(wpl_http_route("/test/hello", hello), WP_EEXISTS);
  cr_assert_eq(wpl_http_route("/metrics", hello), WP_EEXISTS);
  env_close(&e);
}

/* ---- fork ------------------------------------------------------------ */

int luaopen_workerpool(lua_State *L);

#if defined(__SANITIZE_THREAD__)
#define FORK_CHILD_THREADS "false" /* TSan: no thread after such a fork */
#else
#define FORK_CHILD_THREADS "true"
#endif

/* Runs chunk in L and returns 0, or prints its error and returns 1. */
static int run_chunk(lua_State *L, const char *chunk) {
  if (luaL_dostring(L, chunk) == LUA_OK) return 0;
  fprintf(stderr, "%s\n", lua_tostring(L, -1));
  return 1;
}

/* The module in a child of fork(): a pool made before it answers
 * EFORKED, its futures end failed, the metrics forget it, closing the
 * state does not wait for workers that are not there, and the child's own
 * pools work (core/fork.c; tests/core/test_fork.c has the C API's). */
Test(host, a_forked_child_sees_the_parents_pools_as_dead) {
  lua_State *L = luaL_newstate();
  int st = 0;
  pid_t pid;
  luaL_openlibs(L);
  luaL_requiref(L, "workerpool", luaopen_workerpool, 1);
  lua_pop(L, 1);
  cr_assert_eq(
      run_chunk(L,
                "wp = require 'workerpool'\n"
                "pool = wp.new { name = 'lua-fork', max_workers = 2 }\n"
                "assert(pool:submit_wait(function() return 1 end) == 1)\n"
                "slow = pool:submit(function()\n"
                "  local t = os.clock() + 0.5\n"
                "  while os.clock() < t do end return 2 end)\n"
                "-- Forked once the task spins (no allocation): under ASan a\n"
                "-- child's malloc hangs on a lock another thread held.\n"
                "while pool:stats().running < 1 do wp.sleep(0.001) end\n"
                "wp.sleep(0.1)\n"),
      0);
  pid = fork();
  cr_assert_neq(pid, -1);
  if (pid == 0) {
    alarm(60);
    if (run_chunk(
            L,
            "local f, msg, name = pool:submit(function() return 1 end)\n"
            "assert(f == nil and name == 'EFORKED', tostring(name))\n"
            "assert(msg:find('before fork'), msg)\n"
            "assert(select(3, pool:post(function() end)) == 'EFORKED')\n"
            "assert(select(3, pool:map(function(x) return x end, {1, 2}))"
            " == 'EFORKED')\n"
            "assert(select(3, pool:submit_wait(function() end)) == 'EFORKED')\n"
            "local ok, err = slow:wait()\n"
            "assert(ok == false and err:find('before fork'), err)\n"
            "assert(slow:status() == 'error')\n"
            "pool:pause() pool:resume() -- nothing to do: no wait\n"
            "assert(pool:stats().running == 0)\n"
            "assert(wp.get('lua-fork') == nil)\n"
            "assert(not wp.metrics():find('pool=\"lua-fork\"'))\n"
            "if " FORK_CHILD_THREADS " then\n"
            "  local q = wp.new { name = 'lua-fork', max_workers = 1 }\n"
            "  assert(q:submit_wait(function(x) return x * 2 end, 21) == 42)\n"
            "  q:stop_wait()\n"
            "end\n"
            "pool:stop_wait()\n"))
      _exit(1);
    lua_close(L); /* the old pool's handle: collected without a join */
    _exit(0);
  }
  cr_assert_eq(waitpid(pid, &st, 0), pid);
  cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0,
            "the child failed or hung (status %d)", st);
  cr_assert_eq(
      run_chunk(L, "assert(slow:wait() == true)\n"
                   "assert(pool:submit_wait(function() return 3 end) == 3)\n"
                   "pool:stop_wait()\n"),
      0);
  lua_close(L);
}
