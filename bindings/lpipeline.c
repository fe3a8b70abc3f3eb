/*
 * lpipeline.c: `wpool pipeline run|check FILE.json`, the command face of
 * workerpool.pipeline (lua/workerpool/pipeline.lua, docs/pipelines.md).
 *
 * `check` loads the module into a plain state and prints every error of
 * pipeline.check to stderr.  `run` runs pipeline.run as the main coroutine
 * of a host loop (so --metrics-addr serves while it runs) and takes
 * SIGINT/SIGTERM itself instead of the host's shutdown story, which would
 * stop every stage at once: the first signal tells the runner to stop
 * reading and drain the stages in order, a second one stops at once.  The
 * runner polls the signal count through a C closure and hands back its
 * exit status through another.
 */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lualib.h>

#include "lpipeline.h"
#include "wpool_host.h"

typedef struct cli {
  int signals;   /* SIGINT/SIGTERM received */
  int exit_code; /* set by the runner */
  uv_signal_t sigint, sigterm;
} cli;

static const char usage[] =
    "usage: wpool pipeline run [options] FILE.json\n"
    "       wpool pipeline check FILE.json\n"
    "\n"
    "run options:\n"
    "  --resume                 skip the items the checkpoint covers, append\n"
    "  --progress               live per-stage lines on stderr\n"
    "  --no-progress            neither live lines nor pipeline.progress logs\n"
    "  --drain-timeout SECONDS  on SIGINT/SIGTERM, drain this long (25)\n"
    "  --metrics-addr HOST:PORT serve GET /metrics, /healthz and /readyz\n"
    "  --log-level LEVEL        debug, info (default), warn or error\n"
    "\n"
    "exit status: 0 done, 1 bad config, I/O error or a stage failed,\n"
    "2 usage error, 3 interrupted with work left undone\n";

int wpl_usage_error(const char *help, const char *fmt, const char *arg) {
  fprintf(stderr, "wpool: ");
  fprintf(stderr, fmt, arg);
  fprintf(stderr, "\nTry '%s'.\n", help);
  return 2;
}

int wpl_cli_host_open(uv_loop_t *loop, lua_State **L, wpool_host **h,
                      double drain_timeout, const char *metrics_addr) {
  int r;
  if (uv_loop_init(loop) != 0) {
    fprintf(stderr, "wpool: cannot create the event loop\n");
    return 1;
  }
  if ((*L = luaL_newstate()) == NULL) {
    fprintf(stderr, "wpool: not enough memory\n");
    return 1;
  }
  luaL_openlibs(*L);
  if ((r = wpool_host_new(loop, *L, h)) != 0 ||
      (drain_timeout >= 0 &&
       (r = wpool_host_handle_signals(*h, drain_timeout)) != 0)) {
    fprintf(stderr, "wpool: cannot start the host runtime: %s\n",
            wpool_host_strerror(r));
    return 1;
  }
  if (metrics_addr && (r = wpool_host_serve(*h, metrics_addr)) != 0) {
    fprintf(stderr, "wpool: cannot serve on %s: %s\n", metrics_addr,
            wpool_host_strerror(r));
    return 1;
  }
  return 0;
}

static int usage_error(const char *fmt, const char *arg) {
  return wpl_usage_error("wpool pipeline --help", fmt, arg);
}

/* [-0, +1, -] The number of signals so far (upvalue 1: the cli). */
static int cli_interrupted(lua_State *L) {
  cli *c = lua_touserdata(L, lua_upvalueindex(1));
  lua_pushinteger(L, c->signals);
  return 1;
}

/* [-0, +0, v] set_exit(code). */
static int cli_set_exit(lua_State *L) {
  cli *c = lua_touserdata(L, lua_upvalueindex(1));
  c->exit_code = (int)luaL_checkinteger(L, 1);
  return 0;
}

static void cli_signal(uv_signal_t *s, int signum) {
  cli *c = s->data;
  (void)signum;
  c->signals++;
}

static const char check_chunk[] =
    "local file = ...\n"
    "local ok, errs = require('workerpool').pipeline.check(file)\n"
    "if ok then return 0 end\n"
    "for _, e in ipairs(errs) do io.stderr:write(e, '\\n') end\n"
    "return 1\n";

static const char run_chunk[] =
    "local file, resume, progress, drain, interrupted, set_exit = ...\n"
    "local rep, err = require('workerpool').pipeline.run(file, {\n"
    "  resume = resume, progress = progress, drain_timeout = drain,\n"
    "  interrupted = interrupted })\n"
    "if not rep then\n"
    "  io.stderr:write(err, '\\n')\n"
    "  return set_exit(1)\n"
    "end\n"
    "if rep.status == 'failed' then\n"
    "  io.stderr:write('wpool: pipeline ', rep.pipeline, ' failed: ',\n"
    "                  tostring(rep.error), '\\n')\n"
    "end\n"
    "set_exit(rep.exit_code)\n";

static int do_check(const char *file) {
  lua_State *L = luaL_newstate();
  int code;
  if (L == NULL) {
    fprintf(stderr, "wpool: not enough memory\n");
    return 1;
  }
  luaL_openlibs(L);
  wpl_log_set_level(WPL_WARN); /* no pool.created lines for scratch pools */
  luaL_requiref(L, "workerpool", luaopen_workerpool, 0);
  lua_pop(L, 1);
  if (luaL_loadstring(L, check_chunk) != LUA_OK) {
    code = 1;
  } else {
    lua_pushstring(L, file);
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
      fprintf(stderr, "wpool: %s\n", lua_tostring(L, -1));
      code = 1;
    } else {
      code = (int)lua_tointeger(L, -1);
    }
  }
  lua_close(L);
  return code;
}

typedef struct run_opts {
  const char *file, *metrics_addr;
  int resume, progress; /* progress: 1 on, 0 off, -1 when stderr is a tty */
  double drain_timeout;
} run_opts;

static int do_run(const run_opts *o) {
  uv_loop_t loop;
  lua_State *L;
  wpool_host *h;
  cli c;
  int code;
  memset(&c, 0, sizeof c);
  /* The pipeline's own signal handles, not the host's story. */
  if (wpl_cli_host_open(&loop, &L, &h, -1, o->metrics_addr)) return 1;
  uv_signal_init(&loop, &c.sigint);
  uv_signal_init(&loop, &c.sigterm);
  c.sigint.data = c.sigterm.data = &c;
  uv_signal_start(&c.sigint, cli_signal, SIGINT);
  uv_signal_start(&c.sigterm, cli_signal, SIGTERM);
  uv_unref((uv_handle_t *)&c.sigint);
  uv_unref((uv_handle_t *)&c.sigterm);
  c.exit_code = 1;
  if (luaL_loadstring(L, run_chunk) != LUA_OK) {
    fprintf(stderr, "wpool: %s\n", lua_tostring(L, -1));
  } else {
    lua_pushstring(L, o->file);
    lua_pushboolean(L, o->resume);
    if (o->progress < 0)
      lua_pushnil(L);
    else
      lua_pushboolean(L, o->progress);
    lua_pushnumber(L, o->drain_timeout);
    lua_pushlightuserdata(L, &c);
    lua_pushcclosure(L, cli_interrupted, 1);
    lua_pushlightuserdata(L, &c);
    lua_pushcclosure(L, cli_set_exit, 1);
    wpool_host_spawn(h, 6, 1);
    uv_run(&loop, UV_RUN_DEFAULT);
  }
  code = wpool_host_exit_code(h) == 1 ? 1 : c.exit_code;
  uv_close((uv_handle_t *)&c.sigint, NULL);
  uv_close((uv_handle_t *)&c.sigterm, NULL);
  if (wpool_host_abandoned(h)) {
    fflush(NULL);
    _exit(code);
  }
  wpool_host_close(h);
  uv_run(&loop, UV_RUN_DEFAULT);
  lua_close(L);
  uv_run(&loop, UV_RUN_DEFAULT);
  if (uv_loop_close(&loop) != 0) uv_print_all_handles(&loop, stderr);
  return code;
}

int wpl_pipeline_main(int argc, char **argv) {
  run_opts o = {NULL, NULL, 0, -1, 25};
  int i, check;
  char *end;
  if (argc < 2 || strcmp(argv[1], "--help") == 0 ||
      strcmp(argv[1], "-h") == 0) {
    fputs(usage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  if (strcmp(argv[1], "run") != 0 && strcmp(argv[1], "check") != 0)
    return usage_error("unknown pipeline command '%s'", argv[1]);
  check = strcmp(argv[1], "check") == 0;
  for (i = 2; i < argc; i++) {
    const char *opt = argv[i];
    if (opt[0] != '-' || opt[1] == '\0') {
      if (o.file) return usage_error("unexpected argument '%s'", opt);
      o.file = opt;
      continue;
    }
    if (check) return usage_error("unknown option '%s'", opt);
    if (strcmp(opt, "--resume") == 0) {
      o.resume = 1;
    } else if (strcmp(opt, "--progress") == 0) {
      o.progress = 1;
    } else if (strcmp(opt, "--no-progress") == 0) {
      o.progress = 0;
    } else if (i + 1 >= argc && (strcmp(opt, "--drain-timeout") == 0 ||
                                 strcmp(opt, "--metrics-addr") == 0 ||
                                 strcmp(opt, "--log-level") == 0)) {
      return usage_error("option %s needs a value", opt);
    } else if (strcmp(opt, "--drain-timeout") == 0) {
      errno = 0;
      o.drain_timeout = strtod(argv[++i], &end);
      if (errno || *end || end == argv[i] || !(o.drain_timeout >= 0) ||
          isinf(o.drain_timeout))
        return usage_error("--drain-timeout needs a number of seconds, "
                           "got '%s'",
                           argv[i]);
    } else if (strcmp(opt, "--metrics-addr") == 0) {
      o.metrics_addr = argv[++i];
    } else if (strcmp(opt, "--log-level") == 0) {
      int level = wpl_log_level_parse(argv[++i]);
      if (level < 0)
        return usage_error("--log-level must be debug, info, warn or "
                           "error, got '%s'",
                           argv[i]);
      wpl_log_set_level(level);
    } else {
      return usage_error("unknown option '%s'", opt);
    }
  }
  if (o.file == NULL)
    return usage_error("pipeline %s needs FILE.json", argv[1]);
  if (check) return do_check(o.file);
  if (o.progress < 0) o.progress = isatty(2) ? 1 : -1;
  return do_run(&o);
}
