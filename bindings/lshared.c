/*
 * lshared.c: the Lua face of the shared dictionaries,
 * workerpool.shared(name [, opts]).
 *
 * A dictionary object is a full userdata that holds only the wp_shdict
 * pointer (dictionaries live until process exit, so the userdata owns
 * nothing and needs no __gc); its user value 1 keeps the name for
 * __tostring.  Every state (the host's and each worker's) opens the same
 * dictionary by name, which is how tasks share it: the userdata itself
 * never crosses states.
 *
 * Runtime failures return nil, message, NAME as every module function
 * does (wpl_pusherr): "not enough memory" (ENOMEM), "exists" (EEXISTS),
 * "not found" (ENOTFOUND), "not a number" (ENOTNUM); misuse (wrong
 * argument types, negative ttl) raises `bad argument` errors.
 *
 * Two rules shape this file.  First, the core never calls Lua and every core
 * call releases the dictionary lock before returning, so no lock is ever held
 * across a Lua API call.  Second, the core hands back malloc'd memory (a
 * string from get; the keys this file collects for keys()), and pushing it
 * into Lua can raise a memory error that would longjmp past free().  Such
 * memory is therefore pushed by a small C function run under lua_pcall; the
 * caller frees the memory whatever the outcome and then re-raises any error
 * with lua_error (the `pmain` pattern of lua.c).  A light C function and a
 * light userdata cost no allocation, so setting up the pcall cannot raise
 * itself.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lbind.h"

/* ------------------------------------------------------------------ */
/* Helpers                                                             */
/* ------------------------------------------------------------------ */

/* [-0, +0, v] The dictionary of self (argument 1). */
static wp_shdict *checkdict(lua_State *L) {
  return *(wp_shdict **)luaL_checkudata(L, 1, WPL_SHARED_MT);
}

/* [-0, +0, v] Reads argument idx as a storable value.  A string is borrowed
 * from the stack, so it lives as long as the argument does. */
static void checkvalue(lua_State *L, int idx, wp_shval *v) {
  switch (lua_type(L, idx)) {
  case LUA_TNONE:
  case LUA_TNIL:
    v->type = WP_TNIL;
    break;
  case LUA_TBOOLEAN:
    v->type = WP_TBOOLEAN;
    v->u.b = lua_toboolean(L, idx);
    break;
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx)) {
      v->type = WP_TINTEGER;
      v->u.i = (int64_t)lua_tointeger(L, idx);
    } else {
      v->type = WP_TNUMBER;
      v->u.n = (double)lua_tonumber(L, idx);
    }
    break;
  case LUA_TSTRING:
    v->type = WP_TSTRING;
    v->u.s.ptr = (char *)lua_tolstring(L, idx, &v->u.s.len);
    break;
  default:
    luaL_typeerror(L, idx, "nil, boolean, number or string");
  }
}

/* [-0, +0, v] Reads argument idx, which must be a number (strings are not
 * converted), keeping integers and floats apart. */
static void checknum(lua_State *L, int idx, wp_shval *v) {
  if (lua_type(L, idx) != LUA_TNUMBER) luaL_typeerror(L, idx, "number");
  checkvalue(L, idx, v);
}

/* [-0, +0, v] Optional ttl in seconds at idx: a number >= 0, 0 by default
 * (no expiry). */
static double optttl(lua_State *L, int idx) {
  lua_Number ttl = luaL_optnumber(L, idx, 0);
  luaL_argcheck(L, ttl >= 0, idx, "ttl must be a non-negative number");
  return (double)ttl;
}

/* [-0, +1, m] Under lua_pcall: pushes the string of the wp_shval at light
 * userdata 1. */
static int pushstring_p(lua_State *L) {
  const wp_shval *v = lua_touserdata(L, 1);
  lua_pushlstring(L, v->u.s.ptr, v->u.s.len);
  return 1;
}

/* [-0, +1, m] Pushes v and frees its string, even when pushing raises. */
static void pushvalue(lua_State *L, wp_shval *v) {
  int status;
  switch (v->type) {
  case WP_TBOOLEAN:
    lua_pushboolean(L, v->u.b);
    return;
  case WP_TINTEGER:
    lua_pushinteger(L, (lua_Integer)v->u.i);
    return;
  case WP_TNUMBER:
    lua_pushnumber(L, (lua_Number)v->u.n);
    return;
  case WP_TSTRING:
    break;
  default:
    lua_pushnil(L);
    return;
  }
  lua_pushcfunction(L, pushstring_p);
  lua_pushlightuserdata(L, v);
  status = lua_pcall(L, 1, 1, 0);
  wp_shval_free(v);
  if (status != LUA_OK) lua_error(L);
}

/* ------------------------------------------------------------------ */
/* Methods                                                             */
/* ------------------------------------------------------------------ */

/* d:get(k) -> value | nil   [-0, +1, e] */
static int shared_get(lua_State *L) {
  wp_shdict *d = checkdict(L);
  size_t klen;
  const char *k = luaL_checklstring(L, 2, &klen);
  wp_shval v;
  int rc = wp_shdict_get(d, k, klen, &v);
  if (rc < 0) return wpl_pusherr(L, rc);
  pushvalue(L, &v);
  return 1;
}

/* [-0, +1|3, e] d:set or d:add (store is wp_shdict_set or _add). */
static int shared_store(lua_State *L,
                        int (*store)(wp_shdict *, const char *, size_t,
                                     const wp_shval *, double)) {
  wp_shdict *d = checkdict(L);
  size_t klen;
  const char *k = luaL_checklstring(L, 2, &klen);
  wp_shval v;
  double ttl;
  int rc;
  checkvalue(L, 3, &v);
  ttl = optttl(L, 4);
  rc = store(d, k, klen, &v, ttl);
  if (rc < 0) return wpl_pusherr(L, rc);
  lua_pushboolean(L, 1);
  return 1;
}

/* d:set(k, v [, ttl]) -> true | nil, "not enough memory"   [-0, +1|3, e]
 * v nil deletes k. */
static int shared_set(lua_State *L) {
  return shared_store(L, wp_shdict_set);
}

/* d:add(k, v [, ttl]) -> true | nil, "exists" | nil, "not enough memory"
 * [-0, +1|3, e] */
static int shared_add(lua_State *L) {
  return shared_store(L, wp_shdict_add);
}

/* d:incr(k, step [, init [, ttl]]) -> number | nil, message   [-0, +1|3, e]
 * Messages: "not found" (absent, no init), "not a number", "not enough memory".
 * ttl applies only when init creates the key. */
static int shared_incr(lua_State *L) {
  wp_shdict *d = checkdict(L);
  size_t klen;
  const char *k = luaL_checklstring(L, 2, &klen);
  wp_shval step, init, out;
  int hasinit, rc;
  double ttl;
  checknum(L, 3, &step);
  hasinit = !lua_isnoneornil(L, 4);
  if (hasinit) checknum(L, 4, &init);
  ttl = optttl(L, 5);
  rc = wp_shdict_incr(d, k, klen, &step, hasinit ? &init : NULL, ttl, &out);
  if (rc < 0) return wpl_pusherr(L, rc);
  pushvalue(L, &out);
  return 1;
}

/* d:cas(k, old, new) -> true | false | nil, "not enough memory"   [-0, +1|3, e]
 * old nil means "k must be absent"; new nil deletes.  Integer 1 and float
 * 1.0 are different values here. */
static int shared_cas(lua_State *L) {
  wp_shdict *d = checkdict(L);
  size_t klen;
  const char *k = luaL_checklstring(L, 2, &klen);
  wp_shval old, nv;
  int rc;
  checkvalue(L, 3, &old);
  checkvalue(L, 4, &nv);
  rc = wp_shdict_cas(d, k, klen, &old, &nv);
  if (rc < 0) return wpl_pusherr(L, rc);
  lua_pushboolean(L, rc);
  return 1;
}

/* d:delete(k) -> true   [-0, +1, e] */
static int shared_delete(lua_State *L) {
  wp_shdict *d = checkdict(L);
  size_t klen;
  const char *k = luaL_checklstring(L, 2, &klen);
  int rc = wp_shdict_delete(d, k, klen);
  if (rc < 0) return wpl_pusherr(L, rc);
  lua_pushboolean(L, 1);
  return 1;
}

/* d:ttl(k) -> seconds (a float; 0 for no expiry) | nil, "not found"
 * [-0, +1|3, e] */
static int shared_ttl(lua_State *L) {
  wp_shdict *d = checkdict(L);
  size_t klen;
  const char *k = luaL_checklstring(L, 2, &klen);
  double ttl;
  int rc = wp_shdict_ttl(d, k, klen, &ttl);
  if (rc < 0) return wpl_pusherr(L, rc);
  lua_pushnumber(L, (lua_Number)ttl);
  return 1;
}

/* Keys copied out of the dictionary for keys(): one buffer of key bytes and
 * an array of their lengths, both malloc'd. */
typedef struct keylist {
  char *buf;    /* the keys, back to back */
  size_t used;  /* bytes of buf in use */
  size_t size;  /* bytes allocated for buf */
  size_t *lens; /* length of each key */
  size_t n;     /* keys stored */
  size_t nmax;  /* entries allocated for lens */
  int oom;      /* an allocation failed; the list is incomplete */
} keylist;

/* Grows *p (holding *cap elements of size sz) to hold need elements. */
static int grow(void **p, size_t *cap, size_t need, size_t sz) {
  size_t n = *cap ? *cap : 16;
  void *np;
  while (n < need) {
    if (n > SIZE_MAX / 2 / sz) return -1;
    n *= 2;
  }
  if (n == *cap) return 0;
  np = realloc(*p, n * sz);
  if (np == NULL) return -1;
  *p = np;
  *cap = n;
  return 0;
}

/* wp_shdict_key_fn: runs with the dictionary locked, so it only copies into
 * C memory and never touches Lua. */
static void collect_key(const char *k, size_t klen, void *ud) {
  keylist *kl = ud;
  if (kl->oom) return;
  if (klen > SIZE_MAX - kl->used ||
      grow((void **)&kl->buf, &kl->size, kl->used + klen, 1) != 0 ||
      grow((void **)&kl->lens, &kl->nmax, kl->n + 1, sizeof *kl->lens) != 0) {
    kl->oom = 1;
    return;
  }
  if (klen > 0) memcpy(kl->buf + kl->used, k, klen);
  kl->used += klen;
  kl->lens[kl->n++] = klen;
}

/* [-0, +1, m] Under lua_pcall: pushes the keylist at light userdata 1 as an
 * array. */
static int pushkeys_p(lua_State *L) {
  const keylist *kl = lua_touserdata(L, 1);
  const char *p = kl->buf;
  lua_createtable(L, (int)kl->n, 0);
  for (size_t i = 0; i < kl->n; i++) {
    lua_pushlstring(L, p, kl->lens[i]);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
    p += kl->lens[i];
  }
  return 1;
}

/* d:keys([max]) -> {k, ...} | nil, "not enough memory"   [-0, +1|3, e]
 * max 0 (the default) lists every live key. */
static int shared_keys(lua_State *L) {
  wp_shdict *d = checkdict(L);
  lua_Integer max = luaL_optinteger(L, 2, 0);
  keylist kl = {NULL, 0, 0, NULL, 0, 0, 0};
  int rc, status;

  luaL_argcheck(L, max >= 0, 2, "max must be non-negative");
  if ((lua_Unsigned)max > SIZE_MAX) max = 0;
  rc = wp_shdict_keys(d, (size_t)max, collect_key, &kl);
  if (rc >= 0 && kl.oom) rc = WP_ENOMEM;
  if (rc < 0) {
    free(kl.buf);
    free(kl.lens);
    return wpl_pusherr(L, rc);
  }
  lua_pushcfunction(L, pushkeys_p);
  lua_pushlightuserdata(L, &kl);
  status = lua_pcall(L, 1, 1, 0);
  free(kl.buf);
  free(kl.lens);
  if (status != LUA_OK) lua_error(L);
  return 1;
}

/* d:flush()   [-0, +0, v] Removes every key. */
static int shared_flush(lua_State *L) {
  wp_shdict_flush(checkdict(L));
  return 0;
}

/* d:usage() -> used_bytes, capacity_bytes   [-0, +2, v] */
static int shared_usage(lua_State *L) {
  size_t used, capacity;
  wp_shdict_usage(checkdict(L), &used, &capacity);
  lua_pushinteger(L, (lua_Integer)used);
  lua_pushinteger(L, (lua_Integer)capacity);
  return 2;
}

/* __tostring: "workerpool.shared: <name> (0x...)"   [-0, +1, m] */
static int shared_tostring(lua_State *L) {
  wp_shdict *d = checkdict(L);
  lua_getiuservalue(L, 1, 1);
  lua_pushfstring(L, "%s: %s (%p)", WPL_SHARED_MT, lua_tostring(L, -1),
                  (void *)d);
  return 1;
}

/* __eq: two objects of one dictionary are equal.   [-0, +1, -] */
static int shared_eq(lua_State *L) {
  wp_shdict **a = luaL_testudata(L, 1, WPL_SHARED_MT);
  wp_shdict **b = luaL_testudata(L, 2, WPL_SHARED_MT);
  lua_pushboolean(L, a != NULL && b != NULL && *a == *b);
  return 1;
}

static const luaL_Reg shared_methods[] = {
    {"get", shared_get},     {"set", shared_set},   {"add", shared_add},
    {"incr", shared_incr},   {"cas", shared_cas},   {"delete", shared_delete},
    {"ttl", shared_ttl},     {"keys", shared_keys}, {"flush", shared_flush},
    {"usage", shared_usage}, {NULL, NULL}};

static const luaL_Reg shared_meta[] = {
    {"__tostring", shared_tostring}, {"__eq", shared_eq}, {NULL, NULL}};

/* ------------------------------------------------------------------ */
/* Module entry points                                                 */
/* ------------------------------------------------------------------ */

/* [-0, +0, m] Creates the metatable WPL_SHARED_MT (luaL_newmetatable sets
 * its __name) with the methods as __index.  Calling it again is harmless. */
void wpl_shared_init(lua_State *L) {
  if (luaL_newmetatable(L, WPL_SHARED_MT)) {
    luaL_setfuncs(L, shared_meta, 0);
    luaL_newlib(L, shared_methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
}

/* workerpool.shared(name [, opts]) -> dict | nil, message, name
 * [-0, +1|3, e]
 * opts.capacity (positive integer, bytes) applies only when this call
 * creates the dictionary. */
int wpl_shared_open(lua_State *L) {
  size_t len;
  const char *name = luaL_checklstring(L, 1, &len);
  lua_Integer capacity = 0;
  wp_shdict *d, **ud;
  int rc;

  luaL_argcheck(L, len > 0 && strlen(name) == len, 1,
                "name must be a non-empty string without '\\0'");
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    if (lua_getfield(L, 2, "capacity") != LUA_TNIL) {
      int isint = 0;
      if (lua_type(L, -1) == LUA_TNUMBER)
        capacity = lua_tointegerx(L, -1, &isint);
      luaL_argcheck(L, isint && capacity > 0, 2,
                    "'capacity' must be a positive integer");
#if LUA_MAXINTEGER > SIZE_MAX
      luaL_argcheck(L, (lua_Unsigned)capacity <= SIZE_MAX, 2,
                    "'capacity' is too large");
#endif
    }
    lua_pop(L, 1);
  }

  rc = wp_shdict_open(name, (size_t)capacity, &d);
  if (rc < 0) return wpl_pusherr(L, rc);
  ud = lua_newuserdatauv(L, sizeof *ud, 1);
  *ud = d;
  luaL_setmetatable(L, WPL_SHARED_MT);
  lua_pushvalue(L, 1);
  lua_setiuservalue(L, -2, 1);
  return 1;
}
