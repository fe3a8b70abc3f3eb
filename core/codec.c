/*
 * codec.c: copies Lua values from one state to another through a compact
 * byte string owned by C.
 *
 * The sender's thread encodes (wp__encode), the receiver's thread decodes
 * (wp__decode).  Tables keep their cycles and shared sub-tables: each table
 * and Lua function gets an index in encounter order and a second sighting
 * is written as a reference.  Lua functions travel as bytecode (with debug
 * information, so tracebacks name their source lines) followed by their
 * upvalues, copied by value; the sender's global table becomes the
 * receiver's.  C functions of registered libraries and whole modules from
 * package.loaded travel by name.  Metatables do not travel.  The format is
 * described in docs/values.md.
 *
 * Nothing here takes a lock except the C-function name table, and no
 * memory is held across a call that can raise: the buffer belongs to the
 * caller, who frees it whether or not encoding raised.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wp_internal.h"

/* ---- writing --------------------------------------------------------- */

int wp__put_varint(wp__buf *b, uint64_t v) {
  int r = wp__buf_reserve(b, WP__VARINT_MAX);
  if (r) return r;
  b->len = (size_t)(wp__varint_at(b->data + b->len, v) - b->data);
  return 0;
}

static int put_bytes(wp__buf *b, const void *p, size_t n) {
  int r = wp__buf_reserve(b, n);
  if (r) return r;
  memcpy(b->data + b->len, p, n);
  b->len += n;
  return 0;
}

static int put_tag(wp__buf *b, int tag) {
  unsigned char c = (unsigned char)tag;
  return put_bytes(b, &c, 1);
}

/* Strings and numbers reserve their room once: they are most of what a
 * message holds.  A short string (a table key, mostly) has a one-byte
 * length. */
static inline int put_lstring(wp__buf *b, int tag, const char *s, size_t len) {
  int r;
  char *p;
  if (len < 0x80 && len + 2 <= b->cap - b->len) {
    p = b->data + b->len;
    p[0] = (char)tag;
    p[1] = (char)len;
    memcpy(p + 2, s, len);
    b->len += len + 2;
    return 0;
  }
  r = len > WP_MAX_MSG ? WP_ETOOBIG
                       : wp__buf_reserve(b, 1 + WP__VARINT_MAX + len);
  if (r) return r;
  p = b->data + b->len;
  *p++ = (char)tag;
  p = wp__varint_at(p, len);
  memcpy(p, s, len);
  b->len = (size_t)(p - b->data) + len;
  return 0;
}

static inline int put_tagged8(wp__buf *b, int tag, const void *v) {
  int r = wp__buf_reserve(b, 9);
  if (r) return r;
  b->data[b->len] = (char)tag;
  memcpy(b->data + b->len + 1, v, 8);
  b->len += 9;
  return 0;
}

static inline int put_int(wp__buf *b, int64_t i) {
  return put_tagged8(b, WP__T_INT, &i);
}

static int put_flt(wp__buf *b, double n) {
  return put_tagged8(b, WP__T_FLT, &n);
}

/* [-0, +0, -] Appends the scalar at idx, of type t (nil, boolean, number
 * or string): the one writer of Lua scalars, for wp__encode and
 * wp__encode_fast.  0, WP_ENOMEM or WP_ETOOBIG.  Inlined: a table's loop
 * calls it twice a pair, and its type is known there. */
static inline __attribute__((always_inline)) int
put_scalar(wp__buf *b, lua_State *L, int idx, int t) {
  size_t len;
  const char *s;
  switch (t) {
  case LUA_TNIL:
    return put_tag(b, WP__T_NIL);
  case LUA_TBOOLEAN:
    return put_tag(b, lua_toboolean(L, idx) ? WP__T_TRUE : WP__T_FALSE);
  case LUA_TNUMBER:
    return lua_isinteger(L, idx) ? put_int(b, (int64_t)lua_tointeger(L, idx))
                                 : put_flt(b, (double)lua_tonumber(L, idx));
  default:
    assert(t == LUA_TSTRING);
    s = lua_tolstring(L, idx, &len);
    return put_lstring(b, WP__T_STR, s, len);
  }
}

#define IS_SCALAR(t)                                                           \
  ((t) == LUA_TNIL || (t) == LUA_TBOOLEAN || (t) == LUA_TNUMBER ||             \
   (t) == LUA_TSTRING)

/* Appends a Lua function up to its upvalues: the tag, its record rec
 * ("id .. bytecode", len bytes, from enc_bytecode), its number of
 * upvalues and whether they are all _ENV.  The upvalues follow. */
static int put_function(wp__buf *b, const char *rec, size_t len, int nups,
                        int pure) {
  uint32_t len32 = (uint32_t)(len - 8);
  char *p;
  int r = len > WP_MAX_MSG
              ? WP_ETOOBIG
              : wp__buf_reserve(b, 1 + 4 + len + WP__VARINT_MAX + 1);
  if (r) return r;
  p = b->data + b->len;
  *p++ = (char)WP__T_FUNC;
  memcpy(p, rec, 8); /* the id */
  memcpy(p + 8, &len32, 4);
  memcpy(p + 12, rec + 8, len - 8);
  p = wp__varint_at(p + 4 + len, (uint64_t)nups);
  *p++ = (char)pure;
  b->len = (size_t)(p - b->data);
  return 0;
}

int wp__put_cvalue(wp__buf *b, const wp_value *v) {
  switch (v->type) {
  case WP_TNIL:
    return put_tag(b, WP__T_NIL);
  case WP_TBOOLEAN:
    return put_tag(b, v->u.b ? WP__T_TRUE : WP__T_FALSE);
  case WP_TINTEGER:
    return put_int(b, v->u.i);
  case WP_TNUMBER:
    return put_flt(b, v->u.n);
  case WP_TSTRING:
    if (v->u.s.ptr == NULL && v->u.s.len) return WP_EINVAL;
    return put_lstring(b, WP__T_STR, v->u.s.ptr ? v->u.s.ptr : "", v->u.s.len);
  default:
    return WP_EINVAL;
  }
}

/* ---- encoding Lua values --------------------------------------------- */

/* Tables and Lua functions a message numbers (for references to them)
 * before encoder and decoder need a table to find them by: both keep the
 * first ones in stack slots. */
#define NUM_SLOTS 2

typedef struct enc {
  lua_State *L;
  wp__buf *b;
  int seen;   /* the first of NUM_SLOTS stack slots holding the tables and
                 functions numbered so far, in order, while there are at
                 most NUM_SLOTS; then it holds a table of value -> index */
  int loaded; /* stack slot: package.loaded, or nil until needed */
  int nextid; /* index of the next table or function */
  const char *what;
  int argpos; /* position of the first value in messages; 0: results */
  int cur;    /* which value is being encoded, from 0 */
} enc;

static _Noreturn void enc_error(enc *e, int depth, const char *msg) {
  const char *where = depth > 0 ? " inside a table or upvalue" : "";
  if (e->argpos > 0)
    luaL_error(e->L, "bad argument #%d to '%s' (%s%s)", e->argpos + e->cur,
               e->what, msg, where);
  luaL_error(e->L, "task result #%d cannot be returned: %s%s", e->cur + 1, msg,
             where);
  abort(); /* not reached: luaL_error does not return */
}

static void enc_check(enc *e, int r) {
  if (r == WP_ETOOBIG)
    luaL_error(e->L, "value too large to cross states (limit %d MiB)",
               (int)(WP_MAX_MSG >> 20));
  if (r) luaL_error(e->L, "not enough memory");
}

static void enc_value(enc *e, int idx, int depth);

/* The most stack slots one table or function pushes while it is encoded,
 * before the values inside it: enc_seen and enc_record (3), and
 * enc_bytecode (the cache, two copies of the function, the dump buffer and
 * its box, the id: 7).  Checked at each level, so nesting cannot outgrow
 * the stack. */
#define ENC_SLOTS 10

/* [-0, +0, m] Index of idx among the values numbered so far, or -1. */
static int enc_seen(enc *e, int idx) {
  lua_State *L = e->L;
  lua_Integer id = -1;
  int i;
  if (e->nextid <= NUM_SLOTS) {
    for (i = 0; i < e->nextid; i++)
      if (lua_rawequal(L, e->seen + i, idx)) return i;
    return -1;
  }
  lua_pushvalue(L, idx);
  if (lua_rawget(L, e->seen) == LUA_TNUMBER) id = lua_tointeger(L, -1);
  lua_pop(L, 1);
  return (int)id;
}

/* [-0, +0, m] Gives idx the next index, as the decoder will.  Most
 * messages number NUM_SLOTS tables and functions at most, and need no
 * table of them. */
static void enc_record(enc *e, int idx) {
  lua_State *L = e->L;
  int i;
  if (e->nextid < NUM_SLOTS) {
    lua_pushvalue(L, idx);
    lua_replace(L, e->seen + e->nextid++);
    return;
  }
  if (e->nextid == NUM_SLOTS) { /* one more: they all move into a table */
    lua_createtable(L, 0, 2 * NUM_SLOTS);
    for (i = 0; i < NUM_SLOTS; i++) {
      lua_pushvalue(L, e->seen + i);
      lua_pushinteger(L, i);
      lua_rawset(L, -3);
    }
    lua_replace(L, e->seen);
  }
  lua_pushvalue(L, idx);
  lua_pushinteger(L, e->nextid++);
  lua_rawset(L, e->seen);
}

/* [-0, +0, m] Name under which table idx sits in package.loaded, or NULL. */
static const char *enc_module(enc *e, int idx) {
  lua_State *L = e->L;
  if (lua_isnil(L, e->loaded)) {
    lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_replace(L, e->loaded);
  }
  if (!lua_istable(L, e->loaded)) return NULL;
  lua_pushnil(L);
  while (lua_next(L, e->loaded)) {
    if (lua_rawequal(L, -1, idx) && lua_type(L, -2) == LUA_TSTRING) {
      const char *name = lua_tostring(L, -2); /* anchored in loaded */
      lua_pop(L, 2);
      return name;
    }
    lua_pop(L, 1);
  }
  return NULL;
}

/* A table is its tag, two size hints (uint32_t: the number of pairs, and
 * of integer keys among them), the pairs, then WP__T_END.  The decoder
 * presizes the new table from the hints, so filling it never rehashes. */
static void enc_table(enc *e, int idx, int depth) {
  lua_State *L = e->L;
  const char *mod;
  int id, key;
  uint32_t hints[2] = {0, 0};
  size_t at;
  lua_pushglobaltable(L);
  if (lua_rawequal(L, -1, idx)) {
    lua_pop(L, 1);
    enc_check(e, put_tag(e->b, WP__T_ENV));
    return;
  }
  lua_pop(L, 1);
  if ((id = enc_seen(e, idx)) >= 0) {
    enc_check(e, put_tag(e->b, WP__T_REF));
    enc_check(e, wp__put_varint(e->b, (uint64_t)id));
    return;
  }
  if ((mod = enc_module(e, idx)) != NULL) {
    enc_check(e, put_lstring(e->b, WP__T_MODULE, mod, strlen(mod)));
    return;
  }
  if (depth >= WP_MAX_DEPTH) enc_error(e, depth, "tables nested too deeply");
  luaL_checkstack(L, ENC_SLOTS, "tables nested too deeply");
  enc_record(e, idx);
  enc_check(e, put_tag(e->b, WP__T_TABLE));
  /* Size hints, filled in once the pairs are counted. */
  enc_check(e, put_bytes(e->b, hints, sizeof hints));
  at = e->b->len - sizeof hints;
  lua_pushnil(L);
  key = lua_gettop(L);
  while (lua_next(L, idx)) {
    /* Scalars, most of what tables hold, are written here directly. */
    int kt = lua_type(L, key), vt = lua_type(L, key + 1);
    hints[0]++;
    if (kt == LUA_TNUMBER && lua_isinteger(L, key)) hints[1]++;
    if (IS_SCALAR(kt))
      enc_check(e, put_scalar(e->b, L, key, kt));
    else
      enc_value(e, key, depth + 1);
    if (IS_SCALAR(vt))
      enc_check(e, put_scalar(e->b, L, key + 1, vt));
    else
      enc_value(e, key + 1, depth + 1);
    lua_settop(L, key);
  }
  memcpy(e->b->data + at, hints, sizeof hints);
  enc_check(e, put_tag(e->b, WP__T_END));
}

/* Registry key of the sender's cache: a table with weak keys mapping each
 * Lua function sent from this state to its id (8 bytes) and bytecode. */
static const char dump_key = 'd';

/* lua_dump's writer, which starts the buffer on its first call (as
 * string.dump does) so that the buffer sits above the dumped function. */
typedef struct dump_state {
  luaL_Buffer b;
  int started;
} dump_state;

static int dump_writer(lua_State *L, const void *p, size_t n, void *ud) {
  dump_state *ds = ud;
  if (!ds->started) {
    ds->started = 1;
    luaL_buffinit(L, &ds->b);
    luaL_addlstring(&ds->b, "idid-idi", 8); /* room for the id */
  }
  luaL_addlstring(&ds->b, p, n);
  return 0;
}

/* [-0, +1, m] Pushes "id .. bytecode" of the Lua function at idx, dumping
 * it (with debug information) only the first time this state sends it. */
static const char *enc_bytecode(lua_State *L, int idx, size_t *len) {
  dump_state ds;
  uint64_t id;
  const char *bc;
  size_t n;
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &dump_key) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "k");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &dump_key);
  }
  lua_pushvalue(L, idx);
  if (lua_rawget(L, -2) == LUA_TSTRING) {
    lua_remove(L, -2);
    return lua_tolstring(L, -1, len);
  }
  lua_pop(L, 1);
  lua_pushvalue(L, idx); /* the key, later */
  lua_pushvalue(L, idx); /* lua_dump dumps the top */
  ds.started = 0;
  lua_dump(L, dump_writer, &ds, 0);
  if (!ds.started) luaL_error(L, "cannot dump function");
  luaL_pushresult(&ds.b);
  lua_remove(L, -2); /* the dumped copy */
  bc = lua_tolstring(L, -1, &n);
  id = wp__fnv1a(bc + 8, n - 8); /* a function's id: its bytecode's hash */
  lua_pushlstring(L, (const char *)&id, 8);
  lua_pushlstring(L, bc + 8, n - 8);
  lua_concat(L, 2);
  lua_remove(L, -2);    /* the first copy */
  lua_pushvalue(L, -2); /* the function */
  lua_pushvalue(L, -2); /* its record */
  lua_rawset(L, -5);
  lua_remove(L, -2); /* the function */
  lua_remove(L, -2); /* the cache */
  return lua_tolstring(L, -1, len);
}

/* [-0, +0, -] 1 when every upvalue of the function at idx is the global
 * table, so one compiled copy can serve every call.  Needs 2 free slots. */
static int enc_pure(lua_State *L, int idx) {
  int i, pure = 1;
  lua_pushglobaltable(L);
  for (i = 1; pure && lua_getupvalue(L, idx, i) != NULL; i++) {
    pure = lua_rawequal(L, -1, -2);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return pure;
}

/* [-0, +0, -] The number of upvalues of the function at idx.  Needs 1
 * free slot. */
static int count_upvalues(lua_State *L, int idx) {
  int n = 0;
  while (lua_getupvalue(L, idx, n + 1) != NULL) {
    lua_pop(L, 1);
    n++;
  }
  return n;
}

/* [-0, +0, -] The fast path's function: a Lua function whose upvalues are
 * all _ENV, which this state has sent before (its record is cached).  1
 * when written, 0 when it needs the full encoder, or an error. */
static int fast_function(lua_State *L, wp__buf *b, int idx) {
  const char *rec;
  size_t len;
  int nups, j, r;
  if (lua_iscfunction(L, idx) || !lua_checkstack(L, 4)) return 0;
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &dump_key) != LUA_TTABLE) {
    lua_pop(L, 1);
    return 0;
  }
  lua_pushvalue(L, idx);
  if (lua_rawget(L, -2) != LUA_TSTRING || !enc_pure(L, idx)) {
    lua_pop(L, 2);
    return 0;
  }
  rec = lua_tolstring(L, -1, &len); /* anchored in the cache */
  nups = count_upvalues(L, idx);
  r = put_function(b, rec, len, nups, 1);
  lua_pop(L, 2);
  for (j = 0; !r && j < nups; j++)
    r = put_tag(b, WP__T_ENV);
  return r ? r : 1;
}

int wp__encode_fast(lua_State *L, wp__buf *b, int first, int n) {
  return wp__put_varint(b, (uint64_t)n) == 0 &&
         wp__encode_fast_values(L, b, first, n);
}

int wp__encode_fast_values(lua_State *L, wp__buf *b, int first, int n) {
  int i, t, r;
  first = lua_absindex(L, first);
  for (i = 0; i < n; i++) {
    int idx = first + i;
    t = lua_type(L, idx);
    if (IS_SCALAR(t))
      r = put_scalar(b, L, idx, t);
    else if (t == LUA_TFUNCTION)
      r = fast_function(L, b, idx) == 1 ? 0 : -1;
    else
      return 0; /* tables and the rest: the full encoder */
    if (r) return 0;
  }
  return 1;
}

static void enc_function(enc *e, int idx, int depth) {
  lua_State *L = e->L;
  wp__buf *b = e->b;
  const char *bc;
  size_t len;
  int id, i, nups;
  if (lua_iscfunction(L, idx)) {
    const char *name = wp__cfunction_name(lua_tocfunction(L, idx));
    if (name == NULL)
      enc_error(e, depth,
                "cannot send a C function that is not part of "
                "a registered library");
    enc_check(e, put_lstring(b, WP__T_CFUNC, name, strlen(name)));
    return;
  }
  if ((id = enc_seen(e, idx)) >= 0) {
    enc_check(e, put_tag(b, WP__T_REF));
    enc_check(e, wp__put_varint(b, (uint64_t)id));
    return;
  }
  if (depth >= WP_MAX_DEPTH) enc_error(e, depth, "functions nested too deeply");
  luaL_checkstack(L, ENC_SLOTS, "functions nested too deeply");
  enc_record(e, idx);
  bc = enc_bytecode(L, idx, &len);
  nups = count_upvalues(L, idx);
  enc_check(e, put_function(b, bc, len, nups, enc_pure(L, idx)));
  lua_pop(L, 1);
  for (i = 1; i <= nups; i++) {
    lua_getupvalue(L, idx, i);
    enc_value(e, lua_gettop(L), depth + 1);
    lua_pop(L, 1);
  }
}

static void enc_value(enc *e, int idx, int depth) {
  lua_State *L = e->L;
  int t = lua_type(L, idx);
  switch (t) {
  case LUA_TNIL:
  case LUA_TBOOLEAN:
  case LUA_TNUMBER:
  case LUA_TSTRING:
    enc_check(e, put_scalar(e->b, L, idx, t));
    break;
  case LUA_TTABLE:
    enc_table(e, idx, depth);
    break;
  case LUA_TFUNCTION:
    enc_function(e, idx, depth);
    break;
  default: {
    char msg[64];
    snprintf(msg, sizeof msg, "cannot send a %s", lua_typename(L, t));
    enc_error(e, depth, msg);
  }
  }
}

/* wp__encode and wp__encode_after: fn, when not 0, is the stack index of
 * the value numbered 0 already. */
static void encode(lua_State *L, wp__buf *b, int fn, int first, int n,
                   const char *what, int argpos) {
  enc e;
  int i;
  first = lua_absindex(L, first);
  if (fn) fn = lua_absindex(L, fn);
  luaL_checkstack(L, NUM_SLOTS + 3, NULL);
  e.L = L;
  e.b = b;
  e.seen = lua_gettop(L) + 1;
  for (i = 0; i <= NUM_SLOTS; i++) /* the slots, then package.loaded */
    lua_pushnil(L);
  e.loaded = lua_gettop(L);
  e.nextid = 0;
  e.what = what;
  e.argpos = argpos;
  if (fn)
    enc_record(&e, fn);
  else
    enc_check(&e, wp__put_varint(b, (uint64_t)n));
  for (i = 0; i < n; i++) {
    e.cur = i;
    enc_value(&e, first + i, 0);
  }
  lua_pop(L, NUM_SLOTS + 1);
}

void wp__encode(lua_State *L, wp__buf *b, int first, int n, const char *what,
                int argpos) {
  encode(L, b, 0, first, n, what, argpos);
}

void wp__encode_after(lua_State *L, wp__buf *b, int fn, int first, int n,
                      const char *what, int argpos) {
  encode(L, b, fn, first, n, what, argpos);
}

/* ---- reading --------------------------------------------------------- */

int wp__get_varint(wp__reader *r, uint64_t *v) {
  uint64_t x = 0;
  int shift = 0;
  while (r->p < r->end && shift < 64) {
    unsigned char c = (unsigned char)*r->p++;
    x |= (uint64_t)(c & 0x7f) << shift;
    if (!(c & 0x80)) {
      *v = x;
      return 0;
    }
    shift += 7;
  }
  return WP_EINVAL;
}

static int get_bytes(wp__reader *r, void *out, size_t n) {
  if ((size_t)(r->end - r->p) < n) return WP_EINVAL;
  memcpy(out, r->p, n);
  r->p += n;
  return 0;
}

/* Reads a varint length and returns a pointer to that many bytes. */
static int get_lstring(wp__reader *r, const char **s, size_t *len) {
  uint64_t n;
  if (wp__get_varint(r, &n) || n > (uint64_t)(r->end - r->p)) return WP_EINVAL;
  *s = r->p;
  *len = (size_t)n;
  r->p += n;
  return 0;
}

static int skip_value(wp__reader *r, int depth);

/* Skips a function whose header (id, length, bytecode; or the store
 * index) was read. */
static int skip_function(wp__reader *r, int depth) {
  uint64_t nups, i;
  char pure;
  if (wp__get_varint(r, &nups) || get_bytes(r, &pure, 1)) return WP_EINVAL;
  for (i = 0; i < nups; i++)
    if (skip_value(r, depth + 1)) return WP_EINVAL;
  return 0;
}

static int skip_value(wp__reader *r, int depth) {
  unsigned char tag;
  const char *s;
  size_t len;
  uint64_t id;
  if (depth > WP_MAX_DEPTH + 1 || get_bytes(r, &tag, 1)) return WP_EINVAL;
  switch (tag) {
  case WP__T_NIL:
  case WP__T_FALSE:
  case WP__T_TRUE:
  case WP__T_ENV:
    return 0;
  case WP__T_INT:
  case WP__T_FLT:
    if (r->end - r->p < 8) return WP_EINVAL;
    r->p += 8;
    return 0;
  case WP__T_STR:
  case WP__T_CFUNC:
  case WP__T_MODULE:
    return get_lstring(r, &s, &len);
  case WP__T_REF:
    return wp__get_varint(r, &id);
  case WP__T_FUNC: {
    uint32_t blen; /* the id, the bytecode's length, the bytecode */
    if (r->end - r->p < 12) return WP_EINVAL;
    memcpy(&blen, r->p + 8, 4);
    if (blen > (size_t)(r->end - r->p) - 12) return WP_EINVAL;
    r->p += 12 + (size_t)blen;
    return skip_function(r, depth);
  }
  case WP__T_FUNCID:
    if (wp__get_varint(r, &id)) return WP_EINVAL;
    return skip_function(r, depth);
  case WP__T_TABLE:
    if ((size_t)(r->end - r->p) < 2 * sizeof(uint32_t)) return WP_EINVAL;
    r->p += 2 * sizeof(uint32_t); /* size hints */
    for (;;) {
      if (r->p >= r->end) return WP_EINVAL;
      if ((unsigned char)*r->p == WP__T_END) {
        r->p++;
        return 0;
      }
      if (skip_value(r, depth + 1) || skip_value(r, depth + 1))
        return WP_EINVAL;
    }
  default:
    return WP_EINVAL;
  }
}

int wp__get_cvalue(wp__reader *r, wp_value *out) {
  unsigned char tag;
  if (r->p >= r->end) return WP_EINVAL;
  tag = (unsigned char)*r->p;
  switch (tag) {
  case WP__T_NIL:
  case WP__T_FALSE:
  case WP__T_TRUE:
    r->p++;
    out->type = tag == WP__T_NIL ? WP_TNIL : WP_TBOOLEAN;
    out->u.b = tag == WP__T_TRUE;
    return 0;
  case WP__T_INT:
    r->p++;
    out->type = WP_TINTEGER;
    return get_bytes(r, &out->u.i, 8);
  case WP__T_FLT:
    r->p++;
    out->type = WP_TNUMBER;
    return get_bytes(r, &out->u.n, 8);
  case WP__T_STR:
    r->p++;
    out->type = WP_TSTRING;
    return get_lstring(r, &out->u.s.ptr, &out->u.s.len);
  default:
    out->type = WP_TOTHER;
    return skip_value(r, 0);
  }
}

/* ---- decoding into a state ------------------------------------------- */

/* The table keys a state decoded last, by their place in their table:
 * records built alike list their keys alike, so the key at place i is
 * most often the one the previous record had there, and is pushed without
 * hashing and interning it again.  One per state, in its registry, made
 * when it first decodes a table; the strings are its user values.  Keys
 * that do not repeat (a dictionary's) would make every lookup a miss that
 * costs more than it saves: when fewer than half of a window of lookups
 * hit, the next KEYS_PAUSE keys are decoded without the cache. */
#define KEYS_N 128
#define KEYS_MAXLEN 40 /* longer keys are not kept */
#define KEYS_WINDOW 64
#define KEYS_PAUSE 4096

typedef struct keycache {
  struct keycache *self;     /* marks it as ours (dec_keys) */
  const char *s[KEYS_N];     /* the bytes of user value i + 1, or NULL */
  unsigned char len[KEYS_N]; /* its length */
  unsigned tries, hits;      /* in the current window */
  unsigned pause;            /* keys still to decode without the cache */
} keycache;

static const char keys_key = 'k';

typedef struct dec {
  lua_State *L;
  wp__reader *r;
  int refs; /* the first of NUM_SLOTS stack slots: the tables and
               functions numbered so far while there are at most
               NUM_SLOTS (number n in slot refs + n), then a table of
               them all (number n at index n + 1); the key cache's slot
               follows them */
  int nextid;
  int cache;    /* stack index of the compiled-function cache, or 0 */
  keycache *kc; /* in slot refs + NUM_SLOTS once a table is decoded */
} dec;

static _Noreturn void dec_bad(dec *d) {
  luaL_error(d->L, "malformed value message");
  abort(); /* not reached */
}

/* [-1, +1, m] Records the value at the top under the next index.  Most
 * messages number NUM_SLOTS tables and functions at most, and need no
 * table of them. */
static void dec_register(dec *d) {
  lua_State *L = d->L;
  int i;
  if (d->nextid < NUM_SLOTS) {
    lua_pushvalue(L, -1);
    lua_replace(L, d->refs + d->nextid);
  } else {
    if (d->nextid == NUM_SLOTS) { /* one more: they all move into a table */
      lua_createtable(L, 2 * NUM_SLOTS, 0);
      for (i = 0; i < NUM_SLOTS; i++) {
        lua_pushvalue(L, d->refs + i);
        lua_rawseti(L, -2, i + 1);
      }
      lua_replace(L, d->refs);
    }
    lua_pushvalue(L, -1);
    lua_rawseti(L, d->refs, d->nextid + 1);
  }
  d->nextid++;
}

static void dec_value(dec *d, int depth);

/* Entries kept in a worker's compiled-function cache before it starts
 * over, so generated code cannot grow it without bound. */
#define CACHE_MAX 512

/* [-0, +0, m] Stores the function at the top under its id.  The cache's
 * "n" field counts entries. */
static void cache_store(dec *d, uint64_t id) {
  lua_State *L = d->L;
  lua_Integer n;
  lua_getfield(L, d->cache, "n");
  n = lua_tointeger(L, -1);
  lua_pop(L, 1);
  if (n >= CACHE_MAX) { /* start over: clear every entry */
    lua_pushnil(L);
    while (lua_next(L, d->cache)) {
      lua_pop(L, 1);
      lua_pushvalue(L, -1);
      lua_pushnil(L);
      lua_rawset(L, d->cache);
    }
    n = 0;
  }
  lua_pushinteger(L, n + 1);
  lua_setfield(L, d->cache, "n");
  lua_pushvalue(L, -1);
  lua_rawseti(L, d->cache, (lua_Integer)id);
}

/* [-0, +1, e] Pushes a function: its id, length and bytecode read from
 * hdr (the message itself, or a record of the function store), the rest
 * from the message. */
static void dec_function(dec *d, wp__reader *hdr, int depth) {
  lua_State *L = d->L;
  wp__reader *r = d->r;
  uint32_t len;
  uint64_t nups, i;
  const char *bc;
  char pure;
  int f, cached = 0;
  uint64_t id;
  if (get_bytes(hdr, &id, 8) || get_bytes(hdr, &len, 4) ||
      len > (size_t)(hdr->end - hdr->p))
    dec_bad(d);
  bc = hdr->p;
  hdr->p += len;
  if (wp__get_varint(r, &nups) || get_bytes(r, &pure, 1) || nups > 255)
    dec_bad(d);
  luaL_checkstack(L, 4, "functions nested too deeply");
  /* Only a function whose upvalues are all _ENV can be one object for every
   * call: any other needs a closure, and upvalue cells, of its own. */
  if (pure && d->cache) {
    if (lua_rawgeti(L, d->cache, (lua_Integer)id) == LUA_TFUNCTION)
      cached = 1;
    else
      lua_pop(L, 1);
  }
  if (!cached) {
    lua_Debug ar;
    if (luaL_loadbufferx(L, bc, len, "=(task)", "b") != LUA_OK) lua_error(L);
    /* lua_setupvalue trusts the chunk to make as many upvalues as its
     * prototype names: a message whose counts disagree is forged. */
    lua_pushvalue(L, -1);
    lua_getinfo(L, ">u", &ar);
    if (ar.nups != nups) dec_bad(d);
    if (pure && d->cache) cache_store(d, id);
  }
  f = lua_gettop(L);
  dec_register(d);
  for (i = 1; i <= nups; i++) {
    dec_value(d, depth + 1);
    if (cached || lua_setupvalue(L, f, (int)i) == NULL) lua_pop(L, 1);
  }
}

/* [-0, +1, e] Pushes package.loaded[name], requiring it when absent. */
static void dec_module(dec *d, const char *name, size_t len) {
  lua_State *L = d->L;
  lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_pushlstring(L, name, len);
  if (lua_rawget(L, -2) == LUA_TNIL) {
    lua_pop(L, 1);
    lua_getglobal(L, "require");
    lua_pushlstring(L, name, len);
    lua_call(L, 1, 1);
  }
  lua_remove(L, -2);
}

/* [-0, +1, e] Pushes the C function named "lib.fn" (or "fn" in _G),
 * requiring lib when it is not loaded yet. */
static void dec_cfunction(dec *d, const char *name, size_t len) {
  lua_State *L = d->L;
  const char *dot = memchr(name, '.', len);
  if (dot == NULL) {
    lua_pushglobaltable(L);
    lua_pushlstring(L, name, len);
  } else {
    dec_module(d, name, (size_t)(dot - name));
    if (!lua_istable(L, -1)) {
      lua_pushlstring(L, name, len);
      luaL_error(L, "cannot resolve C function '%s': library not loaded",
                 lua_tostring(L, -1));
    }
    lua_pushlstring(L, dot + 1, len - (size_t)(dot - name) - 1);
  }
  lua_rawget(L, -2);
  lua_remove(L, -2);
  if (!lua_iscfunction(L, -1)) {
    lua_pushlstring(L, name, len);
    luaL_error(L, "cannot resolve C function '%s'", lua_tostring(L, -1));
  }
}
/* [-0, +1, m] Pushes the scalar (nil, boolean, number, string) whose tag
 * was just read.  0 when done, WP_EINVAL when the bytes after the tag are
 * short, 1 when the tag is not a scalar's (nothing read or pushed). */
static inline int dec_scalar(lua_State *L, wp__reader *r, unsigned char tag) {
  const char *s;
  size_t len;
  int64_t i;
  double n;
  switch (tag) {
  case WP__T_NIL:
    lua_pushnil(L);
    return 0;
  case WP__T_FALSE:
  case WP__T_TRUE:
    lua_pushboolean(L, tag == WP__T_TRUE);
    return 0;
  case WP__T_INT:
    if (get_bytes(r, &i, 8)) return WP_EINVAL;
    lua_pushinteger(L, (lua_Integer)i);
    return 0;
  case WP__T_FLT:
    if (get_bytes(r, &n, 8)) return WP_EINVAL;
    lua_pushnumber(L, (lua_Number)n);
    return 0;
  case WP__T_STR:
    if (get_lstring(r, &s, &len)) return WP_EINVAL;
    lua_pushlstring(L, s, len);
    return 0;
  default:
    return 1;
  }
}

/* [-0, +(0|1), m] Pushes the table key or value at r when it is a short
 * string (a one-byte length) or an integer, most of what tables hold, and
 * returns 1; else pushes nothing and returns 0 (dec_value reads it). */
static inline int dec_plain(lua_State *L, wp__reader *r) {
  const unsigned char *p = (const unsigned char *)r->p;
  size_t left = (size_t)(r->end - r->p);
  if (left >= 2 && p[0] == WP__T_STR && p[1] < 0x80 && left - 2 >= p[1]) {
    lua_pushlstring(L, r->p + 2, p[1]);
    r->p += 2 + p[1];
    return 1;
  }
  if (left >= 9 && p[0] == WP__T_INT) {
    int64_t i;
    memcpy(&i, p + 1, 8);
    lua_pushinteger(L, (lua_Integer)i);
    r->p += 9;
    return 1;
  }
  return 0;
}

/* [-0, +0, m] Puts the state's key cache in its slot, making it the
 * first time. */
static void dec_keys(dec *d) {
  lua_State *L = d->L;
  keycache *kc = NULL;
  /* Checked, so that a userdata put there through debug.getregistry()
   * is not taken for one. */
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &keys_key) == LUA_TUSERDATA &&
      lua_rawlen(L, -1) == sizeof *kc)
    kc = lua_touserdata(L, -1);
  if (kc != NULL && kc->self == kc) {
    d->kc = kc;
  } else {
    lua_pop(L, 1);
    d->kc = lua_newuserdatauv(L, sizeof *d->kc, KEYS_N);
    memset(d->kc, 0, sizeof *d->kc);
    d->kc->self = d->kc;
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &keys_key);
  }
  lua_replace(L, d->refs + NUM_SLOTS);
}

/* [-0, +(0|1), m] Pushes the key of the pair at place i of a table when
 * it is a short string, from the key cache when it holds that string for
 * place i, and returns 1; else pushes nothing and returns 0. */
static inline int dec_key(dec *d, uint32_t i) {
  lua_State *L = d->L;
  keycache *kc = d->kc;
  const unsigned char *p = (const unsigned char *)d->r->p;
  size_t left = (size_t)(d->r->end - d->r->p), len;
  int k = (int)(i % KEYS_N), slot = d->refs + NUM_SLOTS;
  if (kc->pause) {
    kc->pause--;
    return 0;
  }
  if (left < 2 || p[0] != WP__T_STR || (len = p[1]) > KEYS_MAXLEN ||
      left - 2 < len)
    return 0;
  if (++kc->tries == KEYS_WINDOW) {
    if (kc->hits < KEYS_WINDOW / 2) kc->pause = KEYS_PAUSE;
    kc->tries = kc->hits = 0;
  }
  if (kc->len[k] == len && kc->s[k] && memcmp(kc->s[k], p + 2, len) == 0) {
    kc->hits++;
    lua_getiuservalue(L, slot, k + 1);
  } else {
    kc->s[k] = lua_pushlstring(L, (const char *)p + 2, len);
    kc->len[k] = (unsigned char)len;
    lua_pushvalue(L, -1);
    lua_setiuservalue(L, slot, k + 1); /* anchors s[k] */
  }
  d->r->p += 2 + len;
  return 1;
}

static void dec_value(dec *d, int depth) {
  lua_State *L = d->L;
  wp__reader *r = d->r;
  unsigned char tag;
  const char *s;
  size_t len;
  uint64_t id;
  int sc;
  if (depth > WP_MAX_DEPTH + 1 || get_bytes(r, &tag, 1)) dec_bad(d);
  if ((sc = dec_scalar(L, r, tag)) <= 0) {
    if (sc) dec_bad(d);
    return;
  }
  switch (tag) {
  case WP__T_ENV:
    lua_pushglobaltable(L);
    break;
  case WP__T_REF:
    if (wp__get_varint(r, &id) || id >= (uint64_t)d->nextid) dec_bad(d);
    if (d->nextid <= NUM_SLOTS)
      lua_pushvalue(L, d->refs + (int)id);
    else
      lua_rawgeti(L, d->refs, (lua_Integer)id + 1);
    break;
  case WP__T_CFUNC:
    if (get_lstring(r, &s, &len)) dec_bad(d);
    dec_cfunction(d, s, len);
    break;
  case WP__T_MODULE:
    if (get_lstring(r, &s, &len)) dec_bad(d);
    dec_module(d, s, len);
    break;
  case WP__T_FUNC:
    dec_function(d, r, depth);
    break;
  case WP__T_FUNCID: {
    wp__reader rec;
    if (wp__get_varint(r, &id) || (rec.p = wp__fnstore_get(id, &len)) == NULL)
      dec_bad(d);
    rec.end = rec.p + len;
    dec_function(d, &rec, depth);
    break;
  }
  case WP__T_TABLE: {
    uint32_t hints[2], i;
    size_t left;
    int keyed;
    luaL_checkstack(L, 4, "tables nested too deeply");
    if (get_bytes(r, hints, sizeof hints)) dec_bad(d);
    /* Hints only size the table; a pair takes at least 2 bytes. */
    left = (size_t)(r->end - r->p) / 2;
    if (hints[0] > left || hints[1] > hints[0]) dec_bad(d);
    lua_createtable(L, (int)hints[1], (int)(hints[0] - hints[1]));
    dec_register(d);
    /* Only tables with other keys than integers look at the key cache. */
    keyed = hints[1] < hints[0];
    if (keyed && d->kc == NULL) dec_keys(d);
    for (i = 0;; i++) {
      if (r->p >= r->end) dec_bad(d);
      if ((unsigned char)*r->p == WP__T_END) {
        r->p++;
        break;
      }
      if (!(keyed && dec_key(d, i)) && !dec_plain(L, r)) {
        dec_value(d, depth + 1);
        if (lua_isnil(L, -1)) dec_bad(d);
      }
      if (!dec_plain(L, r)) dec_value(d, depth + 1);
      lua_rawset(L, -3);
    }
    break;
  }
  default:
    dec_bad(d);
  }
}

void wp__decode(lua_State *L, wp__reader *r, int n, int cache) {
  dec d;
  int i, k;
  if (n < 0 || (size_t)n > (size_t)(r->end - r->p)) /* >= 1 byte each */
    luaL_error(L, "malformed value message");
  luaL_checkstack(L, n + NUM_SLOTS + 4, "too many values");
  /* Leading scalars (most results are a few) need no table of
   * references. */
  for (i = 0; i < n && r->p < r->end; i++) {
    int sc = dec_scalar(L, r, (unsigned char)*r->p++);
    if (sc == 1) { /* dec_value reads it */
      r->p--;
      break;
    }
    if (sc) luaL_error(L, "malformed value message");
  }
  if (i == n) return;
  d.L = L;
  d.r = r;
  d.nextid = 0;
  d.cache = cache ? lua_absindex(L, cache) : 0;
  d.kc = NULL;
  d.refs = lua_gettop(L) + 1;
  for (k = 0; k <= NUM_SLOTS; k++) /* the references, then the key cache */
    lua_pushnil(L);
  for (; i < n; i++)
    dec_value(&d, 0);
  lua_rotate(L, d.refs, -(NUM_SLOTS + 1)); /* the slots go on top */
  lua_pop(L, NUM_SLOTS + 1);
}
