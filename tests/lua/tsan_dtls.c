/* tsan_dtls.c: the TSan build's guard for lua.test_pipeline's old crash.
 *
 * The Lua suites load workerpool.so with dlopen, so its thread-locals
 * (core/worker.c's `current`) live in dynamic TLS, allocated with malloc
 * at each worker thread's first access through __tls_get_addr.  GCC 12's
 * libtsan hooks that call and, when the new block sits at page offset 16,
 * takes the 16 bytes before it for a glibc 2.19 header {size, start}; since
 * glibc 2.25 they belong to another malloc chunk, so TSan resets the shadow
 * of a garbage range and dies ("ThreadSanitizer failed to allocate
 * 0x1ec200001e000 bytes ... (errno: 12)").  tests/CMakeLists.txt turns the
 * hook off (intercept_tls_get_addr=0): glibc's malloc'd blocks get fresh
 * shadow from TSan's allocator anyway.
 *
 * This program makes the bad case likely rather than rare: before each
 * pool it fills freed chunks of the TLS block's size class with a header
 * that would crash TSan, then starts fresh worker threads.  It passes when
 * every round completes.  Usage: tsan_dtls [rounds]; LUA_CPATH must find
 * the module. */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* pollute() [-0, +0, m]: frees 4096 16-byte chunks that each hold a
 * {size, start} pair TSan would choke on, for new threads to reuse. */
static int pollute(lua_State *L) {
  enum { N = 4096 };
  static uintptr_t *p[N];
  for (int i = 0; i < N; i++) {
    p[i] = malloc(16);
    if (!p[i]) return luaL_error(L, "out of memory");
    p[i][0] = (uintptr_t)0x7b0800007800u; /* "size": a heap address */
    p[i][1] = (uintptr_t)0x400000400u;    /* "start" */
  }
  for (int i = 0; i < N; i++)
    free(p[i]);
  return 0;
}

static const char script[] =
    "local workerpool = require 'workerpool'\n"
    "local rounds = ...\n"
    "for r = 1, rounds do\n"
    "  pollute()\n"
    "  local pool = workerpool.new{ max_workers = 4 }\n"
    "  local f = {}\n"
    "  for i = 1, 8 do f[i] = pool:submit(function(x) return x end, i) end\n"
    "  for i = 1, 8 do assert(select(2, f[i]:wait()) == i) end\n"
    "  pool:stop_wait()\n"
    "end\n";

int main(int argc, char **argv) {
  int rounds = argc > 1 ? atoi(argv[1]) : 200;
  lua_State *L = luaL_newstate();
  if (!L) return 2;
  luaL_openlibs(L);
  lua_register(L, "pollute", pollute);
  int rc = luaL_loadstring(L, script);
  if (rc == LUA_OK) {
    lua_pushinteger(L, rounds);
    rc = lua_pcall(L, 1, 0, 0);
  }
  if (rc != LUA_OK) {
    fprintf(stderr, "tsan_dtls: %s\n", lua_tostring(L, -1));
    lua_close(L);
    return 1;
  }
  lua_close(L);
  printf("tsan_dtls: %d rounds, %d worker threads\n", rounds, 4 * rounds);
  return 0;
}
