/*
 * fuzz_decode.c: libFuzzer target for the value decoder (core/codec.c).
 *
 * The input is a value message as a result carries it: a varint count,
 * then that many values in the wire format of docs/values.md.  Whatever the
 * bytes, decoding must end in values or in a clean Lua error, and the C reader
 * (wp__get_cvalue, used by wp_future_values) in values or WP_EINVAL: never a
 * crash, a leak, a sanitizer report or a hang.  Decoded functions are never
 * called, since a message's bytecode is trusted (messages never leave the
 * process).
 *
 * Record 0 of the function store is made up, so that WP__T_FUNCID has
 * something to name.
 *
 * The state's allocator refuses more than MEM_CAP bytes, as a worker with
 * memory_limit does: Lua's bytecode loader believes the sizes a chunk
 * announces, so a forged one can ask for terabytes, which must end as a
 * clean "not enough memory".
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lualib.h>

#include "wp_internal.h"

#define MEM_CAP (64u << 20)

static void *capped_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  size_t *used = ud;
  if (ptr == NULL) osize = 0;
  if (nsize == 0) {
    free(ptr);
    *used -= osize;
    return NULL;
  }
  if (nsize > osize && nsize - osize > MEM_CAP - *used) return NULL;
  if ((ptr = realloc(ptr, nsize)) != NULL) *used = *used - osize + nsize;
  return ptr;
}

/* Lua does not check binary chunks ("maliciously crafted binary chunks
 * can crash the interpreter", manual 4.6), and a message's bytecode is
 * trusted: messages never leave the process.  So the decoder's calls to
 * luaL_loadbufferx are wrapped at link time (-Wl,--wrap): a binary chunk
 * fails as a clean error, and the rest of the function path still runs. */
int __real_luaL_loadbufferx(lua_State *L, const char *buff, size_t sz,
                            const char *name, const char *mode);
int __wrap_luaL_loadbufferx(lua_State *L, const char *buff, size_t sz,
                            const char *name, const char *mode);
int __wrap_luaL_loadbufferx(lua_State *L, const char *buff, size_t sz,
                            const char *name, const char *mode) {
  if (sz > 0 && buff[0] == LUA_SIGNATURE[0]) {
    lua_pushliteral(L, "binary chunk not loaded by the fuzzer");
    return LUA_ERRSYNTAX;
  }
  return __real_luaL_loadbufferx(L, buff, sz, name, mode);
}

/* require in the fuzzed state: refuses every module, so that names read
 * from the input never reach the file system. */
static int no_require(lua_State *L) {
  return luaL_error(L, "module '%s' not found", luaL_checkstring(L, 1));
}

/* [-2, +0, e] Decodes the number of values (argument 2) of the message
 * that the reader (argument 1, a light userdata) holds, with a
 * compiled-function cache, and walks the tables decoded. */
static int decode_pmain(lua_State *L) {
  wp__reader *r = lua_touserdata(L, 1);
  int n = (int)lua_tointeger(L, 2), i;
  lua_newtable(L); /* the compiled-function cache */
  wp__decode(L, r, n, lua_gettop(L));
  /* Walk the tables decoded, as a receiver would read them. */
  for (i = 0; i < n; i++) {
    int idx = lua_gettop(L) - i;
    if (lua_istable(L, idx)) {
      lua_pushnil(L);
      while (lua_next(L, idx))
        lua_pop(L, 1);
    }
  }
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Puts one record in the function store, so that WP__T_FUNCID 0 names
 * something (its chunk is text, refused by the binary-only load). */
static void seed_store(void) {
  static int seeded;
  char rec[12 + 8];
  uint64_t id = 1;
  uint32_t len = 8, index;
  if (seeded) return;
  seeded = 1;
  memcpy(rec, &id, 8);
  memcpy(rec + 8, &len, 4);
  memcpy(rec + 12, "return 1", 8);
  if (wp__fnstore_intern(rec, sizeof rec, &index) != 0 || index != 0)
    __builtin_trap();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  wp__reader r;
  const char *first;
  wp_value v;
  size_t used = 0;
  lua_State *L;
  int st;
  uint64_t n;
  seed_store();
  r.p = (const char *)data;
  r.end = (const char *)data + size;
  if (wp__get_varint(&r, &n) || n > INT32_MAX) return 0;
  first = r.p;
  /* The C reader: values until the end or the first malformed one. */
  while (r.p < r.end && wp__get_cvalue(&r, &v) == 0)
    if (v.type == WP_TSTRING && (v.u.s.ptr < (const char *)data ||
                                 v.u.s.len > (size_t)(r.end - v.u.s.ptr)))
      __builtin_trap(); /* a string must lie inside the message */
  /* Decoding into a state. */
  L = lua_newstate(capped_alloc, &used);
  if (L == NULL) return 0;
  luaL_openlibs(L);
  lua_register(L, "require", no_require);
  r.p = first;
  lua_pushcfunction(L, decode_pmain);
  lua_pushlightuserdata(L, &r);
  lua_pushinteger(L, (lua_Integer)n);
  st = lua_pcall(L, 2, 0, 0);
  if (st != LUA_OK && st != LUA_ERRMEM && !lua_isstring(L, -1))
    __builtin_trap(); /* errors are messages */
  lua_close(L);
  return 0;
}
