/*
 * lpipeline.h: the pipeline pieces of the module and the command:
 * workerpool.json (ljson.c) and `wpool pipeline run|check` (pipeline_cli.c).
 * The runner itself is Lua (lua/workerpool/pipeline.lua).
 */
#ifndef WPOOL_LPIPELINE_H
#define WPOOL_LPIPELINE_H

#include "lbind.h"
#include "wpool_host.h"

/* A growable byte buffer kept in a userdata at a fixed stack index, so
 * that the stack may be used freely between writes (luaL_Buffer wants its
 * box on top) and nothing leaks when a memory error unwinds. */
typedef struct wpl_wbuf {
  lua_State *L;
  int idx; /* stack index of the userdata holding the bytes */
  char *p; /* its bytes */
  size_t n, cap;
} wpl_wbuf;

/* [-0, +1, m] Pushes the buffer's userdata, with room for cap bytes. */
WPL_HIDDEN void wpl_wbuf_init(lua_State *L, wpl_wbuf *b, size_t cap);
/* [-0, +0, m] Room for n more bytes; returns where they go. */
WPL_HIDDEN char *wpl_wbuf_reserve(wpl_wbuf *b, size_t n);
/* [-0, +0, m] Appends n bytes. */
WPL_HIDDEN void wpl_wbuf_add(wpl_wbuf *b, const void *s, size_t n);

/* The json.null sentinel (a light C function). */
WPL_HIDDEN int wpl_json_null(lua_State *L);

/* [-0, +0, m] Sets pack, unpack, lines, split and results (lpack.c) in
 * the module table at the top of the stack, under the raw keys
 * "pipeline.pack", "pipeline.unpack", "pipeline.lines", "pipeline.split"
 * and "pipeline.results". */
WPL_HIDDEN void wpl_pack_open(lua_State *L);

/* [-0, +0, m] Sets workerpool.json in the module table at the top of the
 * stack, and registers its functions so that they cross states by name. */
WPL_HIDDEN void wpl_json_open(lua_State *L);

/* Prints "wpool: " and fmt with arg, then "Try '<help>'." to stderr, and
 * returns 2, the exit status of a usage error.  Main thread only. */
WPL_HIDDEN int wpl_usage_error(const char *help, const char *fmt,
                               const char *arg);

/* Starts what every `wpool` subcommand runs on: the loop, a state with the
 * standard libraries, the host on them (with the signal story when
 * drain_timeout >= 0) and the metrics server when metrics_addr is not
 * NULL.  0, or 1 after a message on stderr (the process then exits, so
 * what was made is left to it).  Main thread only. */
WPL_HIDDEN int wpl_cli_host_open(uv_loop_t *loop, lua_State **L, wpool_host **h,
                                 double drain_timeout,
                                 const char *metrics_addr);

/* `wpool pipeline ...`: argv[0] is "pipeline".  Returns the exit status:
 * 0 done, 1 bad config, unreadable source, unwritable sink or a failed
 * stage, 2 bad usage, 3 interrupted with work left undone. */
WPL_HIDDEN int wpl_pipeline_main(int argc, char **argv);

#endif
