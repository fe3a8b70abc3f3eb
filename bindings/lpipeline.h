/*
 * lpipeline.h: the pipeline pieces of the module and the command:
 * workerpool.json (ljson.c) and `wpool pipeline run|check` (pipeline_cli.c).
 * The runner itself is Lua (lua/workerpool/pipeline.lua).
 */
#ifndef WPOOL_LPIPELINE_H
#define WPOOL_LPIPELINE_H

#include "lbind.h"

/* [-0, +0, m] Sets workerpool.json in the module table at the top of the
 * stack, and registers its functions so that they cross states by name. */
WPL_HIDDEN void wpl_json_open(lua_State *L);

/* `wpool pipeline ...`: argv[0] is "pipeline".  Returns the exit status:
 * 0 done, 1 bad config, unreadable source, unwritable sink or a failed
 * stage, 2 bad usage, 3 interrupted with work left undone. */
WPL_HIDDEN int wpl_pipeline_main(int argc, char **argv);

#endif
