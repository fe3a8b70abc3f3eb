/*
 * ljson.c: workerpool.json, JSON for every state of the process (the host
 * and each worker, which load the module through package.preload).
 *
 *   json.encode(v)  -> string | nil, message
 *   json.decode(s)  -> value  | nil, "LINE:COL: message"
 *   json.null       the value that stands for JSON null
 *
 * Decoding is jansson's (json_loadb): integers become Lua integers, reals
 * floats, objects and arrays tables, null the json.null sentinel, so that
 * nulls keep their place in arrays and their key in objects.  Encoding
 * walks the Lua value straight into a byte buffer (wpl_wbuf): a table whose
 * keys are exactly 1..n is an array (the empty table is `[]`), any other needs
 * string keys; floats are written with the fewest digits that read back
 * bit for bit and always look like floats (`1.0`); strings must be UTF-8.
 * Cycles, nesting deeper than JSON_DEPTH, NaN and infinities, non-string
 * keys, invalid UTF-8 and values JSON cannot hold make encode return nil
 * and a message naming the path of the offending value
 * (`$.users[2].name: invalid UTF-8 in string`).
 *
 * json.null is a light C function registered as "workerpool.json.null", so
 * it crosses states by name like the standard library's functions and
 * arrives as the receiver's json.null (docs/values.md): a null survives a
 * trip through a pool.  The module table keeps it (and encode, decode)
 * under the raw keys "json.null" (...) for that lookup.
 *
 * Also here, for the pipeline runner (lua/workerpool/pipeline.lua): the
 * byte buffer both encoders write into (wpl_wbuf, lpipeline.h) and
 * workerpool["pipeline.log"](level, event, fields), which logs a JSON line
 * with its own event name.
 *
 * The jansson tree of a decode is C memory: it is converted to Lua inside
 * lua_pcall of a C function and freed whatever the outcome (the pmain
 * pattern), so a memory error cannot leak it.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lpipeline.h"

#define JSON_DEPTH 1000 /* most nested tables encode accepts */

/* The null sentinel.  Calling it returns it.  [-0, +1, -] */
int wpl_json_null(lua_State *L) {
  lua_pushcfunction(L, wpl_json_null);
  return 1;
}
#define ljson_null wpl_json_null

/* ---- the byte buffer (lpipeline.h) ------------------------------------ */

void wpl_wbuf_init(lua_State *L, wpl_wbuf *b, size_t cap) {
  b->L = L;
  b->cap = cap < 16 ? 16 : cap;
  b->n = 0;
  b->p = lua_newuserdatauv(L, b->cap, 0);
  b->idx = lua_gettop(L);
}

char *wpl_wbuf_reserve(wpl_wbuf *b, size_t n) {
  if (b->cap - b->n < n) {
    size_t cap = b->cap;
    char *p;
    while (cap - b->n < n) {
      if (cap > ((size_t)1 << 40)) luaL_error(b->L, "buffer too large");
      cap *= 2;
    }
    p = lua_newuserdatauv(b->L, cap, 0);
    memcpy(p, b->p, b->n);
    lua_replace(b->L, b->idx);
    b->p = p;
    b->cap = cap;
  }
  return b->p + b->n;
}

void wpl_wbuf_add(wpl_wbuf *b, const void *s, size_t n) {
  memcpy(wpl_wbuf_reserve(b, n), s, n);
  b->n += n;
}

/* ---- encode ---------------------------------------------------------- */

typedef struct enc {
  lua_State *L;
  wpl_wbuf *b;
  int seen;       /* stack index of the set of tables being encoded */
  char err[768];  /* first error, with its path */
  char path[512]; /* path of the value being encoded, for messages */
} enc;

static void addc(wpl_wbuf *b, char c) {
  if (b->n == b->cap) wpl_wbuf_reserve(b, 1);
  b->p[b->n++] = c;
}

static void adds(wpl_wbuf *b, const char *s) {
  wpl_wbuf_add(b, s, strlen(s));
}

static int utf8_valid(const unsigned char *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    unsigned c = s[i], need, cp, min;
    if (c < 0x80) {
      i++;
      continue;
    }
    if (c >= 0xc2 && c <= 0xdf) {
      need = 1;
      cp = c & 0x1f;
      min = 0x80;
    } else if (c >= 0xe0 && c <= 0xef) {
      need = 2;
      cp = c & 0x0f;
      min = 0x800;
    } else if (c >= 0xf0 && c <= 0xf4) {
      need = 3;
      cp = c & 0x07;
      min = 0x10000;
    } else {
      return 0;
    }
    if (n - i <= need) return 0;
    for (unsigned k = 1; k <= need; k++) {
      if ((s[i + k] & 0xc0) != 0x80) return 0;
      cp = (cp << 6) | (s[i + k] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    i += need + 1;
  }
  return 1;
}

static int enc_fail(enc *e, const char *msg) {
  if (e->err[0] == '\0')
    snprintf(e->err, sizeof e->err, "%s: %s", e->path, msg);
  return -1;
}

/* [-0, +0, m] Appends s as a JSON string; -1 when it is not UTF-8. */
static int enc_string(enc *e, const char *s, size_t n) {
  static const char hex[] = "0123456789abcdef";
  size_t i;
  if (!utf8_valid((const unsigned char *)s, n))
    return enc_fail(e, "invalid UTF-8 in string");
  addc(e->b, '"');
  for (i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\') {
      addc(e->b, '\\');
      addc(e->b, (char)c);
    } else if (c < 0x20) {
      switch (c) {
      case '\n':
        adds(e->b, "\\n");
        break;
      case '\t':
        adds(e->b, "\\t");
        break;
      case '\r':
        adds(e->b, "\\r");
        break;
      default: {
        char u[7] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15], 0};
        adds(e->b, u);
      }
      }
    } else {
      addc(e->b, (char)c);
    }
  }
  addc(e->b, '"');
  return 0;
}

/* [-0, +0, m] Appends a float that reads back as the same double. */
static int enc_float(enc *e, double d) {
  char buf[40];
  int prec;
  if (!isfinite(d)) return enc_fail(e, "cannot encode NaN or infinity");
  for (prec = 15; prec <= 17; prec++) {
    snprintf(buf, sizeof buf, "%.*g", prec, d);
    if (strtod(buf, NULL) == d) break;
  }
  if (strpbrk(buf, ".eE") == NULL) strcat(buf, ".0");
  adds(e->b, buf);
  return 0;
}

static int enc_value(enc *e, int idx, int depth);

/* Appends ".key" or "[i]" to the path; returns the old length. */
static size_t path_push(enc *e, lua_State *L, int key) {
  size_t len = strlen(e->path);
  if (len > 160) {
    if (strcmp(e->path + len - 3, "...") != 0) strcat(e->path, "...");
  } else if (lua_type(L, key) == LUA_TNUMBER && lua_isinteger(L, key))
    snprintf(e->path + len, sizeof e->path - len, "[%lld]",
             (long long)lua_tointeger(L, key));
  else if (lua_type(L, key) == LUA_TSTRING)
    snprintf(e->path + len, sizeof e->path - len, ".%.*s", 64,
             lua_tostring(L, key));
  return len;
}

/* [-0, +0, m] Appends the table at idx as an array or an object. */
static int enc_table(enc *e, int idx, int depth) {
  lua_State *L = e->L;
  lua_Integer n = 0, i;
  int array = 1, first = 1;
  size_t plen;
  if (depth > JSON_DEPTH) return enc_fail(e, "nesting too deep");
  luaL_checkstack(L, 6, "json.encode: nesting too deep");
  lua_pushvalue(L, idx);
  if (lua_rawget(L, e->seen) != LUA_TNIL)
    return enc_fail(e, "cycle (a table contains itself)");
  lua_pop(L, 1);
  lua_pushvalue(L, idx);
  lua_pushboolean(L, 1);
  lua_rawset(L, e->seen);
  /* An array has exactly the keys 1..n. */
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    n++;
    if (array && !(lua_type(L, -1) == LUA_TNUMBER && lua_isinteger(L, -1) &&
                   lua_tointeger(L, -1) >= 1))
      array = 0;
  }
  if (array && n > 0 && lua_rawlen(L, idx) != (size_t)n) {
    for (i = 1; i <= n && array; i++) {
      if (lua_rawgeti(L, idx, i) == LUA_TNIL) array = 0;
      lua_pop(L, 1);
    }
  }
  if (array) {
    addc(e->b, '[');
    for (i = 1; i <= n; i++) {
      if (i > 1) addc(e->b, ',');
      lua_pushinteger(L, i);
      plen = path_push(e, L, lua_gettop(L));
      lua_pop(L, 1);
      lua_rawgeti(L, idx, i);
      if (enc_value(e, lua_gettop(L), depth + 1)) return -1;
      lua_pop(L, 1);
      e->path[plen] = '\0';
    }
    addc(e->b, ']');
  } else {
    addc(e->b, '{');
    lua_pushnil(L);
    while (lua_next(L, idx)) {
      int k = lua_gettop(L) - 1;
      size_t kl;
      const char *ks;
      if (lua_type(L, k) != LUA_TSTRING) {
        char msg[96];
        snprintf(msg, sizeof msg,
                 "cannot encode a %s key (object keys are "
                 "strings)",
                 luaL_typename(L, k));
        return enc_fail(e, msg);
      }
      plen = path_push(e, L, k);
      if (!first) addc(e->b, ',');
      first = 0;
      ks = lua_tolstring(L, k, &kl);
      if (enc_string(e, ks, kl)) return -1;
      addc(e->b, ':');
      if (enc_value(e, lua_gettop(L), depth + 1)) return -1;
      lua_pop(L, 1);
      e->path[plen] = '\0';
    }
    addc(e->b, '}');
  }
  lua_pushvalue(L, idx);
  lua_pushnil(L);
  lua_rawset(L, e->seen);
  return 0;
}

/* [-0, +0, m] Appends the value at idx; 0, or -1 with e->err set. */
static int enc_value(enc *e, int idx, int depth) {
  lua_State *L = e->L;
  char buf[32];
  size_t n;
  const char *s;
  switch (lua_type(L, idx)) {
  case LUA_TNIL:
    adds(e->b, "null");
    return 0;
  case LUA_TBOOLEAN:
    adds(e->b, lua_toboolean(L, idx) ? "true" : "false");
    return 0;
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx)) {
      snprintf(buf, sizeof buf, LUA_INTEGER_FMT, lua_tointeger(L, idx));
      adds(e->b, buf);
      return 0;
    }
    return enc_float(e, (double)lua_tonumber(L, idx));
  case LUA_TSTRING:
    s = lua_tolstring(L, idx, &n);
    return enc_string(e, s, n);
  case LUA_TTABLE:
    return enc_table(e, idx, depth);
  case LUA_TFUNCTION:
    if (lua_tocfunction(L, idx) == ljson_null) {
      adds(e->b, "null");
      return 0;
    }
    /* fall through */
  default: {
    char msg[64];
    snprintf(msg, sizeof msg, "cannot encode a %s", luaL_typename(L, idx));
    return enc_fail(e, msg);
  }
  }
}

/* json.encode(v) -> string | nil, message, "EINVAL"   [-0, +1|3, m] */
static int json_encode(lua_State *L) {
  wpl_wbuf b;
  enc e;
  luaL_checkany(L, 1);
  lua_settop(L, 1);
  lua_newtable(L);           /* 2: tables on the current path */
  wpl_wbuf_init(L, &b, 256); /* 3 */
  e.L = L;
  e.b = &b;
  e.seen = 2;
  e.err[0] = '\0';
  strcpy(e.path, "$");
  if (enc_value(&e, 1, 0) != 0) {
    lua_pushnil(L);
    lua_pushstring(L, e.err);
    lua_pushstring(L, wp_err_name(WP_EINVAL));
    return 3;
  }
  lua_pushlstring(L, b.p, b.n);
  return 1;
}

/* ---- decode ---------------------------------------------------------- */

/* [-0, +1, m] Pushes the Lua form of v (depth is bounded by jansson). */
static void push_json(lua_State *L, json_t *v) {
  size_t i, n;
  const char *k;
  json_t *x;
  luaL_checkstack(L, 4, "json.decode: nesting too deep");
  switch (json_typeof(v)) {
  case JSON_OBJECT:
    lua_createtable(L, 0, (int)json_object_size(v));
    json_object_foreach(v, k, x) {
      lua_pushstring(L, k);
      push_json(L, x);
      lua_rawset(L, -3);
    }
    break;
  case JSON_ARRAY:
    n = json_array_size(v);
    lua_createtable(L, (int)n, 0);
    for (i = 0; i < n; i++) {
      push_json(L, json_array_get(v, i));
      lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    break;
  case JSON_STRING:
    lua_pushlstring(L, json_string_value(v), json_string_length(v));
    break;
  case JSON_INTEGER:
    lua_pushinteger(L, (lua_Integer)json_integer_value(v));
    break;
  case JSON_REAL:
    lua_pushnumber(L, (lua_Number)json_real_value(v));
    break;
  case JSON_TRUE:
    lua_pushboolean(L, 1);
    break;
  case JSON_FALSE:
    lua_pushboolean(L, 0);
    break;
  case JSON_NULL:
    lua_pushcfunction(L, ljson_null);
    break;
  }
}

/* Run under lua_pcall: 1 is the tree (light userdata).  [-0, +1, m] */
static int push_json_pmain(lua_State *L) {
  push_json(L, lua_touserdata(L, 1));
  return 1;
}

/* json.decode(s) -> value | nil, "LINE:COL: message", "EINVAL"
 * [-0, +1|3, e] */
static int json_decode(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  json_error_t err;
  json_t *root;
  int st;
  root = json_loadb(s, n, JSON_DECODE_ANY | JSON_ALLOW_NUL, &err);
  if (root == NULL) {
    lua_pushnil(L);
    lua_pushfstring(L, "%d:%d: %s", err.line, err.column, err.text);
    lua_pushstring(L, wp_err_name(WP_EINVAL));
    return 3;
  }
  lua_pushcfunction(L, push_json_pmain); /* light: cannot raise */
  lua_pushlightuserdata(L, root);
  st = lua_pcall(L, 1, 1, 0);
  json_decref(root);
  if (st != LUA_OK) return lua_error(L);
  return 1;
}

/* workerpool["pipeline.log"](level, event, fields): one JSON log line
 * whose event is `event` (workerpool.log writes event "log"); fields must
 * encode as a JSON object.  For the pipeline runner.   [-0, +0, e] */
static int pipeline_log(lua_State *L) {
  static const char *const levels[] = {"debug", "info", "warn", "error", NULL};
  int level = luaL_checkoption(L, 1, NULL, levels);
  const char *event = luaL_checkstring(L, 2);
  json_t *fields = NULL;
  if (!wpl_log_enabled(level)) return 0;
  if (!lua_isnoneornil(L, 3)) {
    lua_pushcfunction(L, json_encode);
    lua_pushvalue(L, 3);
    lua_call(L, 1, 2);
    if (lua_isnil(L, -2))
      return luaL_error(L, "pipeline.log: %s", lua_tostring(L, -1));
    fields = json_loads(lua_tostring(L, -2), 0, NULL);
    if (fields && !json_is_object(fields)) {
      json_decref(fields);
      fields = NULL;
    }
  }
  wpl_log(level, event, fields); /* steals fields; no Lua call after */
  return 0;
}

static const luaL_Reg json_funcs[] = {
    {"encode", json_encode}, {"decode", json_decode}, {NULL, NULL}};

void wpl_json_open(lua_State *L) {
  static const luaL_Reg all[] = {
      {"encode", json_encode}, {"decode", json_decode}, {"null", ljson_null}};
  char name[64];
  size_t i;
  luaL_newlib(L, json_funcs);
  lua_pushcfunction(L, ljson_null);
  lua_setfield(L, -2, "null");
  lua_setfield(L, -2, "json");
  for (i = 0; i < sizeof all / sizeof all[0]; i++) {
    snprintf(name, sizeof name, "workerpool.json.%s", all[i].name);
    wp_register_cfunction(name, all[i].func);
    lua_pushcfunction(L, all[i].func);
    lua_setfield(L, -2, name + sizeof "workerpool");
  }
  lua_pushcfunction(L, pipeline_log);
  lua_setfield(L, -2, "pipeline.log");
  wpl_pack_open(L);
}
