/*
 * lpack.c: the pipeline's hand-off format between stages.
 *
 *   workerpool["pipeline.pack"](list)   -> string | nil, reason
 *   workerpool["pipeline.unpack"](s)    -> list, n
 *   workerpool["pipeline.lines"](fh [, "jsonl"]) -> reader;
 *     reader(k) -> block, n [, bad]
 *   workerpool["pipeline.split"](s)     -> list, n
 *   workerpool["pipeline.results"](...) -> n, v | n, {v1, ..., vn}
 *
 * A stage worker packs its batch of outputs into one string, the host
 * passes that string on to the next stage without looking inside, and the
 * next stage's worker unpacks it: the host then copies one string per
 * batch instead of decoding and re-encoding every item's tables (see
 * docs/performance.md, Pipelines).  Items are plain data: nil-free lists
 * of booleans, integers, floats, strings, json.null and tables of those
 * (any key type but nil).  Anything else (functions, userdata, a table
 * nested deeper than PACK_DEPTH, which a cycle always is) makes pack
 * return nil and the reason, and the runner falls back to passing the
 * list itself.  Shared sub-tables arrive as separate copies.
 *
 * Layout: varint item count, then values.  A value is a tag byte and its
 * body: 'f' false, 't' true, 'z' null, 'i' int64 and 'd' double (8 bytes,
 * native order: both ends are this process), 's' varint length and bytes,
 * 'T' varint array length, 4-byte hash count, the array values, then
 * key/value pairs.  unpack bounds every read and raises on a malformed
 * string.
 *
 * A `lines` or `jsonl` file crosses to its first stage as raw blocks
 * instead: the host reads the file in C and cuts its bytes after every
 * k-th line (lines), and the stage's worker splits the block into its
 * lines (split), so the host makes no Lua value per line and copies each
 * byte once.  For jsonl the host only checks each line (a quick scan, or
 * jansson when the scan is not sure) and the workers decode it.  results
 * lets a fused chain take the results of a handler call without a vararg
 * Lua function.
 */
#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "lpipeline.h"

#define PACK_DEPTH 64

typedef struct packer {
  lua_State *L;
  wpl_wbuf *b;
  const char *why; /* why a value cannot be packed, or NULL */
} packer;

static void put_varint(wpl_wbuf *b, uint64_t v) {
  char tmp[10];
  size_t n = 0;
  do {
    tmp[n++] = (char)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
    v >>= 7;
  } while (v);
  wpl_wbuf_add(b, tmp, n);
}

static int pack_value(packer *k, int idx, int depth);

/* [-0, +0, m] The table at idx. */
static int pack_table(packer *k, int idx, int depth) {
  lua_State *L = k->L;
  lua_Integer narr = 0, i;
  uint32_t nhash = 0;
  size_t at;
  if (depth > PACK_DEPTH) {
    k->why = "tables nested too deeply (or a cycle)";
    return -1;
  }
  luaL_checkstack(L, 4, "pack: nesting too deep");
  while (lua_rawgeti(L, idx, narr + 1) != LUA_TNIL) {
    lua_pop(L, 1);
    narr++;
  }
  lua_pop(L, 1);
  wpl_wbuf_add(k->b, "T", 1);
  put_varint(k->b, (uint64_t)narr);
  at = k->b->n;
  wpl_wbuf_add(k->b, &nhash, sizeof nhash);
  for (i = 1; i <= narr; i++) {
    lua_rawgeti(L, idx, i);
    if (pack_value(k, lua_gettop(L), depth + 1)) return -1;
    lua_pop(L, 1);
  }
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    if (lua_isinteger(L, -2)) {
      lua_Integer key = lua_tointeger(L, -2);
      if (key >= 1 && key <= narr) {
        lua_pop(L, 1);
        continue;
      }
    }
    if (pack_value(k, lua_gettop(L) - 1, depth + 1) ||
        pack_value(k, lua_gettop(L), depth + 1))
      return -1;
    lua_pop(L, 1);
    nhash++;
  }
  memcpy(k->b->p + at, &nhash, sizeof nhash);
  return 0;
}

/* [-0, +0, m] The value at idx; 0, or -1 with k->why set. */
static int pack_value(packer *k, int idx, int depth) {
  lua_State *L = k->L;
  size_t n;
  const char *s;
  switch (lua_type(L, idx)) {
  case LUA_TBOOLEAN:
    wpl_wbuf_add(k->b, lua_toboolean(L, idx) ? "t" : "f", 1);
    return 0;
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx)) {
      int64_t v = (int64_t)lua_tointeger(L, idx);
      wpl_wbuf_add(k->b, "i", 1);
      wpl_wbuf_add(k->b, &v, sizeof v);
    } else {
      double d = (double)lua_tonumber(L, idx);
      wpl_wbuf_add(k->b, "d", 1);
      wpl_wbuf_add(k->b, &d, sizeof d);
    }
    return 0;
  case LUA_TSTRING:
    s = lua_tolstring(L, idx, &n);
    wpl_wbuf_add(k->b, "s", 1);
    put_varint(k->b, (uint64_t)n);
    wpl_wbuf_add(k->b, s, n);
    return 0;
  case LUA_TTABLE:
    return pack_table(k, idx, depth);
  case LUA_TFUNCTION:
    if (lua_tocfunction(L, idx) == wpl_json_null) {
      wpl_wbuf_add(k->b, "z", 1);
      return 0;
    }
    /* fall through */
  default:
    k->why = "a value that is not plain data";
    return -1;
  }
}

/* pack(list [, n]) -> string | nil, reason, "EINVAL"   [-0, +1|3, m] */
static int pack(lua_State *L) {
  lua_Integer n, i;
  wpl_wbuf b;
  packer k;
  luaL_checktype(L, 1, LUA_TTABLE);
  n = luaL_optinteger(L, 2, (lua_Integer)lua_rawlen(L, 1));
  lua_settop(L, 1);
  wpl_wbuf_init(L, &b, 64 * (size_t)n + 16); /* 2 */
  k.L = L;
  k.b = &b;
  k.why = NULL;
  put_varint(&b, (uint64_t)n);
  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, 1, i);
    if (lua_isnil(L, -1)) k.why = "a nil in the list";
    if (k.why || pack_value(&k, lua_gettop(L), 0)) {
      lua_settop(L, 2); /* what a failed pack_value left is dropped */
      lua_pushnil(L);
      lua_pushstring(L, k.why);
      lua_pushstring(L, wp_err_name(WP_EINVAL));
      return 3;
    }
    assert(lua_gettop(L) == 3); /* the list, the buffer, the item */
    lua_pop(L, 1);
  }
  lua_pushlstring(L, b.p, b.n);
  return 1;
}

typedef struct reader {
  lua_State *L;
  const unsigned char *p, *end;
} reader;

static void bad(reader *r) {
  luaL_error(r->L, "pipeline.unpack: malformed data");
}

static uint64_t get_varint(reader *r) {
  uint64_t v = 0;
  int shift = 0;
  for (;;) {
    unsigned c;
    if (r->p >= r->end || shift > 63) bad(r);
    c = *r->p++;
    v |= (uint64_t)(c & 0x7f) << shift;
    if (!(c & 0x80)) return v;
    shift += 7;
  }
}

static void get_bytes(reader *r, void *out, size_t n) {
  if ((size_t)(r->end - r->p) < n) bad(r);
  memcpy(out, r->p, n);
  r->p += n;
}

/* [-0, +1, m] Pushes the next value. */
static void unpack_value(reader *r, int depth) {
  lua_State *L = r->L;
  unsigned tag;
  if (r->p >= r->end || depth > PACK_DEPTH + 1) bad(r);
  tag = *r->p++;
  switch (tag) {
  case 'f':
  case 't':
    lua_pushboolean(L, tag == 't');
    break;
  case 'z':
    lua_pushcfunction(L, wpl_json_null);
    break;
  case 'i': {
    int64_t v;
    get_bytes(r, &v, sizeof v);
    lua_pushinteger(L, (lua_Integer)v);
    break;
  }
  case 'd': {
    double d;
    get_bytes(r, &d, sizeof d);
    lua_pushnumber(L, (lua_Number)d);
    break;
  }
  case 's': {
    uint64_t n = get_varint(r);
    if ((uint64_t)(r->end - r->p) < n) bad(r);
    lua_pushlstring(L, (const char *)r->p, (size_t)n);
    r->p += n;
    break;
  }
  case 'T': {
    uint64_t narr = get_varint(r), i;
    uint32_t nhash;
    get_bytes(r, &nhash, sizeof nhash);
    /* Every value takes a byte at least: refuse absurd size hints. */
    if (narr > (uint64_t)(r->end - r->p) || nhash > (size_t)(r->end - r->p))
      bad(r);
    luaL_checkstack(L, 4, "pipeline.unpack: nesting too deep");
    lua_createtable(L, (int)narr, (int)nhash);
    for (i = 1; i <= narr; i++) {
      unpack_value(r, depth + 1);
      lua_rawseti(L, -2, (lua_Integer)i);
    }
    for (i = 0; i < nhash; i++) {
      unpack_value(r, depth + 1);
      unpack_value(r, depth + 1);
      if (lua_isnil(L, -2)) bad(r);
      lua_rawset(L, -3);
    }
    break;
  }
  default:
    bad(r);
  }
}

/* unpack(s) -> list, n   [-0, +2, e] */
static int unpack(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  reader r;
  uint64_t n, i;
  r.L = L;
  r.p = (const unsigned char *)s;
  r.end = r.p + len;
  n = get_varint(&r);
  if (n > len) bad(&r);
  lua_createtable(L, (int)n, 0);
  for (i = 1; i <= n; i++) {
    unpack_value(&r, 0);
    lua_rawseti(L, -2, (lua_Integer)i);
  }
  if (r.p != r.end) bad(&r);
  lua_pushinteger(L, (lua_Integer)n);
  return 2;
}

/* A lines file read in blocks of whole lines: the bytes read but not yet
 * handed out are buf[lo, hi); the first `found` lines after lo that
 * count (every line, or in jsonl mode the non-blank ones) end before
 * buf + scan. */
typedef struct lines_reader {
  char *buf; /* malloc'd, freed by __gc */
  size_t cap, lo, hi, scan, found;
  int eof;
  int jsonl; /* blank lines do not count, and each line is checked */
} lines_reader;

#define LINES_READ (256u << 10)     /* bytes asked of fread at a time */
#define LINES_MT "workerpool.lines" /* its userdata's metatable */

/* As json.decode (ljson.c) decodes. */
#define JSONL_FLAGS (JSON_DECODE_ANY | JSON_ALLOW_NUL)

/* [-0, +0, -] __gc of the reader's userdata. */
static int lines_gc(lua_State *L) {
  lines_reader *r = lua_touserdata(L, 1);
  free(r->buf);
  r->buf = NULL;
  return 0;
}

/* Reads more bytes after hi, first moving what is left to the front and
 * growing the buffer when it is full.  Raises on a read error, lines
 * that would make a block larger than a message may be, or no memory. */
static void lines_fill(lua_State *L, lines_reader *r, FILE *f) {
  size_t got;
  if (r->lo > 0) {
    memmove(r->buf, r->buf + r->lo, r->hi - r->lo);
    r->hi -= r->lo;
    r->scan -= r->lo;
    r->lo = 0;
  }
  if (r->cap - r->hi < LINES_READ) {
    size_t cap = r->cap ? r->cap * 2 : 2 * LINES_READ;
    char *p;
    if (cap > (size_t)WP_MAX_MSG + 2 * LINES_READ)
      luaL_error(L, "a block of lines over %d MiB (the most a message holds)",
                 (int)(WP_MAX_MSG >> 20));
    if ((p = realloc(r->buf, cap)) == NULL) luaL_error(L, "not enough memory");
    r->buf = p;
    r->cap = cap;
  }
  got = fread(r->buf + r->hi, 1, r->cap - r->hi, f);
  r->hi += got;
  if (got == 0) {
    if (ferror(f)) luaL_error(L, "read error: %s", strerror(errno));
    r->eof = 1;
  }
}

/* Whether [p, e) holds only white space (Lua's %s), as a jsonl source
 * skips it. */
static int blank(const char *p, const char *e) {
  for (; p < e; p++)
    if (!isspace((unsigned char)*p)) return 0;
  return 1;
}

/* A quick check of the JSON that most jsonl lines hold: ASCII strings
 * without \u escapes, numbers that fit (integers of up to 18 digits,
 * reals of up to 17 digits and exponents up to 280), nesting up to
 * JSONL_DEPTH.  1: jansson decodes the line too, without a doubt; 0: not
 * such JSON, so jansson decides (and says why when it refuses).  It
 * spares the host a decode per line: the workers decode. */
#define JSONL_DEPTH 64

typedef struct jscan {
  const char *p, *e;
} jscan;

static void js_ws(jscan *s) {
  while (s->p < s->e &&
         (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
    s->p++;
}

static int js_digits(jscan *s) {
  const char *b = s->p;
  while (s->p < s->e && *s->p >= '0' && *s->p <= '9')
    s->p++;
  return (int)(s->p - b);
}

static int js_string(jscan *s) {
  if (s->p >= s->e || *s->p != '"') return 0;
  for (s->p++; s->p < s->e; s->p++) {
    unsigned char c = (unsigned char)*s->p;
    if (c == '"') {
      s->p++;
      return 1;
    }
    if (c < 0x20 || c >= 0x80) return 0;
    if (c == '\\') {
      if (++s->p >= s->e || !strchr("\"\\/bfnrt", *s->p) || *s->p == '\0')
        return 0;
    }
  }
  return 0;
}

static int js_number(jscan *s) {
  int n, frac = 0, exp = 0;
  if (s->p < s->e && *s->p == '-') s->p++;
  if (s->p < s->e && *s->p == '0') {
    s->p++;
    n = 1;
    if (s->p < s->e && *s->p >= '0' && *s->p <= '9') return 0;
  } else if ((n = js_digits(s)) == 0) {
    return 0;
  }
  if (s->p < s->e && *s->p == '.') {
    s->p++;
    if ((frac = js_digits(s)) == 0) return 0;
  }
  if (s->p < s->e && (*s->p == 'e' || *s->p == 'E')) {
    const char *b;
    int v = 0;
    s->p++;
    if (s->p < s->e && (*s->p == '+' || *s->p == '-')) s->p++;
    b = s->p;
    if ((exp = js_digits(s)) == 0 || exp > 3) return 0;
    for (; b < s->p; b++) /* not atoi: the line need not end in a NUL */
      v = v * 10 + (*b - '0');
    if (v > 280) return 0;
  }
  return frac || exp ? n + frac <= 17 : n <= 18;
}

static int js_value(jscan *s, int depth) {
  js_ws(s);
  if (s->p >= s->e) return 0;
  switch (*s->p) {
  case '{':
  case '[': {
    char close = *s->p == '{' ? '}' : ']';
    int obj = close == '}';
    if (depth >= JSONL_DEPTH) return 0;
    s->p++;
    js_ws(s);
    if (s->p < s->e && *s->p == close) {
      s->p++;
      break;
    }
    for (;;) {
      if (obj) {
        js_ws(s);
        if (!js_string(s)) return 0;
        js_ws(s);
        if (s->p >= s->e || *s->p++ != ':') return 0;
      }
      if (!js_value(s, depth + 1)) return 0;
      js_ws(s);
      if (s->p >= s->e) return 0;
      if (*s->p == close) {
        s->p++;
        break;
      }
      if (*s->p++ != ',') return 0;
    }
    break;
  }
  case '"':
    if (!js_string(s)) return 0;
    break;
  case 't':
  case 'f':
  case 'n': {
    const char *w = *s->p == 't' ? "true" : *s->p == 'f' ? "false" : "null";
    size_t n = strlen(w);
    if ((size_t)(s->e - s->p) < n || memcmp(s->p, w, n) != 0) return 0;
    s->p += n;
    break;
  }
  default:
    if (!js_number(s)) return 0;
  }
  return 1;
}

static int jsonl_plain(const char *p, size_t n) {
  jscan s;
  s.p = p;
  s.e = p + n;
  if (!js_value(&s, 0)) return 0;
  js_ws(&s);
  return s.p == s.e;
}

/* [-0, +3, m] jsonl mode: of the r->found items (non-blank lines) in
 * buf[lo, end), pushes the block of those that are JSON (each with its
 * newline), the number of items, and nil or a list of the others:
 * {item number, line, "LINE:COL: message" as json.decode says}. */
static int jsonl_block(lua_State *L, lines_reader *r, size_t end) {
  const char *p, *e = r->buf + end;
  lua_Integer i = 0, nbad = 0, k = 1;
  int gaps = 0, bad;
  luaL_Buffer b;
  lua_newtable(L);
  bad = lua_gettop(L);
  for (p = r->buf + r->lo; p < e;) {
    const char *nl = memchr(p, '\n', (size_t)(e - p));
    const char *le = nl ? nl : e;
    json_error_t err;
    json_t *v;
    if (blank(p, le)) {
      gaps++;
    } else if (i++, jsonl_plain(p, (size_t)(le - p))) {
      /* good */
    } else if ((v = json_loadb(p, (size_t)(le - p), JSONL_FLAGS, &err))) {
      json_decref(v);
    } else {
      gaps++;
      lua_createtable(L, 3, 0);
      lua_pushinteger(L, i);
      lua_rawseti(L, -2, 1);
      lua_pushlstring(L, p, (size_t)(le - p));
      lua_rawseti(L, -2, 2);
      lua_pushfstring(L, "%d:%d: %s", err.line, err.column, err.text);
      lua_rawseti(L, -2, 3);
      lua_rawseti(L, bad, ++nbad);
    }
    p = nl ? nl + 1 : e;
  }
  if (gaps == 0) {
    lua_pushlstring(L, r->buf + r->lo, end - r->lo);
  } else { /* the good lines again, by item number, skipping the bad */
    luaL_buffinit(L, &b);
    i = 0;
    for (p = r->buf + r->lo; p < e;) {
      const char *nl = memchr(p, '\n', (size_t)(e - p));
      const char *next = nl ? nl + 1 : e;
      if (!blank(p, nl ? nl : e)) {
        int good = 1;
        i++;
        if (k <= nbad) {
          lua_rawgeti(L, bad, (lua_Integer)k);
          lua_rawgeti(L, -1, 1);
          if (lua_tointeger(L, -1) == i) {
            good = 0;
            k++;
          }
          lua_pop(L, 2);
        }
        if (good) luaL_addlstring(&b, p, (size_t)(next - p));
      }
      p = next;
    }
    luaL_pushresult(&b);
  }
  lua_pushinteger(L, (lua_Integer)r->found);
  if (nbad)
    lua_pushvalue(L, bad);
  else
    lua_pushnil(L);
  return 3;
}

/* reader(k) -> block, count [, bad] | nil   [-0, +1|2|3, v]
 * Upvalues: the lines_reader, the file handle.  The next k lines as one
 * string, newlines kept, and k; at the end of the file what is left (a
 * last line without a newline counts) and its count; then nil.  In jsonl
 * mode blank lines are left out and do not count, and the lines that are
 * not JSON are left out of the block and listed (jsonl_block). */
static int lines_next(lua_State *L) {
  lines_reader *r = lua_touserdata(L, lua_upvalueindex(1));
  luaL_Stream *fs = lua_touserdata(L, lua_upvalueindex(2));
  lua_Integer k = luaL_checkinteger(L, 1);
  size_t end;
  luaL_argcheck(L, k >= 1, 1, "must be positive");
  if (fs->closef == NULL) return luaL_error(L, "attempt to use a closed file");
  for (;;) {
    while (r->found < (size_t)k && r->scan < r->hi) {
      const char *line = r->buf + r->scan;
      const char *nl = memchr(line, '\n', r->hi - r->scan);
      if (nl == NULL) {
        r->scan = r->hi;
        break;
      }
      r->scan = (size_t)(nl - r->buf) + 1;
      if (!r->jsonl || !blank(line, nl)) r->found++;
    }
    if (r->found == (size_t)k) {
      end = r->scan;
      break;
    }
    if (r->eof) {
      const char *last = r->buf + r->lo;
      end = r->hi;
      if (end > r->lo && r->buf[end - 1] != '\n') { /* a last line */
        const char *nl = memrchr(last, '\n', end - r->lo);
        if (nl) last = nl + 1;
        if (!r->jsonl || !blank(last, r->buf + end)) r->found++;
      }
      if (r->found == 0) {
        r->lo = r->scan = r->hi;
        lua_pushnil(L);
        return 1;
      }
      break;
    }
    lines_fill(L, r, fs->f);
  }
  if (r->jsonl) {
    jsonl_block(L, r, end);
  } else {
    lua_pushlstring(L, r->buf + r->lo, end - r->lo);
    lua_pushinteger(L, (lua_Integer)r->found);
  }
  r->lo = r->scan = end;
  r->found = 0;
  return r->jsonl ? 3 : 2;
}

/* lines(fh [, mode]) -> reader   [-0, +1, v]
 * A reader of fh, an io file opened for reading: see lines_next.  mode is
 * "lines" (the default) or "jsonl".  It reads ahead, so nothing else
 * should read fh while it is in use. */
static int lines(lua_State *L) {
  static const char *const modes[] = {"lines", "jsonl", NULL};
  lines_reader *r;
  int mode;
  luaL_checkudata(L, 1, LUA_FILEHANDLE);
  mode = luaL_checkoption(L, 2, "lines", modes);
  r = lua_newuserdatauv(L, sizeof *r, 0);
  memset(r, 0, sizeof *r);
  r->jsonl = mode == 1;
  luaL_setmetatable(L, LINES_MT);
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, lines_next, 2);
  return 1;
}

/* split(s) -> list, n   [-0, +2, m]
 * The lines of s, as the file:read("l") loop reads them: split at each
 * newline (dropped), a last line without one kept, none after a final
 * newline. */
static int split(lua_State *L) {
  size_t len, pos = 0;
  const char *s = luaL_checklstring(L, 1, &len);
  lua_Integer n = 0;
  lua_createtable(L, 128, 0);
  while (pos < len) {
    const char *nl = memchr(s + pos, '\n', len - pos);
    size_t end = nl ? (size_t)(nl - s) : len;
    lua_pushlstring(L, s + pos, end - pos);
    lua_rawseti(L, -2, ++n);
    pos = end + 1;
  }
  lua_pushinteger(L, n);
  return 2;
}

/* results(...) -> n, v | n, list   [-0, +2, m]
 * n, the number of arguments, and the only one (nil when none) when n is
 * 0 or 1, else a list of all of them. */
static int results(lua_State *L) {
  int n = lua_gettop(L), i;
  luaL_checkstack(L, 2, "pipeline.results");
  if (n <= 1) {
    lua_pushinteger(L, n);
    if (n == 0)
      lua_pushnil(L);
    else
      lua_pushvalue(L, 1);
    return 2;
  }
  lua_pushinteger(L, n);
  lua_createtable(L, n, 0);
  for (i = 1; i <= n; i++) {
    lua_pushvalue(L, i);
    lua_rawseti(L, -2, i);
  }
  return 2;
}

void wpl_pack_open(lua_State *L) {
  wpl_gc_metatable(L, LINES_MT, lines_gc);
  wp_register_cfunction("workerpool.pipeline.pack", pack);
  wp_register_cfunction("workerpool.pipeline.unpack", unpack);
  wp_register_cfunction("workerpool.pipeline.split", split);
  wp_register_cfunction("workerpool.pipeline.results", results);
  lua_pushcfunction(L, pack);
  lua_setfield(L, -2, "pipeline.pack");
  lua_pushcfunction(L, unpack);
  lua_setfield(L, -2, "pipeline.unpack");
  lua_pushcfunction(L, lines);
  lua_setfield(L, -2, "pipeline.lines");
  lua_pushcfunction(L, split);
  lua_setfield(L, -2, "pipeline.split");
  lua_pushcfunction(L, results);
  lua_setfield(L, -2, "pipeline.results");
}
