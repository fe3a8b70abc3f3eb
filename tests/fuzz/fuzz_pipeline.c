/*
 * fuzz_pipeline.c: libFuzzer target for the pipeline config loader
 * (lua/workerpool/pipeline.lua on workerpool.json, docs/pipelines.md).
 *
 * Each input is written to a file and checked the way `wpool pipeline
 * check FILE` checks it: workerpool.pipeline.check(path) in a fresh state
 * that has the workerpool module.  Whatever the bytes, check must return
 * true or nil and a non-empty list of strings, and never raise, crash,
 * leak or hang.  The file lives in a folder of its own, so relative module
 * paths in a config find nothing but the config itself.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lualib.h>

int luaopen_workerpool(lua_State *L);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char path[4096];

static void fail(const char *what) {
  fprintf(stderr, "pipeline: %s\n", what);
  __builtin_trap();
}

/* [-1, +0, -] Checks check's results above base: true, or nil and a
 * non-empty list of strings. */
static void expect_verdict(lua_State *L, int base) {
  lua_Integer i, n;
  if (lua_toboolean(L, base + 1)) return;
  if (!lua_isnil(L, base + 1) || !lua_istable(L, base + 2))
    fail("check returned neither true nor nil and a list");
  n = (lua_Integer)luaL_len(L, base + 2);
  if (n < 1) fail("an empty list of errors");
  for (i = 1; i <= n; i++) {
    if (lua_geti(L, base + 2, i) != LUA_TSTRING) fail("an error not a string");
    lua_pop(L, 1);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L;
  FILE *f;
  int base;
  if (path[0] == '\0') {
    char dir[] = "/tmp/wpool-fuzz-pipeline.XXXXXX";
    if (mkdtemp(dir) == NULL) fail("mkdtemp");
    snprintf(path, sizeof path, "%s/config.json", dir);
  }
  if ((f = fopen(path, "wb")) == NULL) fail("cannot write the config");
  if (size && fwrite(data, 1, size, f) != size) fail("short write");
  fclose(f);
  if ((L = luaL_newstate()) == NULL) return 0;
  luaL_openlibs(L);
  luaL_requiref(L, "workerpool", luaopen_workerpool, 1);
  base = lua_gettop(L);
  lua_getfield(L, -1, "pipeline");
  lua_getfield(L, -1, "check");
  lua_remove(L, -2);
  lua_pushstring(L, path);
  if (lua_pcall(L, 1, 2, 0) != LUA_OK) {
    fprintf(stderr, "pipeline: check raised: %s\n", lua_tostring(L, -1));
    __builtin_trap();
  }
  expect_verdict(L, base);
  lua_close(L);
  return 0;
}
