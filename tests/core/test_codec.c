/*
 * test_codec.c: Criterion tests of the value codec (core/codec.c) through
 * its internal interface (wp_internal.h): values made in one Lua state are
 * encoded there with wp__encode, decoded with wp__decode in a second,
 * unrelated state, and checked by Lua code run in that second state.
 *
 * Also: refused values and their messages, the nesting limit, buffer
 * limits, the C-value helpers, the compiled-function cache, and malformed
 * input: every prefix of a valid message and a set of hand-made bad
 * messages must raise, never crash (each prefix is copied into a buffer of
 * exactly its size so that AddressSanitizer sees any read past its end).
 */
#include <criterion/criterion.h>

#include <limits.h>
#include <pthread.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "wp_internal.h"

static lua_State *A, *B;

static void teardown(void) {
  if (A) lua_close(A);
  if (B) lua_close(B);
  A = B = NULL;
}

/* Fresh states A and B for each test (closing any left by a test that
 * failed, when tests share a process). */
static void setup(void) {
  teardown();
  A = luaL_newstate();
  B = luaL_newstate();
  cr_assert_not_null(A);
  cr_assert_not_null(B);
  luaL_openlibs(A);
  luaL_openlibs(B);
}

TestSuite(codec, .fini = teardown, .timeout = 120);

#define STATES setup()

/* ------------------------------------------------------------------ */
/* Encoding in A                                                       */
/* ------------------------------------------------------------------ */

typedef struct encargs {
  wp__buf *b;
  const char *what;
  int argpos;
} encargs;

/* [-(n+1), +0, e] Encodes every argument after the first. */
static int enc_p(lua_State *L) {
  encargs *e = lua_touserdata(L, 1);
  wp__encode(L, e->b, 2, lua_gettop(L) - 1, e->what, e->argpos);
  return 0;
}

/* Runs chunk src in A and encodes what it returns into b.  Returns 0, or
 * the pcall status of encoding with its message copied to err. */
static int encode_src_ex(const char *src, wp__buf *b, int argpos, char *err,
                         size_t errlen) {
  encargs e = {b, "test", argpos};
  int st;
  lua_settop(A, 0);
  lua_pushcfunction(A, enc_p);
  lua_pushlightuserdata(A, &e);
  if (luaL_loadbuffer(A, src, strlen(src), "@codec_test.lua") ||
      lua_pcall(A, 0, LUA_MULTRET, 0))
    cr_assert_fail("chunk failed in A: %s", lua_tostring(A, -1));
  st = lua_pcall(A, lua_gettop(A) - 1, 0, 0);
  if (st != LUA_OK && errlen)
    snprintf(err, errlen, "%s",
             lua_tostring(A, -1) ? lua_tostring(A, -1) : "(no message)");
  lua_settop(A, 0);
  return st;
}

static void encode_src(const char *src, wp__buf *b) {
  char err[512];
  int st = encode_src_ex(src, b, 1, err, sizeof err);
  cr_assert_eq(st, LUA_OK, "encoding failed: %s", err);
}

/* Encoding must fail with a message containing want. */
static void encode_fails(const char *src, int argpos, const char *want) {
  wp__buf b = {0};
  char err[512];
  int st = encode_src_ex(src, &b, argpos, err, sizeof err);
  wp__buf_free(&b);
  cr_assert_neq(st, LUA_OK, "encoding of [%s] did not fail", src);
  cr_assert(strstr(err, want) != NULL, "[%s]: got '%s', want '%s'", src, err,
            want);
}

/* ------------------------------------------------------------------ */
/* Decoding in B                                                       */
/* ------------------------------------------------------------------ */

typedef struct decargs {
  const char *p;
  size_t len;
  int use_cache; /* the cache table is argument 2 */
  int check_end; /* raise on trailing bytes */
} decargs;

/* [-?, +n, e] Decodes a count and that many values. */
static int dec_p(lua_State *L) {
  decargs *d = lua_touserdata(L, 1);
  wp__reader r;
  uint64_t n;
  int base;
  if (!d->use_cache) lua_settop(L, 1);
  base = lua_gettop(L);
  r.p = d->p;
  r.end = d->p + d->len;
  if (wp__get_varint(&r, &n) || n > INT32_MAX)
    return luaL_error(L, "malformed count");
  wp__decode(L, &r, (int)n, d->use_cache ? 2 : 0);
  if (d->check_end && r.p != r.end)
    return luaL_error(L, "trailing bytes: %d", (int)(r.end - r.p));
  return lua_gettop(L) - base;
}

/* Decodes p[0..len) in B (with the table at stack index cache as the
 * function cache when cache != 0).  On success stores the values in the
 * global R (with R.n) and returns LUA_OK; else returns the status and
 * copies the message to err. */
static int decode_ex(const char *p, size_t len, int cache, char *err,
                     size_t errlen) {
  decargs d = {p, len, cache != 0, 1};
  int top = lua_gettop(B), st, n, i;
  lua_pushcfunction(B, dec_p);
  lua_pushlightuserdata(B, &d);
  if (cache) lua_pushvalue(B, cache);
  st = lua_pcall(B, cache ? 2 : 1, LUA_MULTRET, 0);
  if (st != LUA_OK) {
    if (errlen)
      snprintf(err, errlen, "%s",
               lua_tostring(B, -1) ? lua_tostring(B, -1) : "(no message)");
    lua_settop(B, top);
    return st;
  }
  n = lua_gettop(B) - top;
  luaL_checkstack(B, 3, NULL); /* pcall made room for the results only */
  lua_createtable(B, n, 1);
  for (i = 1; i <= n; i++) {
    lua_pushvalue(B, top + i);
    lua_rawseti(B, -2, i);
  }
  lua_pushinteger(B, n);
  lua_setfield(B, -2, "n");
  lua_setglobal(B, "R");
  lua_settop(B, top);
  return LUA_OK;
}

static void decode(const wp__buf *b) {
  char err[512];
  int st = decode_ex(b->data, b->len, 0, err, sizeof err);
  cr_assert_eq(st, LUA_OK, "decoding failed: %s", err);
}

/* Runs Lua code in B, which asserts on R. */
static void check(const char *code) {
  if (luaL_loadbuffer(B, code, strlen(code), "=check") ||
      lua_pcall(B, 0, 0, 0)) {
    const char *msg = lua_tostring(B, -1);
    cr_assert_fail("check failed: %s", msg ? msg : "?");
  }
}

/* Encodes what src returns in A, decodes it in B and runs check there. */
static void roundtrip(const char *src, const char *code) {
  wp__buf b = {0};
  char err[512];
  int st;
  encode_src(src, &b);
  st = decode_ex(b.data, b.len, 0, err, sizeof err);
  wp__buf_free(&b);
  cr_assert_eq(st, LUA_OK, "decoding failed: %s", err);
  check(code);
}

/* Decoding must fail (raise) with a message containing want. */
static void decode_fails(const char *p, size_t len, const char *want) {
  char err[512];
  char *copy = malloc(len ? len : 1); /* exact size, for ASan */
  int st;
  cr_assert_not_null(copy);
  memcpy(copy, p, len);
  st = decode_ex(copy, len, 0, err, sizeof err);
  free(copy);
  cr_assert_neq(st, LUA_OK, "decoding did not fail (want '%s')", want);
  cr_assert(strstr(err, want) != NULL, "got '%s', want '%s'", err, want);
}

/* ------------------------------------------------------------------ */
/* Scalars                                                             */
/* ------------------------------------------------------------------ */

Test(codec, scalars) {
  STATES;
  roundtrip("return nil, false, true, 0, -1, math.maxinteger, math.mininteger, "
            "1.0, -0.0, 1/0, -1/0, 0/0, 1e308, 5e-324, 2^63, '', 'a\\0b', nil",
            "assert(R.n == 18, R.n)\n"
            "assert(R[1] == nil and R[2] == false and R[3] == true)\n"
            "for i = 4, 7 do assert(math.type(R[i]) == 'integer', i) end\n"
            "assert(R[4] == 0 and R[5] == -1)\n"
            "assert(R[6] == math.maxinteger and R[7] == math.mininteger)\n"
            "for i = 8, 15 do assert(math.type(R[i]) == 'float', i) end\n"
            "assert(R[8] == 1.0 and tostring(R[8]) == '1.0')\n"
            "assert(R[9] == 0 and 1/R[9] == -1/0, 'negative zero')\n"
            "assert(R[10] == 1/0 and R[11] == -1/0)\n"
            "assert(R[12] ~= R[12], 'nan')\n"
            "assert(R[13] == 1e308 and R[14] == 5e-324 and R[15] == 2^63)\n"
            "assert(R[16] == '' and R[17] == 'a\\0b' and #R[17] == 3)\n"
            "assert(R[18] == nil)\n");
}

Test(codec, no_values) {
  STATES;
  roundtrip("return", "assert(R.n == 0)");
}

Test(codec, strings_every_byte_and_long) {
  STATES;
  roundtrip("local t = {} for i = 0, 255 do t[#t+1] = string.char(i) end\n"
            "local all = table.concat(t)\n"
            "return all, all:rep(4096), ('\\0'):rep(1000)",
            "assert(#R[1] == 256)\n"
            "for i = 0, 255 do assert(R[1]:byte(i + 1) == i, i) end\n"
            "assert(#R[2] == 1 << 20 and R[2] == R[1]:rep(4096))\n"
            "assert(R[3] == ('\\0'):rep(1000))\n");
}

/* ------------------------------------------------------------------ */
/* Tables                                                              */
/* ------------------------------------------------------------------ */

Test(codec, tables_nested_and_mixed) {
  STATES;
  roundtrip(
      "local t = { 1, 2.5, 'three', x = { y = { z = 'deep' } }, [true] = 1,\n"
      "  [-3] = 'neg', [0.5] = 'half', [1 << 40] = 'big' }\n"
      "local d = { n = 50 } for i = 49, 1, -1 do d = { n = i, c = d } end\n"
      "return t, d, {}",
      "local t = R[1]\n"
      "assert(t[1] == 1 and math.type(t[2]) == 'float' and t[3] == 'three')\n"
      "assert(t.x.y.z == 'deep' and t[true] == 1 and t[-3] == 'neg')\n"
      "assert(t[0.5] == 'half' and t[1 << 40] == 'big')\n"
      "local n, d = 0, R[2]\n"
      "while d do n = n + 1; assert(d.n == n); d = d.c end\n"
      "assert(n == 50)\n"
      "assert(type(R[3]) == 'table' and next(R[3]) == nil)\n");
}

Test(codec, cycles_and_shared_subtables) {
  STATES;
  roundtrip(
      "local t = { name = 't' } t.self = t\n"
      "local a = { 'a' }\n"
      "local s = { a, a, k = a }\n"
      "local x, y = {}, {} x.y = y y.x = x\n"
      "local key = { 'key' }\n"
      "return t, s, a, x, { [key] = key }",
      "assert(rawequal(R[1].self, R[1]) and R[1].name == 't')\n"
      "assert(rawequal(R[2][1], R[2][2]) and rawequal(R[2][1], R[2].k))\n"
      "assert(rawequal(R[2][1], R[3]), 'shared across values')\n"
      "assert(rawequal(R[4].y.x, R[4]))\n"
      "local k, v = next(R[5]) assert(rawequal(k, v) and k[1] == 'key')\n");
}

/* The first two numbered values sit in stack slots on both sides, the
 * rest in a table: references to each, across the switch. */
Test(codec, references_around_the_slots) {
  STATES;
  roundtrip("local a = {} return a, a",
            "assert(type(R[1]) == 'table' and rawequal(R[1], R[2]))\n");
  roundtrip("local a, b = {'a'}, {'b'} return a, b, b, a",
            "assert(rawequal(R[1], R[4]) and rawequal(R[2], R[3]))\n"
            "assert(R[1][1] == 'a' and R[2][1] == 'b')\n");
  roundtrip("local f = function() return 1 end\n"
            "local a, b, c = {}, {}, {} a.c = c c.a = a\n"
            "return f, a, b, c, { f, a, b, c }",
            "local l = R[5]\n"
            "for i = 1, 4 do assert(rawequal(l[i], R[i]), i) end\n"
            "assert(rawequal(R[2].c, R[4]) and rawequal(R[4].a, R[2]))\n"
            "assert(R[1]() == 1)\n");
}

/* Lengths that take one varint byte, and the first that takes two. */
Test(codec, string_lengths_around_one_length_byte) {
  STATES;
  roundtrip("return string.rep('x', 127), string.rep('y', 128), '', "
            "{ [string.rep('k', 127)] = string.rep('v', 128) }",
            "assert(R[1] == string.rep('x', 127))\n"
            "assert(R[2] == string.rep('y', 128) and R[3] == '')\n"
            "assert(R[4][string.rep('k', 127)] == string.rep('v', 128))\n");
}

Test(codec, metatables_do_not_travel) {
  STATES;
  roundtrip("return setmetatable({ 1 }, { __index = function() return 9 end })",
            "assert(getmetatable(R[1]) == nil and R[1][2] == nil)");
}

Test(codec, global_table_is_the_receivers) {
  STATES;
  lua_pushliteral(B, "in B");
  lua_setglobal(B, "WHERE");
  roundtrip("WHERE = 'in A' return _G, { g = _G }",
            "assert(rawequal(R[1], _G) and rawequal(R[2].g, _G))\n"
            "assert(WHERE == 'in B')\n");
}

Test(codec, modules_travel_by_name) {
  STATES;
  roundtrip("return string, math, { t = table }",
            "assert(rawequal(R[1], string) and rawequal(R[2], math))\n"
            "assert(rawequal(R[3].t, table))\n");
}

/* A module table takes an index in the encoder's table of seen values:
 * the decoder must number values the same way or later references go to
 * the wrong value. */
Test(codec, module_then_shared_table) {
  STATES;
  roundtrip("local t1, t2 = { 't1' }, { 't2' } return string, t1, t2, t1",
            "assert(R[2][1] == 't1' and R[3][1] == 't2')\n"
            "assert(rawequal(R[4], R[2]), 'R[4] is ' .. tostring(R[4][1]))\n");
}

Test(codec, module_twice) {
  STATES;
  roundtrip("return math, math", "assert(rawequal(R[1], math) and "
                                 "rawequal(R[2], math))");
}

/* ------------------------------------------------------------------ */
/* Functions                                                           */
/* ------------------------------------------------------------------ */

Test(codec, functions_with_upvalues) {
  STATES;
  roundtrip(
      "local n, cfg = 10, { k = 5 }\n"
      "local function add(x) return x + n + cfg.k end\n"
      "local function fact(i) if i <= 1 then return 1 end "
      "return i * fact(i - 1) end\n"
      "local floor, fmt = math.floor, string.format\n"
      "local function f(x) return floor(x), fmt('%03d', 7) end\n"
      "local function counter() local c = 0 return function() c = c + 1 "
      "return c end end\n"
      "return add, fact, f, counter(), { add = add }",
      "assert(R[1](1) == 16)\n"
      "assert(R[2](10) == 3628800)\n"
      "local a, b = R[3](2.7) assert(a == 2 and b == '007')\n"
      "assert(R[4]() == 1 and R[4]() == 2)\n"
      "assert(rawequal(R[5].add, R[1]), 'one function, one copy')\n"
      "local _, up = debug.getupvalue(R[3], 1)\n"
      "assert(rawequal(up, math.floor), 'C upvalue is B\\'s math.floor')\n"
      "local _, self = debug.getupvalue(R[2], 1)\n"
      "assert(rawequal(self, R[2]), 'recursive upvalue points to itself')\n");
}

Test(codec, functions_keep_debug_info_and_globals_are_receivers) {
  STATES;
  lua_pushliteral(B, "B");
  lua_setglobal(B, "X");
  roundtrip("X = 'A'\n"
            "return function() return X end, function() error('x') end",
            "assert(R[1]() == 'B')\n"
            "local info = debug.getinfo(R[1], 'S')\n"
            "assert(info.short_src == 'codec_test.lua', info.short_src)\n"
            "assert(info.linedefined == 2, info.linedefined)\n"
            "local ok, e = pcall(R[2])\n"
            "assert(not ok and e:find('codec_test.lua:2: x', 1, true), e)\n");
}

Test(codec, upvalues_are_copies) {
  STATES;
  wp__buf b = {0};
  encode_src("V = { 1 } local v = V return function() v[1] = v[1] + 1 "
             "return v[1] end",
             &b);
  /* Two decodings are independent copies. */
  decode(&b);
  check("F1 = R[1]");
  decode(&b);
  wp__buf_free(&b);
  check("assert(F1() == 2 and F1() == 3 and R[1]() == 2)");
  lua_getglobal(A, "V");
  lua_rawgeti(A, -1, 1);
  cr_assert_eq(lua_tointeger(A, -1), 1, "A's table untouched");
  lua_settop(A, 0);
}

Test(codec, function_cache) {
  STATES;
  wp__buf pure = {0}, f1 = {0}, f2 = {0};
  int cache;
  char err[256];
  encode_src("return function(x) return x * 2 end", &pure);
  encode_src("local function mk(k) return function(x) return x * 100 + k "
             "end end\n"
             "K1 = mk(1) K2 = mk(2) return K1",
             &f1);
  encode_src("local function mk(k) return function(x) return x * 100 + k "
             "end end\n"
             "K1 = mk(1) K2 = mk(2) return K2",
             &f2);
  lua_newtable(B);
  cache = lua_gettop(B);
  cr_assert_eq(decode_ex(pure.data, pure.len, cache, err, sizeof err), 0, "%s",
               err);
  check("P1 = R[1] assert(P1(21) == 42)");
  cr_assert_eq(decode_ex(pure.data, pure.len, cache, err, sizeof err), 0, "%s",
               err);
  check("assert(R[1](4) == 8)\n"
        "assert(rawequal(R[1], P1), 'a pure function is compiled once')");
  /* Same bytecode, different upvalues: never mixed up. */
  for (int i = 0; i < 10; i++) {
    cr_assert_eq(decode_ex(f1.data, f1.len, cache, err, sizeof err), 0);
    check("assert(R[1](5) == 501)");
    cr_assert_eq(decode_ex(f2.data, f2.len, cache, err, sizeof err), 0);
    check("assert(R[1](5) == 502)");
  }
  lua_settop(B, 0);
  wp__buf_free(&pure);
  wp__buf_free(&f1);
  wp__buf_free(&f2);
}

Test(codec, cfunction_names) {
  STATES;
  cr_assert_str_eq(
      wp__cfunction_name(lua_tocfunction((lua_getglobal(A, "print"), A), -1)),
      "print");
  lua_settop(A, 0);
  cr_assert_eq(
      luaL_dostring(A, "return math.floor, string.format, table.concat"), 0);
  cr_assert_str_eq(wp__cfunction_name(lua_tocfunction(A, 1)), "math.floor");
  cr_assert_str_eq(wp__cfunction_name(lua_tocfunction(A, 2)), "string.format");
  cr_assert_str_eq(wp__cfunction_name(lua_tocfunction(A, 3)), "table.concat");
  lua_settop(A, 0);
  cr_assert_null(wp__cfunction_name(enc_p));
  /* Registering makes a C function travel. */
  cr_assert_eq(wp_register_cfunction(NULL, enc_p), WP_EINVAL);
  cr_assert_eq(wp_register_cfunction("x.y", NULL), WP_EINVAL);
  cr_assert_eq(wp_register_cfunction("mylib.enc", enc_p), 0);
  cr_assert_eq(wp_register_cfunction("mylib.enc", enc_p), 0, "no-op");
  cr_assert_str_eq(wp__cfunction_name(enc_p), "mylib.enc");
  lua_pushcfunction(A, enc_p);
  lua_setglobal(A, "ENC");
  /* B knows mylib.enc. */
  cr_assert_eq(luaL_dostring(B, "package.loaded.mylib = {}"), 0);
  lua_getglobal(B, "package");
  lua_getfield(B, -1, "loaded");
  lua_getfield(B, -1, "mylib");
  lua_pushcfunction(B, enc_p);
  lua_setfield(B, -2, "enc");
  lua_settop(B, 0);
  roundtrip("return ENC", "assert(rawequal(R[1], package.loaded.mylib.enc))");
}

/* ------------------------------------------------------------------ */
/* Refused values                                                      */
/* ------------------------------------------------------------------ */

Test(codec, refused_types_name_the_argument) {
  STATES;
  encode_fails("return coroutine.create(print)", 1,
               "bad argument #1 to 'test' (cannot send a thread)");
  encode_fails("return 1, 2, coroutine.create(print)", 1,
               "bad argument #3 to 'test' (cannot send a thread)");
  encode_fails("return 1, 2, coroutine.create(print)", 2,
               "bad argument #4 to 'test' (cannot send a thread)");
  encode_fails("return io.stdout", 1,
               "bad argument #1 to 'test' (cannot send a userdata)");
  encode_fails("return 1, { { io.stdout } }", 1,
               "bad argument #2 to 'test' (cannot send a userdata inside a "
               "table or upvalue)");
  encode_fails("return { [coroutine.create(print)] = 1 }", 1,
               "cannot send a thread inside");
  encode_fails("local co = coroutine.create(print) "
               "return function() return co end",
               1, "bad argument #1 to 'test' (cannot send a thread inside");
  encode_fails("return getmetatable(io.stdout).__index.write", 1,
               "bad argument #1 to 'test' (cannot send a C function that is "
               "not part of a registered library)");
  encode_fails("return string.gmatch('a', 'a')", 1, "cannot send a C function");
  /* argpos 0: results of a task. */
  encode_fails("return 1, 2, coroutine.create(print)", 0,
               "task result #3 cannot be returned: cannot send a thread");
  encode_fails("return { io.stdout }", 0,
               "task result #1 cannot be returned: cannot send a userdata "
               "inside");
}

/* ------------------------------------------------------------------ */
/* Limits                                                              */
/* ------------------------------------------------------------------ */

static const char CHAIN[] =
    "local function chain(n) local t = {} for _ = 2, n do t = { t } end "
    "return t end\n";

Test(codec, depth_limit) {
  STATES;
  char src[512];
  snprintf(src, sizeof src, "%s return chain(%d)", CHAIN, WP_MAX_DEPTH);
  roundtrip(src, "local n, t = 0, R[1] while t do n = n + 1 t = t[1] end\n"
                 "assert(n == 100, n)");
  snprintf(src, sizeof src, "%s return chain(%d)", CHAIN, WP_MAX_DEPTH + 1);
  encode_fails(src, 1, "bad argument #1 to 'test' (tables nested too deeply");
  snprintf(src, sizeof src, "%s return 0, chain(1000000)", CHAIN);
  encode_fails(src, 1, "bad argument #2 to 'test' (tables nested too deeply");
  encode_fails("local f = function() return 0 end\n"
               "for _ = 1, 1000 do local g = f f = function() return g() end "
               "end return f",
               1, "functions nested too deeply");
  /* Cycles are not depth. */
  roundtrip("local t = {} for i = 1, 1000 do t[i] = t end "
            "local a = {} local c = a for i = 1, 99 do c.n = {} c = c.n end "
            "c.n = a return t, a",
            "assert(rawequal(R[1][1000], R[1]))\n"
            "local c, n = R[2], 0 repeat c = c.n n = n + 1 "
            "until rawequal(c, R[2]) assert(n == 100, n)");
}

Test(codec, buf_reserve_limits) {
  STATES;
  wp__buf b = {0};
  cr_assert_eq(wp__buf_reserve(&b, (size_t)WP_MAX_MSG + 1), WP_ETOOBIG);
  cr_assert_null(b.data, "nothing allocated");
  cr_assert_eq(wp__buf_reserve(&b, SIZE_MAX), WP_ETOOBIG);
  cr_assert_eq(wp__buf_reserve(&b, 0), 0);
  cr_assert_eq(wp__buf_reserve(&b, 100), 0);
  cr_assert_geq(b.cap, 100);
  b.len = 100;
  cr_assert_eq(wp__buf_reserve(&b, (size_t)WP_MAX_MSG - 99), WP_ETOOBIG,
               "WP_MAX_MSG counts bytes already used");
  cr_assert_eq(wp__buf_reserve(&b, SIZE_MAX - 50), WP_ETOOBIG,
               "no overflow in len + n");
  cr_assert_eq(wp__buf_reserve(&b, 4096), 0);
  cr_assert_geq(b.cap - b.len, 4096);
  cr_assert_eq(b.len, 100, "reserve does not use the room");
  wp__buf_free(&b);
  cr_assert_null(b.data);
  cr_assert_eq(b.len, 0);
  cr_assert_eq(b.cap, 0);
}

/* ------------------------------------------------------------------ */
/* C values                                                            */
/* ------------------------------------------------------------------ */

Test(codec, cvalues_round_trip) {
  STATES;
  wp__buf b = {0};
  wp_value in[7], out;
  wp__reader r;
  int i;
  static const char s[] = "x\0y";
  memset(in, 0, sizeof in);
  in[0].type = WP_TNIL;
  in[1].type = WP_TBOOLEAN;
  in[1].u.b = 1;
  in[2].type = WP_TBOOLEAN;
  in[2].u.b = 0;
  in[3].type = WP_TINTEGER;
  in[3].u.i = INT64_MIN;
  in[4].type = WP_TNUMBER;
  in[4].u.n = -0.0;
  in[5].type = WP_TSTRING;
  in[5].u.s.ptr = s;
  in[5].u.s.len = 3;
  in[6].type = WP_TSTRING; /* NULL, 0: empty */
  for (i = 0; i < 7; i++)
    cr_assert_eq(wp__put_cvalue(&b, &in[i]), 0);
  out.type = WP_TOTHER;
  cr_assert_eq(wp__put_cvalue(&b, &out), WP_EINVAL, "WP_TOTHER cannot be put");
  in[0].type = WP_TSTRING;
  in[0].u.s.ptr = NULL;
  in[0].u.s.len = 2;
  cr_assert_eq(wp__put_cvalue(&b, &in[0]), WP_EINVAL);
  r.p = b.data;
  r.end = b.data + b.len;
  cr_assert_eq(wp__get_cvalue(&r, &out), 0);
  cr_assert_eq(out.type, WP_TNIL);
  cr_assert_eq(wp__get_cvalue(&r, &out), 0);
  cr_assert(out.type == WP_TBOOLEAN && out.u.b == 1);
  cr_assert_eq(wp__get_cvalue(&r, &out), 0);
  cr_assert(out.type == WP_TBOOLEAN && out.u.b == 0);
  cr_assert_eq(wp__get_cvalue(&r, &out), 0);
  cr_assert(out.type == WP_TINTEGER && out.u.i == INT64_MIN);
  cr_assert_eq(wp__get_cvalue(&r, &out), 0);
  cr_assert(out.type == WP_TNUMBER && out.u.n == 0 && signbit(out.u.n));
  cr_assert_eq(wp__get_cvalue(&r, &out), 0);
  cr_assert(out.type == WP_TSTRING && out.u.s.len == 3 &&
            memcmp(out.u.s.ptr, s, 3) == 0);
  cr_assert_eq(wp__get_cvalue(&r, &out), 0);
  cr_assert(out.type == WP_TSTRING && out.u.s.len == 0);
  cr_assert_eq(r.p, r.end, "everything consumed");
  cr_assert_eq(wp__get_cvalue(&r, &out), WP_EINVAL, "nothing left");
  wp__buf_free(&b);
}

Test(codec, cvalues_skip_lua_values) {
  STATES;
  wp__buf b = {0};
  wp__reader r;
  wp_value v;
  uint64_t n;
  encode_src("local t = { 1, { 2 }, f = function() return 3 end } t.t = t "
             "return t, 'after', print, string, _G, 7",
             &b);
  r.p = b.data;
  r.end = b.data + b.len;
  cr_assert_eq(wp__get_varint(&r, &n), 0);
  cr_assert_eq(n, 6);
  cr_assert_eq(wp__get_cvalue(&r, &v), 0);
  cr_assert_eq(v.type, WP_TOTHER);
  cr_assert_eq(wp__get_cvalue(&r, &v), 0);
  cr_assert(v.type == WP_TSTRING && v.u.s.len == 5 &&
            memcmp(v.u.s.ptr, "after", 5) == 0);
  for (int i = 0; i < 3; i++) {
    cr_assert_eq(wp__get_cvalue(&r, &v), 0);
    cr_assert_eq(v.type, WP_TOTHER, "value %d", i + 3);
  }
  cr_assert_eq(wp__get_cvalue(&r, &v), 0);
  cr_assert(v.type == WP_TINTEGER && v.u.i == 7);
  cr_assert_eq(r.p, r.end);
  wp__buf_free(&b);
}

Test(codec, varints) {
  STATES;
  static const uint64_t vals[] = {
      0,         1, 127, 128, 300, 16383, 16384, UINT32_MAX, (uint64_t)1 << 63,
      UINT64_MAX};
  wp__buf b = {0};
  wp__reader r;
  uint64_t v;
  size_t i;
  for (i = 0; i < sizeof vals / sizeof *vals; i++)
    cr_assert_eq(wp__put_varint(&b, vals[i]), 0);
  r.p = b.data;
  r.end = b.data + b.len;
  for (i = 0; i < sizeof vals / sizeof *vals; i++) {
    cr_assert_eq(wp__get_varint(&r, &v), 0);
    cr_assert_eq(v, vals[i]);
  }
  cr_assert_eq(wp__get_varint(&r, &v), WP_EINVAL, "empty");
  wp__buf_free(&b);
  /* Truncated and endless varints. */
  static const char trunc[] = "\x80\x80";
  r.p = trunc;
  r.end = trunc + 2;
  cr_assert_eq(wp__get_varint(&r, &v), WP_EINVAL);
  static const char endless[12] =
      "\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff";
  r.p = endless;
  r.end = endless + 12;
  cr_assert_eq(wp__get_varint(&r, &v), WP_EINVAL, "more than 10 bytes");
}

/* The results future.c writes without allocating are what the encoder
 * writes. */
Test(codec, str_result_is_the_encoders) {
  WP__STR_RESULT(oom, "not enough memory");
  wp__buf b = {0};
  wp_value v;
  v.type = WP_TSTRING;
  v.u.s.ptr = "not enough memory";
  v.u.s.len = strlen(v.u.s.ptr);
  cr_assert_eq(wp__put_varint(&b, 1), 0);
  cr_assert_eq(wp__put_cvalue(&b, &v), 0);
  cr_assert_eq(b.len, sizeof oom);
  cr_assert(memcmp(b.data, &oom, sizeof oom) == 0);
  wp__buf_free(&b);
}

/* [-n, +0, m] Encodes the n values at the top with the fast path: 1, or 0
 * when it declined. */
static int fast_p(lua_State *L) {
  wp__buf *b = lua_touserdata(L, 1);
  lua_pushinteger(L, wp__encode_fast(L, b, 2, lua_gettop(L) - 1));
  return 1;
}

/* The fast path writes the bytes the full encoder writes, for scalars and
 * for a function sent before; it declines tables and a function never
 * sent. */
Test(codec, fast_path_writes_what_the_full_encoder_writes) {
  static const char VALUES[] =
      "F = F or function(x) return print(x) end\n"
      "return nil, true, false, 0, -7, 2.5, 0/0, '', ('x'):rep(300), F";
  wp__buf full = {0}, fast = {0}, b = {0};
  STATES;
  encode_src(VALUES, &full); /* sends F: now cached */
  full.len = 0;
  encode_src(VALUES, &full);
  lua_settop(A, 0);
  lua_pushcfunction(A, fast_p);
  lua_pushlightuserdata(A, &fast);
  cr_assert_eq(luaL_loadstring(A, VALUES), LUA_OK);
  lua_call(A, 0, LUA_MULTRET);
  lua_call(A, lua_gettop(A) - 1, 1);
  cr_assert_eq(lua_tointeger(A, -1), 1, "the fast path declined");
  cr_assert_eq(fast.len, full.len);
  cr_assert(memcmp(fast.data, full.data, full.len) == 0);
  /* Declined: a table, a function never sent. */
  lua_settop(A, 0);
  lua_pushcfunction(A, fast_p);
  lua_pushlightuserdata(A, &b);
  lua_newtable(A);
  lua_call(A, 2, 1);
  cr_assert_eq(lua_tointeger(A, -1), 0);
  lua_settop(A, 0);
  b.len = 0;
  lua_pushcfunction(A, fast_p);
  lua_pushlightuserdata(A, &b);
  cr_assert_eq(luaL_loadstring(A, "return function() return 1 end"), LUA_OK);
  lua_call(A, 0, 1);
  lua_call(A, 2, 1);
  cr_assert_eq(lua_tointeger(A, -1), 0);
  lua_settop(A, 0);
  wp__buf_free(&full);
  wp__buf_free(&fast);
  wp__buf_free(&b);
}

/* ------------------------------------------------------------------ */
/* Malformed messages                                                  */
/* ------------------------------------------------------------------ */

static const char RICH[] =
    "local t = { 1, 2.5, 'str\\0ing', true, false, x = { y = 'z' } }\n"
    "t.self = t\n"
    "local shared = { 'shared' }\n"
    "local up = { n = 1 }\n"
    "local floor = math.floor\n"
    "local function rec(n) if n <= 0 then return floor(0.5) end "
    "return rec(n - 1) + up.n end\n"
    "return t, shared, { shared, shared }, rec, print, _G, 12345678901234, "
    "('long'):rep(100), nil, -1.5e300";

/* Every strict prefix of the message in b fails to decode, with
 * "malformed", and never reads past its end (each is a copy of its own). */
static void every_prefix_is_malformed(const wp__buf *b) {
  for (size_t k = 0; k < b->len; k++) {
    char err[512];
    char *copy = malloc(k ? k : 1);
    int st;
    cr_assert_not_null(copy);
    memcpy(copy, b->data, k);
    st = decode_ex(copy, k, 0, err, sizeof err);
    free(copy);
    cr_assert_neq(st, LUA_OK, "prefix of %zu of %zu bytes decoded", k, b->len);
    cr_assert(strstr(err, "malformed") != NULL, "prefix %zu: '%s'", k, err);
  }
}

Test(codec, every_truncation_raises) {
  STATES;
  wp__buf b = {0};
  encode_src(RICH, &b);
  cr_assert_gt(b.len, 200);
  decode(&b);
  check("assert(R.n == 10 and rawequal(R[1].self, R[1]))\n"
        "assert(rawequal(R[3][1], R[2]) and R[4](3) == 3)\n"
        "assert(R[10] == -1.5e300)\n");
  every_prefix_is_malformed(&b);
  wp__buf_free(&b);
}

/* Leading scalars take the decoder's short path: the values after them
 * still decode, and every prefix still fails as malformed. */
Test(codec, leading_scalars_then_a_table) {
  STATES;
  wp__buf b = {0};
  encode_src("local t = {x = 1}; t.self = t\n"
             "return 1, 'two', 3.5, true, nil, t, t, ('s'):rep(300)",
             &b);
  decode(&b);
  check("assert(R.n == 8 and R[1] == 1 and math.type(R[1]) == 'integer')\n"
        "assert(R[2] == 'two' and R[3] == 3.5 and R[4] == true)\n"
        "assert(R[5] == nil and R[6].x == 1 and rawequal(R[6].self, R[6]))\n"
        "assert(rawequal(R[7], R[6]) and #R[8] == 300)\n");
  every_prefix_is_malformed(&b);
  wp__buf_free(&b);
}

/* wp__get_cvalue on every prefix: WP_EINVAL, never a read past the end. */
Test(codec, every_truncation_cvalues) {
  STATES;
  wp__buf b = {0};
  size_t k;
  encode_src(RICH, &b);
  for (k = 1; k < b.len; k++) {
    char *copy = malloc(k);
    wp__reader r;
    wp_value v;
    uint64_t n, i;
    int bad = 0;
    cr_assert_not_null(copy);
    memcpy(copy, b.data, k);
    r.p = copy;
    r.end = copy + k;
    cr_assert_eq(wp__get_varint(&r, &n), 0);
    for (i = 0; i < n && !bad; i++)
      bad = wp__get_cvalue(&r, &v) != 0;
    free(copy);
    cr_assert(bad, "prefix of %zu bytes read as complete", k);
  }
  wp__buf_free(&b);
}

#define MSG(s) s, sizeof(s) - 1
/* The size hints of a table, as zeros (they only size what is made). */
#define NOHINTS "\x00\x00\x00\x00\x00\x00\x00\x00"

Test(codec, handmade_malformed_messages) {
  STATES;
  /* Unknown tag. */
  decode_fails(MSG("\x01\xee"), "malformed");
  decode_fails(MSG("\x01\x7f"), "malformed");
  /* The count promises more values than there are. */
  decode_fails(MSG("\x03\x00\x01"), "malformed");
  /* A reference with nothing to refer to, or to a later index. */
  decode_fails(MSG("\x01\x08\x00"), "malformed");
  decode_fails(MSG("\x01\x06" NOHINTS "\x08\x05\x02\x07"), "malformed");
  /* A table with a nil key. */
  decode_fails(MSG("\x01\x06" NOHINTS "\x00\x02\x07"), "malformed");
  /* A table without its end. */
  decode_fails(MSG("\x01\x06" NOHINTS "\x00"), "malformed");
  decode_fails(MSG("\x01\x06" NOHINTS), "malformed");
  /* Size hints cut short, or promising more pairs than the bytes left can
   * hold, or more integer keys than pairs. */
  decode_fails(MSG("\x01\x06\x00\x00\x00"), "malformed");
  decode_fails(MSG("\x01\x06\xff\xff\xff\x7f\x00\x00\x00\x00\x07"),
               "malformed");
  decode_fails(MSG("\x01\x06\x02\x00\x00\x00\x00\x00\x00\x00"
                   "\x02\x02\x07"),
               "malformed");
  decode_fails(MSG("\x01\x06\x00\x00\x00\x00\x01\x00\x00\x00\x07"),
               "malformed");
  /* A string longer than the message. */
  decode_fails(MSG("\x01\x05\xff\xff\xff\xff\x0f"
                   "abc"),
               "malformed");
  decode_fails(MSG("\x01\x05\x04"
                   "abc"),
               "malformed");
  /* A varint that does not end. */
  decode_fails(MSG("\x01\x05\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"),
               "malformed");
  /* Integers and floats need 8 bytes. */
  decode_fails(MSG("\x01\x03\x01\x02\x03"), "malformed");
  decode_fails(MSG("\x01\x04\x01"), "malformed");
  /* A function whose bytecode length runs past the end. */
  decode_fails(MSG("\x01\x09\xff\x00\x00\x00"
                   "abc"),
               "malformed");
  /* Too many upvalues. */
  decode_fails(MSG("\x01\x09\x00\x00\x00\x00\xac\x02\x00"), "malformed");
  /* A C function or module name past the end. */
  decode_fails(MSG("\x01\x0a\x09"
                   "print"),
               "malformed");
  decode_fails(MSG("\x01\x0c\x09"
                   "math"),
               "malformed");
}

Test(codec, handmade_bad_names_and_chunks) {
  STATES;
  /* Names that do not resolve raise (not malformed, but never a crash). */
  decode_fails(MSG("\x01\x0a\x09"
                   "nosuch.fn"),
               "module 'nosuch' not found");
  decode_fails(MSG("\x01\x0a\x0c"
                   "string.nosuc"),
               "cannot resolve");
  decode_fails(MSG("\x01\x0a\x05"
                   "nosuc"),
               "cannot resolve");
  decode_fails(MSG("\x01\x0a\x0b"
                   "math.pi.foo"),
               "cannot resolve");
  decode_fails(MSG("\x01\x0c\x0e"
                   "no_such_module"),
               "no_such_module");
  /* Function bytes must be a binary chunk: source text is refused. */
  decode_fails(MSG("\x01\x09"
                   "12345678" /* the function's id */
                   "\x0e\x00\x00\x00"
                   "return os.exit"
                   "\x00\x00"),
               "text chunk");
  /* A binary chunk header with garbage after it. */
  decode_fails(MSG("\x01\x09"
                   "12345678"
                   "\x08\x00\x00\x00"
                   "\x1bLua\x54\x00\xff\xff"
                   "\x00\x00"),
               "");
}

/* A chunk whose header makes fewer upvalues than its prototype names
 * (found by tests/fuzz/fuzz_decode): lua_setupvalue would write past the
 * closure. */
Test(codec, chunk_with_forged_upvalue_count) {
  wp__buf b = {0};
  char *chunk;
  STATES;
  encode_src("local x, y, z = 1, 2, 3 return function() return x + y + z end",
             &b);
  chunk = memmem(b.data, b.len, "\x1bLua", 4);
  cr_assert_not_null(chunk);
  /* The header is 31 bytes; the closure's upvalue count follows. */
  cr_assert_eq(chunk[31], 3);
  chunk[31] = 1;
  decode_fails(b.data, b.len, "malformed");
  wp__buf_free(&b);
}

/* Error messages name exactly the name in the message, which is not
 * NUL-terminated: what follows it is other values' bytes. */
Test(codec, bad_names_are_quoted_exactly) {
  STATES;
  /* An absent library is required first: require's error says why. */
  decode_fails(MSG("\x01\x0a\x09"
                   "nosuch.fn"
                   "TRAILING"),
               "module 'nosuch' not found");
  decode_fails(MSG("\x01\x0a\x0c"
                   "string.nosuc"
                   "TRAILING"),
               "cannot resolve C function 'string.nosuc'");
}

Test(codec, nesting_limit_on_decode) {
  STATES;
  /* 100000 nested tables: refused by depth, not by a C stack overflow. */
  size_t n = 100000, i, len = 1 + n * 9 + 1;
  char *m = calloc(1, len); /* each table: its tag, then zero size hints */
  cr_assert_not_null(m);
  m[0] = 1;
  for (i = 0; i < n; i++)
    m[1 + i * 9] = (char)WP__T_TABLE;
  m[len - 1] = (char)WP__T_END;
  decode_fails(m, len, "malformed");
  free(m);
}

/* The decoder is given the count by its caller: a count that the message
 * cannot satisfy must raise rather than overflow B's stack. */
typedef struct countargs {
  const char *p;
  size_t len;
  int n;
} countargs;

static int dec_count_p(lua_State *L) {
  countargs *c = lua_touserdata(L, 1);
  wp__reader r = {c->p, c->p + c->len};
  wp__decode(L, &r, c->n, 0);
  return 0;
}

static void decode_count_fails(int n) {
  static char nils[4096];
  char *m = malloc(sizeof nils);
  countargs c = {m, sizeof nils, n};
  int st;
  cr_assert_not_null(m);
  memcpy(m, nils, sizeof nils); /* 4096 nil tags */
  lua_settop(B, 0);
  lua_pushcfunction(B, dec_count_p);
  lua_pushlightuserdata(B, &c);
  st = lua_pcall(B, 1, 0, 0);
  free(m);
  cr_assert_neq(st, LUA_OK, "a count of %d decoded", n);
  lua_settop(B, 0);
}

Test(codec, impossible_counts_raise) {
  STATES;
  decode_count_fails(5000);
  decode_count_fails(1000000);
  decode_count_fails(INT_MAX - 10);
}

Test(codec, impossible_count_int_max_raises) {
  STATES;
  decode_count_fails(INT_MAX);
}

static int cf1(lua_State *L) {
  return lua_gettop(L);
}
static int cf2(lua_State *L) {
  return lua_gettop(L) + 1;
}
static int cf3(lua_State *L) {
  return lua_gettop(L) + 2;
}

Test(codec, register_cfunction_rules) {
  char name[200];
  STATES;
  cr_assert_eq(wp_register_cfunction("first.name", cf1), 0);
  cr_assert_eq(wp_register_cfunction("second.name", cf1), 0,
               "registering again succeeds");
  cr_assert_str_eq(wp__cfunction_name(cf1), "first.name",
                   "and keeps the first name");
  memset(name, 'a', sizeof name);
  name[127] = '\0'; /* 127 bytes: the longest allowed */
  cr_assert_eq(wp_register_cfunction(name, cf2), 0);
  cr_assert_str_eq(wp__cfunction_name(cf2), name);
  name[127] = 'a';
  name[128] = '\0'; /* 128 bytes */
  cr_assert_eq(wp_register_cfunction(name, cf3), WP_EINVAL);
  cr_assert_null(wp__cfunction_name(cf3));
}

/* ------------------------------------------------------------------ */
/* wp_submit_lua and wp_future_push                                    */
/* ------------------------------------------------------------------ */

static wp_future *submitted;

/* submit_p(pool, task, ...) -> return code; raises what wp_submit_lua
 * raises.  Checks that the stack is left as it was. */
static int submit_p(lua_State *L) {
  wp_pool *p = lua_touserdata(L, 1);
  int top = lua_gettop(L), r;
  r = wp_submit_lua(p, L, 2, top - 2, "mysubmit", &submitted);
  if (lua_gettop(L) != top) return luaL_error(L, "stack changed");
  lua_pushinteger(L, r);
  return 1;
}

/* Runs chunk src in A, whose results are the task and its arguments, and
 * submits them; returns the pcall status (message in err). */
static int submit_src(wp_pool *p, const char *src, int *rc, char *err,
                      size_t errlen) {
  int st;
  lua_settop(A, 0);
  lua_pushcfunction(A, submit_p);
  lua_pushlightuserdata(A, p);
  if (luaL_loadbuffer(A, src, strlen(src), "@codec_test.lua") ||
      lua_pcall(A, 0, LUA_MULTRET, 0))
    cr_assert_fail("chunk failed in A: %s", lua_tostring(A, -1));
  submitted = NULL;
  st = lua_pcall(A, lua_gettop(A) - 1, 1, 0);
  if (st == LUA_OK)
    *rc = (int)lua_tointeger(A, -1);
  else
    snprintf(err, errlen, "%s", lua_tostring(A, -1));
  lua_settop(A, 0);
  return st;
}

static wp_pool *codec_pool(const char *name) {
  static const char init[] = "function h(...) return select('#', ...), ... end";
  wp_options o;
  wp_pool *p = NULL;
  char err[256];
  wp_options_init(&o);
  o.name = name;
  o.init = init;
  o.init_len = strlen(init);
  cr_assert_eq(wp_pool_new(&o, &p, err, sizeof err), 0, "%s", err);
  return p;
}

Test(codec, submit_lua_and_push) {
  wp_pool *p;
  char err[512];
  int rc = -99, n;
  STATES;
  p = codec_pool("codec-submit");
  cr_assert_eq(submit_src(p,
                          "local k = 10\n"
                          "return function(a, b) return a + b + k, "
                          "{ a, b, t = { 'x' } } end, 2, 3.5",
                          &rc, err, sizeof err),
               LUA_OK, "%s", err);
  cr_assert_eq(rc, 0);
  cr_assert_not_null(submitted);
  cr_assert_eq(wp_future_wait(submitted, 30), 0);
  cr_assert_eq(wp_future_status(submitted), WP_OK);
  lua_settop(A, 0);
  n = wp_future_push(submitted, A);
  cr_assert_eq(n, 2);
  cr_assert(lua_isnumber(A, 1) && !lua_isinteger(A, 1) &&
            lua_tonumber(A, 1) == 15.5);
  cr_assert(lua_istable(A, 2));
  lua_getfield(A, 2, "t");
  lua_rawgeti(A, -1, 1);
  cr_assert_str_eq(lua_tostring(A, -1), "x");
  lua_settop(A, 0);
  /* Results decode again on every push. */
  cr_assert_eq(wp_future_push(submitted, A), 2);
  lua_settop(A, 0);
  wp_future_release(submitted);

  /* A named handler; nils kept. */
  cr_assert_eq(
      submit_src(p, "return 'h', 1, nil, 'three', nil", &rc, err, sizeof err),
      LUA_OK, "%s", err);
  cr_assert_eq(wp_future_wait(submitted, 30), 0);
  cr_assert_eq(wp_future_push(submitted, A), 5);
  cr_assert_eq(lua_tointeger(A, 1), 4, "the handler saw 4 arguments");
  cr_assert(lua_isnil(A, 3) && lua_isnil(A, 5));
  cr_assert_str_eq(lua_tostring(A, 4), "three");
  lua_settop(A, 0);
  wp_future_release(submitted);
  wp_pool_release(p);
}

Test(codec, submit_lua_refusals) {
  wp_pool *p;
  char err[512];
  int rc = -99;
  STATES;
  p = codec_pool("codec-refuse");
  cr_assert_neq(submit_src(p,
                           "return function() end, 1, "
                           "coroutine.create(print)",
                           &rc, err, sizeof err),
                LUA_OK);
  cr_assert(strstr(err, "bad argument #3 to 'mysubmit' (cannot send a "
                        "thread)") != NULL,
            "%s", err);
  cr_assert_null(submitted, "no future");
  cr_assert_neq(
      submit_src(p, "return 'h', { io.stdout }", &rc, err, sizeof err), LUA_OK);
  cr_assert(strstr(err, "bad argument #2 to 'mysubmit' (cannot send a "
                        "userdata inside a table or upvalue)") != NULL,
            "%s", err);
  cr_assert_neq(submit_src(p, "return 42", &rc, err, sizeof err), LUA_OK);
  cr_assert(strstr(err, "bad argument #1 to 'mysubmit' (handler name or Lua "
                        "function expected, got number)") != NULL,
            "%s", err);
  cr_assert_neq(submit_src(p, "return print", &rc, err, sizeof err), LUA_OK);
  cr_assert(strstr(err, "handler name or Lua function expected") != NULL, "%s",
            err);
  wp_pool_counts c;
  wp_pool_get_counts(p, &c);
  cr_assert_eq(c.waiting + (size_t)c.running, 0, "nothing was queued");
  /* On a stopped pool: WP_ESTOPPED, checked before encoding. */
  cr_assert_eq(wp_pool_stop(p), 0);
  cr_assert_eq(submit_src(p, "return function() end, coroutine.create(print)",
                          &rc, err, sizeof err),
               LUA_OK, "%s", err);
  cr_assert_eq(rc, WP_ESTOPPED);
  cr_assert_null(submitted);
  wp_pool_release(p);
}

/* ------------------------------------------------------------------ */
/* States that are not workers                                         */
/* ------------------------------------------------------------------ */

Test(codec, plain_states_are_not_workers) {
  STATES;
  cr_assert_null(wp_state_pool(A));
  cr_assert_eq(wp_state_worker_id(A), 0);
  cr_assert_eq(lua_gettop(A), 0, "stack balanced");
}

/* ------------------------------------------------------------------ */
/* The function store (fnstore.c)                                      */
/* ------------------------------------------------------------------ */

/* wp__fn_record of the global function `name` in A, with the count 1 in
 * front: a message of that one value, in b. */
static void record_of(const char *name, wp__buf *b, int *ok) {
  char rec[256];
  size_t len = 0;
  int nenv = -1;
  lua_getglobal(A, name);
  *ok = wp__fn_record(A, -1, rec, sizeof rec, &len, &nenv);
  lua_pop(A, 1);
  b->len = 0;
  cr_assert_eq(wp__put_varint(b, 1), 0);
  cr_assert_eq(wp__buf_reserve(b, len), 0);
  memcpy(b->data + b->len, rec, len);
  b->len += len;
}

Test(codec, function_records_name_the_store) {
  STATES;
  wp__buf m1 = {0}, m2 = {0};
  int ok, cache;
  char err[256];
  cr_assert_eq(luaL_dostring(A, "F = function(x) return x * 3 end\n"
                                "G = function(x) return x .. '!' end"),
               LUA_OK);
  /* Sent once before, as the function cache of lsubmit.c does. */
  encode_src("return F, G", &m1);
  record_of("F", &m1, &ok);
  cr_assert_eq(ok, 1);
  cr_assert_eq((unsigned char)m1.data[1], WP__T_FUNCID);
  cr_assert_lt(m1.len, 16, "an index, not the bytecode: %zu bytes", m1.len);
  record_of("F", &m2, &ok);
  cr_assert(m1.len == m2.len && memcmp(m1.data, m2.data, m1.len) == 0,
            "the same function interns to the same index");
  decode(&m1);
  check("assert(R.n == 1 and R[1](5) == 15)");
  lua_newtable(B);
  cache = lua_gettop(B);
  for (int i = 0; i < 3; i++) {
    cr_assert_eq(decode_ex(m1.data, m1.len, cache, err, sizeof err), 0, "%s",
                 err);
    check(i == 0 ? "F1 = R[1] assert(F1(2) == 6)"
                 : "assert(rawequal(R[1], F1), 'compiled once')");
  }
  lua_settop(B, 0);
  record_of("G", &m2, &ok);
  cr_assert(ok && m1.len == m2.len && memcmp(m1.data, m2.data, m1.len) != 0,
            "another function, another index");
  decode(&m2);
  check("assert(R[1]('x') == 'x!')");
  /* Skipped as a C value, with what follows it still readable. */
  m2.data[0] = 2; /* the count */
  cr_assert_eq(wp__buf_reserve(&m2, 9), 0);
  m2.data[m2.len++] = (char)WP__T_INT;
  memcpy(m2.data + m2.len, &(int64_t){7}, 8);
  m2.len += 8;
  {
    wp__reader r = {m2.data, m2.data + m2.len};
    wp_value v;
    uint64_t n;
    cr_assert_eq(wp__get_varint(&r, &n), 0);
    cr_assert_eq(wp__get_cvalue(&r, &v), 0);
    cr_assert_eq(v.type, WP_TOTHER);
    cr_assert_eq(wp__get_cvalue(&r, &v), 0);
    cr_assert(v.type == WP_TINTEGER && v.u.i == 7);
    cr_assert_eq(r.p, r.end);
  }
  every_prefix_is_malformed(&m1);
  wp__buf_free(&m1);
  wp__buf_free(&m2);
}

Test(codec, function_store_indexes_are_checked) {
  STATES;
  /* An index past the store, one never given out, and one too large for
   * any store: malformed, never a read of something else. */
  static const char beyond[] = {1, WP__T_FUNCID, (char)0x80, 0x20, 0, 1};
  static const char unused[] = {1, WP__T_FUNCID, (char)0xff, 0x1f, 0, 1};
  static const char huge[] = {1,          WP__T_FUNCID, (char)0xff, (char)0xff,
                              (char)0xff, (char)0xff,   0x0f,       0,
                              1};
  decode_fails(beyond, sizeof beyond, "malformed");
  decode_fails(unused, sizeof unused, "malformed");
  decode_fails(huge, sizeof huge, "malformed");
}

Test(codec, full_store_sends_the_bytecode) {
  STATES;
  wp__buf m = {0};
  int ok;
  size_t old;
  cr_assert_eq(luaL_dostring(A, "H = function(x) return x - 1, 'full' end"),
               LUA_OK);
  encode_src("return H", &m);
  old = wp__fnstore_set_max_bytes(0);
  record_of("H", &m, &ok);
  wp__fnstore_set_max_bytes(old);
  cr_assert_eq(ok, 1);
  cr_assert_eq((unsigned char)m.data[1], WP__T_FUNC, "the bytecode itself");
  decode(&m);
  check("local a, b = R[1](10) assert(a == 9 and b == 'full')");
  wp__buf_free(&m);
}

/* Interns n distinct made-up records and reads each back. */
static void *intern_many(void *arg) {
  int base = *(int *)arg;
  for (int i = 0; i < 200; i++) {
    char rec[12 + 32];
    uint32_t index, blen = 32;
    uint64_t id = (uint64_t)(base * 1000 + i);
    size_t len;
    const char *got;
    memcpy(rec, &id, 8);
    memcpy(rec + 8, &blen, 4);
    memset(rec + 12, 'a' + base, 32);
    if (wp__fnstore_intern(rec, sizeof rec, &index) != 0) return "intern";
    got = wp__fnstore_get(index, &len);
    if (got == NULL || len != sizeof rec || memcmp(got, rec, len) != 0)
      return "read back";
  }
  return NULL;
}

Test(codec, function_store_from_several_threads) {
  pthread_t t[4];
  int base[4] = {1, 2, 3, 4};
  void *r;
  for (int i = 0; i < 4; i++)
    cr_assert_eq(pthread_create(&t[i], NULL, intern_many, &base[i]), 0);
  for (int i = 0; i < 4; i++) {
    cr_assert_eq(pthread_join(t[i], &r), 0);
    cr_assert_null(r, "thread %d: %s", i, (char *)r);
  }
  /* Not a record: refused. */
  cr_assert_eq(wp__fnstore_intern("short", 5, &(uint32_t){0}), WP_EINVAL);
}
