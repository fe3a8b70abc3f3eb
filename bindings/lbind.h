/*
 * lbind.h: internal interface between the files of the `workerpool` Lua
 * module.  Only luaopen_workerpool is exported from the module; everything
 * here has hidden visibility and the wpl_ prefix.
 */
#ifndef WPOOL_LBIND_H
#define WPOOL_LBIND_H

#include <lauxlib.h>
#include <lua.h>

#include "wpool.h"

#define WPL_HIDDEN __attribute__((visibility("hidden")))

/* Metatable names (also the __name shown in error messages). */
#define WPL_POOL_MT "workerpool.pool"
#define WPL_FUTURE_MT "workerpool.future"
#define WPL_SHARED_MT "workerpool.shared"

/* [-0, +0, m] Registers the shared-dictionary metatable. */
WPL_HIDDEN void wpl_shared_init(lua_State *L);

/* workerpool.shared(name [, opts]) -> dict   [-0, +1, e] */
WPL_HIDDEN int wpl_shared_open(lua_State *L);

/* [-0, +3, m] Pushes nil, the error message and the error name; returns 3,
 * the conventional runtime-failure return of every module function. */
WPL_HIDDEN int wpl_pusherr(lua_State *L, int err);

#endif
