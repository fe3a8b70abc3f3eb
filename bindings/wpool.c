/*
 * wpool.c: the `wpool` command.  `wpool run script.lua [args...]` runs a
 * script as the main coroutine of a libuv loop with the workerpool module
 * loaded, and exits once no coroutine, timer or pool has work left, or once
 * a SIGINT/SIGTERM shutdown has drained the pools.  Pools still busy when
 * the script ends drain inside the loop, so a signal still bounds them.  It is
 * to the host runtime (host_*.c) what lua.c is to lauxlib.
 *
 * SIGPIPE is ignored, as servers do: a write to a peer that has gone (a
 * luv socket, a closed stdout pipe) fails with EPIPE instead of killing
 * the process.
 *
 * Exit status: 0 success; 1 the script failed; 2 bad usage;
 * 3 (WPOOL_EXIT_DISCARDED) a shutdown discarded or abandoned tasks.
 */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lualib.h>

#include "lbind.h"
#include "lpipeline.h"
#include "wpool_host.h"

static const char usage[] =
    "usage: wpool run [options] script.lua [args...]\n"
    "       wpool pipeline run [options] FILE.json\n"
    "       wpool pipeline check FILE.json\n"
    "       wpool --help | --version\n"
    "\n"
    "Runs script.lua as the main coroutine of an event loop, with the\n"
    "workerpool module loaded.  Inside it, submit_wait, f:wait, sleep and\n"
    "join suspend only the calling coroutine.  `wpool pipeline` runs or\n"
    "checks a config-driven pipeline (wpool pipeline --help).\n"
    "\n"
    "options:\n"
    "  --drain-timeout SECONDS  on SIGINT/SIGTERM, drain pools this long\n"
    "                           before discarding what is left (default 25)\n"
    "  --log-level LEVEL        debug, info (default), warn or error\n"
    "  --log-file PATH          append JSON log lines to PATH, not stderr\n"
    "  --metrics-addr HOST:PORT serve GET /metrics, /healthz and /readyz\n"
    "\n"
    "exit status: 0 ok, 1 script error, 2 usage error, 3 shutdown discarded "
    "work\n";

static int usage_error(const char *fmt, const char *arg) {
  return wpl_usage_error("wpool --help", fmt, arg);
}

/* [-0, +0, m] Sets the global `arg` the way lua.c does: arg[0] is the
 * script, arg[1..n] its arguments, arg[-1] the command. */
static void set_arg(lua_State *L, char **argv, int script, int argc) {
  int i;
  lua_createtable(L, argc - script, script + 1);
  for (i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - script);
  }
  lua_setglobal(L, "arg");
}

typedef struct run_opts {
  double drain_timeout;
  const char *metrics_addr; /* or NULL */
  const char *script;
  int script_index;
} run_opts;

static int run(int argc, char **argv, const run_opts *o) {
  uv_loop_t loop;
  lua_State *L;
  wpool_host *h;
  int i, nargs, code;
  FILE *fp = fopen(o->script, "r");
  if (fp == NULL) {
    fprintf(stderr, "wpool: cannot open %s: %s\n", o->script, strerror(errno));
    return 1;
  }
  fclose(fp);
  if (wpl_cli_host_open(&loop, &L, &h, o->drain_timeout, o->metrics_addr))
    return 1;
  set_arg(L, argv, o->script_index, argc);
  if (luaL_loadfile(L, o->script) != LUA_OK) {
    fprintf(stderr, "wpool: %s\n", lua_tostring(L, -1));
    code = 1;
  } else {
    nargs = argc - o->script_index - 1;
    luaL_checkstack(L, nargs, "too many arguments");
    for (i = o->script_index + 1; i < argc; i++)
      lua_pushstring(L, argv[i]);
    wpool_host_spawn(h, nargs, 1);
    uv_run(&loop, UV_RUN_DEFAULT);
    code = wpool_host_finish(h); /* pools drain here, signals still heard */
  }
  if (wpool_host_abandoned(h)) {
    /* Workers stuck in running tasks cannot be joined: leave now. */
    fflush(NULL);
    _exit(code);
  }
  wpool_host_close(h);
  uv_run(&loop, UV_RUN_DEFAULT);
  lua_close(L); /* owned pools drain here */
  uv_run(&loop, UV_RUN_DEFAULT);
  if (uv_loop_close(&loop) != 0) uv_print_all_handles(&loop, stderr);
  return code;
}

int main(int argc, char **argv) {
  run_opts o = {25, NULL, NULL, 0};
  int i;
  char *end;
  /* the module alone logs nothing by default */
  wpool_host_set_log_level(WPOOL_LOG_INFO);
  signal(SIGPIPE, SIG_IGN);
  if (argc < 2) {
    fputs(usage, stderr);
    return 2;
  }
  if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
    fputs(usage, stdout);
    return 0;
  }
  if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-v") == 0) {
    printf("wpool %s (%s, libuv %s)\n", WP_VERSION, LUA_RELEASE,
           uv_version_string());
    return 0;
  }
  if (strcmp(argv[1], "pipeline") == 0)
    return wpl_pipeline_main(argc - 1, argv + 1);
  if (strcmp(argv[1], "run") != 0)
    return usage_error("unknown command '%s'", argv[1]);
  for (i = 2; i < argc && argv[i][0] == '-' && argv[i][1] != '\0'; i++) {
    const char *opt = argv[i];
    if (strcmp(opt, "--") == 0) {
      i++;
      break;
    }
    if (strcmp(opt, "--help") == 0) {
      fputs(usage, stdout);
      return 0;
    }
    if (i + 1 >= argc) return usage_error("option %s needs a value", opt);
    if (strcmp(opt, "--drain-timeout") == 0) {
      errno = 0;
      o.drain_timeout = strtod(argv[i + 1], &end);
      if (errno || *end || end == argv[i + 1] || !(o.drain_timeout >= 0) ||
          isinf(o.drain_timeout))
        return usage_error("--drain-timeout needs a number of seconds, "
                           "got '%s'",
                           argv[i + 1]);
    } else if (strcmp(opt, "--metrics-addr") == 0) {
      o.metrics_addr = argv[i + 1];
    } else if (strcmp(opt, "--log-level") == 0) {
      int level = wpool_host_log_level(argv[i + 1]);
      if (level < 0)
        return usage_error("--log-level must be debug, info, warn or "
                           "error, got '%s'",
                           argv[i + 1]);
      wpool_host_set_log_level(level);
    } else if (strcmp(opt, "--log-file") == 0) {
      if (wpool_host_set_log_file(argv[i + 1]) != 0) {
        fprintf(stderr, "wpool: cannot open log file %s: %s\n", argv[i + 1],
                strerror(errno));
        return 1;
      }
    } else {
      return usage_error("unknown option '%s'", opt);
    }
    i++;
  }
  if (i >= argc) return usage_error("%s", "run needs a script");
  o.script = argv[i];
  o.script_index = i;
  return run(argc, argv, &o);
}
