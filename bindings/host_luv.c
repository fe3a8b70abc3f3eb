/*
 * host_luv.c: luv bound to the host's loop.  `require "luv"` in a host
 * state gives luv with luv_set_loop(the host's loop), its callback errors
 * logged instead of exiting the process, and wpool_host_close closes the
 * luv handles a script left open.
 */
#include "host_internal.h"

/* luv.h declares a function type without a prototype. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstrict-prototypes"
#include <luv/luv.h>
#pragma GCC diagnostic pop

/* ---- luv on the host loop, and await --------------------------------- */

/* [-1, +1, m] Message handler: the error (another value by its
 * __tostring) with a traceback. */
static int traceback_msgh(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) msg = luaL_tolstring(L, 1, NULL);
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* [-0, +0, e] Closes every luv handle still open (found through the
 * registry, where luv keeps each open handle), so that the loop run after
 * wpool_host_close ends even when the script left a server listening. */
int wpl_host_close_luv_pmain(lua_State *L) {
  static const char closer[] =
      "local reg, open = ..., {}\n"
      "for _, v in pairs(reg) do\n"
      "  local mt = type(v) == 'userdata' and getmetatable(v)\n"
      "  local name = type(mt) == 'table' and rawget(mt, '__name')\n"
      "  if type(name) == 'string' and name:match('^uv_') then\n"
      "    local ok, closing = pcall(function() return v:is_closing() end)\n"
      "    if ok and closing == false then open[#open + 1] = v end\n"
      "  end\n"
      "end\n"
      "for _, v in ipairs(open) do pcall(v.close, v) end\n";
  if (luaL_loadbuffer(L, closer, sizeof closer - 1, "=close_luv") != LUA_OK)
    return lua_error(L);
  lua_pushvalue(L, LUA_REGISTRYINDEX);
  lua_call(L, 1, 0);
  return 0;
}

/* luv's callback runner (luv_set_callback): an error in a luv callback is
 * logged as coroutine.error with its traceback, instead of luv's default
 * of printing it and exiting the process.  Returns what luv expects: the
 * number of results, or a negative status. */
static int luv_callback_pcall(lua_State *L, int nargs, int nresults,
                              int flags) {
  int base = lua_gettop(L) - nargs, st; /* base: the function */
  (void)flags;
  lua_pushcfunction(L, traceback_msgh);
  lua_insert(L, base);
  st = lua_pcall(L, nargs, nresults, base);
  if (st != LUA_OK) {
    const char *msg = lua_tostring(L, -1);
    wpl_log(
        WPL_ERROR, "coroutine.error",
        json_pack("{s:o}", "error",
                  wpl_json_str(msg ? msg : "(error object is not a string)")));
    lua_settop(L, base - 1);
    return -st;
  }
  lua_remove(L, base);
  return nresults == LUA_MULTRET ? lua_gettop(L) - base + 1 : nresults;
}

/* [-0, +1, e] luaopen for package.loaded.luv: luv bound to the host loop. */
int wpl_host_open_luv(lua_State *L) {
  wpool_host *h = lua_touserdata(L, lua_upvalueindex(1));
  luv_set_loop(L, h->loop);
  luv_set_callback(L, luv_callback_pcall);
  return luaopen_luv(L);
}

/* One workerpool.await: the callback's upvalue.  Uservalue 1: the awaiting
 * coroutine's handle while it waits, then the arguments of a callback that
 * ran before fn returned. */
