/*
 * fuzz_roundtrip.c: libFuzzer target for the encoder and decoder together
 * (core/codec.c).
 *
 * The input is a little program that builds Lua values in one state:
 * scalars of every kind (NaN, -0.0 and huge integers included), strings,
 * tables that share sub-tables and hold cycles, tables with hostile
 * metatables, Lua closures with upvalues, C functions and modules.  Those
 * values are encoded (wp__encode, and wp__encode_fast when it accepts
 * them), decoded in a second state, and compared deeply: same types, same
 * bits, same sharing.  Encoding may refuse a value with a clean error (too
 * deep); decoding what was encoded must never fail.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lualib.h>

#include "wp_internal.h"

#define MAX_STACK 64
#define MAX_VALUES 8

/* ---- building values from the input --------------------------------- */

typedef struct input {
  const uint8_t *p, *end;
} input;

static unsigned take(input *in) {
  return in->p < in->end ? *in->p++ : 0;
}

static void take_bytes(input *in, void *out, size_t n) {
  size_t have = (size_t)(in->end - in->p);
  memset(out, 0, n);
  memcpy(out, in->p, have < n ? have : n);
  in->p += have < n ? have : n;
}

/* A scalar fit to be a table key: not nil, not NaN. */
static int is_key(lua_State *L, int idx) {
  int t = lua_type(L, idx);
  if (t == LUA_TNUMBER && !lua_isinteger(L, idx)) {
    lua_Number n = lua_tonumber(L, idx);
    return n == n;
  }
  return t == LUA_TBOOLEAN || t == LUA_TNUMBER || t == LUA_TSTRING;
}

static const char *const closures[] = {
    "local u = ... return function() return u end",
    "local u, v = ... return function(x) v = x return u end",
    "return function(a, b) return a or b end",
    "return function(...) return select('#', ...), string.rep('x', 3) end",
};

/* [-2, +0, e] Runs the program of the input (light userdata argument 1)
 * and leaves the values it built in the state's registry list "values". */
static int build_pmain(lua_State *L) {
  input *in = lua_touserdata(L, 1);
  int base = lua_gettop(L), i, n;
  luaL_checkstack(L, MAX_STACK + 8, NULL);
  while (in->p < in->end) {
    int top = lua_gettop(L) - base, op = (int)(take(in) % 14);
    if (top >= MAX_STACK && op != 8 && op != 9) op = 12; /* full: pop */
    switch (op) {
    case 0:
      lua_pushnil(L);
      break;
    case 1:
      lua_pushboolean(L, take(in) & 1);
      break;
    case 2: {
      int64_t v;
      take_bytes(in, &v, 1 + take(in) % 8); /* small ones are common */
      lua_pushinteger(L, (lua_Integer)v);
      break;
    }
    case 3: {
      double v;
      take_bytes(in, &v, sizeof v);
      lua_pushnumber(L, v);
      break;
    }
    case 4: {
      char s[64];
      size_t len = take(in) % sizeof s;
      take_bytes(in, s, len);
      lua_pushlstring(L, s, len);
      break;
    }
    case 5:
      lua_createtable(L, (int)(take(in) % 4), (int)(take(in) % 4));
      break;
    case 6: /* dup an earlier slot: sharing, and cycles once stored */
      if (top == 0)
        lua_pushnil(L);
      else
        lua_pushvalue(L, base + 1 + (int)(take(in) % (unsigned)top));
      break;
    case 7: { /* a closure over the top values, or a pure function */
      const char *src = closures[take(in) % 4];
      int nargs = top < 2 ? top : 2;
      if (luaL_loadstring(L, src) != LUA_OK) lua_error(L);
      lua_insert(L, -1 - nargs);
      lua_call(L, nargs, 1);
      break;
    }
    case 8: /* t[k] = v, for t, k, v at the top */
      if (top >= 3 && lua_istable(L, -3) && is_key(L, -2))
        lua_rawset(L, -3);
      else if (top >= 1)
        lua_pop(L, 1);
      break;
    case 9: /* t[#t + 1] = v */
      if (top >= 2 && lua_istable(L, -2))
        lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
      break;
    case 10: /* a C function of a standard library, or a whole module */
      switch (take(in) % 3) {
      case 0:
        lua_getglobal(L, "string");
        lua_getfield(L, -1, "format");
        lua_remove(L, -2);
        break;
      case 1:
        lua_getglobal(L, "math");
        break;
      default:
        lua_getglobal(L, "print");
      }
      break;
    case 11: /* a metatable that raises on every access: encoding is raw */
      if (top >= 1 && lua_istable(L, -1)) {
        luaL_dostring(L, "local e = function() error('touched') end "
                         "return {__index = e, __newindex = e, __pairs = e, "
                         "__len = e, __gc = e}");
        lua_setmetatable(L, -2);
      }
      break;
    case 12:
      if (top >= 1) lua_pop(L, 1);
      break;
    default: /* the global table */
      lua_pushglobaltable(L);
    }
  }
  n = lua_gettop(L) - base;
  if (n > MAX_VALUES) {
    lua_rotate(L, base + 1, MAX_VALUES - n);
    lua_settop(L, base + MAX_VALUES);
    n = MAX_VALUES;
  }
  lua_createtable(L, n, 1);
  for (i = 1; i <= n; i++) {
    lua_pushvalue(L, base + i);
    lua_rawseti(L, -2, i);
  }
  lua_pushinteger(L, n);
  lua_setfield(L, -2, "n");
  lua_setfield(L, LUA_REGISTRYINDEX, "values");
  return 0;
}

/* [-0, +n, e] Pushes the n values of the registry list "values". */
static int push_values(lua_State *L) {
  int n, i;
  lua_getfield(L, LUA_REGISTRYINDEX, "values");
  lua_getfield(L, -1, "n");
  n = (int)lua_tointeger(L, -1);
  lua_pop(L, 1);
  luaL_checkstack(L, n, NULL);
  for (i = 1; i <= n; i++)
    lua_rawgeti(L, -i, i);
  lua_remove(L, -n - 1);
  return n;
}

/* ---- encoding and decoding ------------------------------------------ */

/* [-1, +0, e] Encodes the values in the registry list "values" into the
 * buffer (argument 1, light userdata) with wp__encode. */
static int encode_pmain(lua_State *L) {
  wp__buf *b = lua_touserdata(L, 1);
  int n = push_values(L);
  wp__encode(L, b, lua_gettop(L) - n + 1, n, "fuzz", 0);
  return 0;
}

/* [-2, +0, e] Decodes the reader (argument 1) into n (argument 2) values,
 * stored in the registry list "values". */
static int decode_pmain(lua_State *L) {
  wp__reader *r = lua_touserdata(L, 1);
  int n = (int)lua_tointeger(L, 2), i, first;
  lua_newtable(L); /* the compiled-function cache */
  wp__decode(L, r, n, 3);
  first = lua_gettop(L) - n + 1;
  lua_createtable(L, n, 1);
  for (i = 0; i < n; i++) {
    lua_pushvalue(L, first + i);
    lua_rawseti(L, -2, i + 1);
  }
  lua_pushinteger(L, n);
  lua_setfield(L, -2, "n");
  lua_setfield(L, LUA_REGISTRYINDEX, "values");
  return 0;
}

/* ---- comparing ------------------------------------------------------ */

typedef struct match {
  const void *a[4096], *b[4096];
  int n;
} match;

static void fail(const char *what) {
  fprintf(stderr, "round trip: %s\n", what);
  __builtin_trap();
}

/* 1 when the pair is new, 0 when seen together before; traps when a
 * shared object turned into two, or two into one. */
static int pair(match *m, const void *a, const void *b) {
  int i;
  for (i = 0; i < m->n; i++) {
    if (m->a[i] == a || m->b[i] == b) {
      if (m->a[i] != a || m->b[i] != b) fail("sharing differs");
      return 0;
    }
  }
  if (m->n == (int)(sizeof m->a / sizeof *m->a)) fail("too many objects");
  m->a[m->n] = a;
  m->b[m->n++] = b;
  return 1;
}

/* [-0, +1, -] Pushes onto B a copy of the scalar key at the top of A. */
static void push_key(lua_State *A, lua_State *B) {
  size_t len;
  const char *s;
  switch (lua_type(A, -1)) {
  case LUA_TBOOLEAN:
    lua_pushboolean(B, lua_toboolean(A, -1));
    break;
  case LUA_TNUMBER:
    if (lua_isinteger(A, -1))
      lua_pushinteger(B, lua_tointeger(A, -1));
    else
      lua_pushnumber(B, lua_tonumber(A, -1));
    break;
  case LUA_TSTRING:
    s = lua_tolstring(A, -1, &len);
    lua_pushlstring(B, s, len);
    break;
  default:
    fail("a key that is not a scalar");
  }
}

static void same(lua_State *A, int ia, lua_State *B, int ib, match *m,
                 int depth);

static void same_table(lua_State *A, int ia, lua_State *B, int ib, match *m,
                       int depth) {
  size_t na = 0, nb = 0;
  lua_pushnil(A);
  while (lua_next(A, ia)) {
    na++;
    lua_pushvalue(A, -2);
    push_key(A, B);
    lua_pop(A, 1);
    if (lua_rawget(B, ib) == LUA_TNIL) fail("a key is missing");
    same(A, lua_gettop(A), B, lua_gettop(B), m, depth + 1);
    lua_pop(A, 1);
    lua_pop(B, 1);
  }
  lua_pushnil(B);
  while (lua_next(B, ib)) {
    nb++;
    lua_pop(B, 1);
  }
  if (na != nb) fail("tables differ in size");
  if (lua_getmetatable(B, ib)) fail("a metatable travelled");
}

static void same_function(lua_State *A, int ia, lua_State *B, int ib, match *m,
                          int depth) {
  lua_Debug da, db;
  int i;
  if (lua_iscfunction(A, ia) != lua_iscfunction(B, ib)) fail("function kind");
  if (lua_iscfunction(A, ia)) {
    if (lua_tocfunction(A, ia) != lua_tocfunction(B, ib))
      fail("another C function");
    return;
  }
  lua_pushvalue(A, ia);
  lua_getinfo(A, ">u", &da);
  lua_pushvalue(B, ib);
  lua_getinfo(B, ">u", &db);
  if (da.nups != db.nups || da.nparams != db.nparams) fail("function shape");
  for (i = 1; i <= da.nups; i++) {
    lua_getupvalue(A, ia, i);
    lua_getupvalue(B, ib, i);
    same(A, lua_gettop(A), B, lua_gettop(B), m, depth + 1);
    lua_pop(A, 1);
    lua_pop(B, 1);
  }
}

/* [-0, +0, -] Whether the function at idx is a C function or a Lua one
 * whose upvalues are all the global table. */
static int is_pure(lua_State *L, int idx) {
  int i, pure = 1;
  const char *name;
  if (lua_iscfunction(L, idx)) return 1;
  for (i = 1; pure && (name = lua_getupvalue(L, idx, i)) != NULL; i++) {
    lua_pushglobaltable(L);
    pure = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
  }
  return pure;
}

/* Compares A's value at ia with B's at ib; traps on a difference. */
static void same(lua_State *A, int ia, lua_State *B, int ib, match *m,
                 int depth) {
  int t = lua_type(A, ia);
  size_t la, lb;
  const char *sa, *sb;
  if (depth > 4 * WP_MAX_DEPTH) fail("too deep");
  if (t != lua_type(B, ib)) fail("types differ");
  switch (t) {
  case LUA_TNIL:
    break;
  case LUA_TBOOLEAN:
    if (lua_toboolean(A, ia) != lua_toboolean(B, ib)) fail("booleans differ");
    break;
  case LUA_TNUMBER:
    if (lua_isinteger(A, ia) != lua_isinteger(B, ib)) fail("subtypes differ");
    if (lua_isinteger(A, ia)) {
      if (lua_tointeger(A, ia) != lua_tointeger(B, ib)) fail("ints differ");
    } else {
      lua_Number x = lua_tonumber(A, ia), y = lua_tonumber(B, ib);
      if (memcmp(&x, &y, sizeof x)) fail("floats differ");
    }
    break;
  case LUA_TSTRING:
    sa = lua_tolstring(A, ia, &la);
    sb = lua_tolstring(B, ib, &lb);
    if (la != lb || memcmp(sa, sb, la)) fail("strings differ");
    break;
  case LUA_TTABLE:
    if (pair(m, lua_topointer(A, ia), lua_topointer(B, ib)))
      same_table(A, ia, B, ib, m, depth);
    break;
  case LUA_TFUNCTION:
    /* Copies of one pure function may arrive as one object (the
     * receiver's compiled-function cache): they need not pair. */
    if (is_pure(A, ia) || pair(m, lua_topointer(A, ia), lua_topointer(B, ib)))
      same_function(A, ia, B, ib, m, depth);
    break;
  default:
    fail("a type that cannot travel");
  }
}

/* [-0, +0, -] Pairs the objects that travel by name, so that the
 * comparison expects A's globals and modules to be B's own. */
static void pair_named(lua_State *A, lua_State *B, match *m) {
  static const char *const names[] = {"_G", "string", "math", "table"};
  size_t i;
  lua_getfield(A, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_getfield(B, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  for (i = 0; i < sizeof names / sizeof *names; i++) {
    lua_getfield(A, -1, names[i]);
    lua_getfield(B, -1, names[i]);
    pair(m, lua_topointer(A, -1), lua_topointer(B, -1));
    lua_pop(A, 1);
    lua_pop(B, 1);
  }
  lua_pop(A, 1);
  lua_pop(B, 1);
}

/* Decodes the message in b into a new state and compares it with A's
 * values. */
static void check(lua_State *A, const wp__buf *b, int n) {
  static match m;
  lua_State *B = luaL_newstate();
  wp__reader r;
  uint64_t count;
  if (B == NULL) return;
  luaL_openlibs(B);
  r.p = b->data;
  r.end = b->data + b->len;
  if (wp__get_varint(&r, &count) || count != (uint64_t)n) fail("the count");
  lua_pushcfunction(B, decode_pmain);
  lua_pushlightuserdata(B, &r);
  lua_pushinteger(B, n);
  if (lua_pcall(B, 2, 0, 0) != LUA_OK) {
    fprintf(stderr, "decode: %s\n", lua_tostring(B, -1));
    fail("what was encoded does not decode");
  }
  if (r.p != r.end) fail("bytes left over");
  m.n = 0;
  pair_named(A, B, &m);
  lua_getfield(A, LUA_REGISTRYINDEX, "values");
  lua_getfield(B, LUA_REGISTRYINDEX, "values");
  same(A, lua_gettop(A), B, lua_gettop(B), &m, 0);
  lua_pop(A, 1);
  lua_close(B);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  input in = {data, data + size};
  char store[256], fast_store[256];
  wp__buf b = WP__BUF_ON(store), fast = WP__BUF_ON(fast_store);
  lua_State *A = luaL_newstate();
  int n;
  if (A == NULL) return 0;
  luaL_openlibs(A);
  lua_pushcfunction(A, build_pmain);
  lua_pushlightuserdata(A, &in);
  if (lua_pcall(A, 1, 0, 0) != LUA_OK) goto done;
  /* The fast path, when it takes the values, must agree. */
  n = push_values(A);
  if (wp__encode_fast(A, &fast, lua_gettop(A) - n + 1, n)) check(A, &fast, n);
  lua_settop(A, 0);
  wp__buf_free(&fast);
  /* The full encoder. */
  lua_pushcfunction(A, encode_pmain);
  lua_pushlightuserdata(A, &b);
  if (lua_pcall(A, 1, 0, 0) == LUA_OK)
    check(A, &b, n);
  else if (!lua_isstring(A, -1))
    fail("an encoding error that is not a message");
done:
  wp__buf_free(&b);
  lua_close(A);
  return 0;
}
