/*
 * luahost.c: a minimal Lua 5.4 interpreter for the benchmark's instruction
 * counts.  Debian's lua5.4 binary is stripped, so callgrind cannot name
 * Lua's own functions in it; this one links the static liblua5.4.a (which
 * keeps its symbols) and exports the Lua API to the modules it loads.
 * driver.lua builds it into BUILD/bench/luahost and runs both engines'
 * workloads under callgrind with it:
 *   luahost script.lua [args...]      (arg as lua5.4 sets it)
 */
#include <stdio.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

static int msgh(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  luaL_traceback(L, L, msg ? msg : "(error object is not a string)", 1);
  return 1;
}

int main(int argc, char **argv) {
  lua_State *L;
  int i, st;
  if (argc < 2) {
    fprintf(stderr, "usage: luahost script.lua [args...]\n");
    return 2;
  }
  if ((L = luaL_newstate()) == NULL) return 1;
  luaL_openlibs(L);
  lua_createtable(L, argc, 1);
  for (i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - 1); /* argv[1], the script, is arg[0] */
  }
  lua_setglobal(L, "arg");
  lua_pushcfunction(L, msgh);
  st = luaL_loadfile(L, argv[1]);
  if (st == LUA_OK) st = lua_pcall(L, 0, 0, 1);
  if (st != LUA_OK) fprintf(stderr, "luahost: %s\n", lua_tostring(L, -1));
  lua_close(L);
  return st == LUA_OK ? 0 : 1;
}
