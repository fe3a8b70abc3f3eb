/*
 * submit.c: turning a submission into a queued future: encoding a Lua task
 * or C values into a message in the submitting thread, then handing it to
 * the pool's queue.  Encoding runs inside lua_pcall of a C function so the
 * message buffer, owned here, is freed whether or not a value is refused.
 */
#include <stdlib.h>
#include <string.h>

#include "wp_internal.h"

static char *dup_opt(const char *s, int *failed) {
  char *d;
  if (s == NULL) return NULL;
  if ((d = strdup(s)) == NULL) *failed = 1;
  return d;
}

/* Builds a future from an encoded message (taking it) and queues it. */
static int submit_msg(wp_pool *p, wp__buf *b, const wp_task_opts *o,
                      wp_future **out) {
  wp_future *f;
  int r, failed = 0;
  if (out) *out = NULL;
  if ((f = wp__future_new(p, b)) == NULL) return WP_ENOMEM;
  if (o) {
    f->name = dup_opt(o->name, &failed);
    f->tenant = dup_opt(o->tenant, &failed);
    f->timeout_ns = o->timeout < 0     ? -1
                    : o->timeout > 1e9 ? (int64_t)1e18
                                       : (int64_t)(o->timeout * 1e9);
    if (o->timeout > 0 && o->timeout < WP_MIN_DURATION)
      f->timeout_ns = (int64_t)(WP_MIN_DURATION * 1e9);
  }
  if (failed) {
    r = WP_ENOMEM;
  } else {
    r = wp__pool_enqueue(p, f, o && o->nowait);
  }
  if (r) {
    wp_future_release(f);
    wp_future_release(f);
    return r;
  }
  if (out)
    *out = f;
  else
    wp_future_release(f);
  return 0;
}

static int put_name(wp__buf *b, const char *name, size_t len) {
  int r = wp__buf_reserve(b, 1);
  if (!r) {
    b->data[b->len++] = WP__TASK_NAMED;
    r = wp__put_varint(b, len);
  }
  if (!r && (r = wp__buf_reserve(b, len)) == 0) {
    memcpy(b->data + b->len, name, len);
    b->len += len;
  }
  return r;
}

int wp_submit_values(wp_pool *p, const char *handler, const wp_value *args,
                     int nargs, wp_future **out) {
  char storage[WP__INLINE_MSG];
  wp__buf b = WP__BUF_ON(storage);
  int i, r;
  if (out) *out = NULL;
  if (handler == NULL || nargs < 0 || (nargs > 0 && args == NULL))
    return WP_EINVAL;
  if (wp__pool_forked(p)) return WP_EFORKED;
  if (atomic_load(&p->stopped)) {
    wp__count_drop(p, WP__DROP_STOPPED, 1);
    return WP_ESTOPPED;
  }
  r = put_name(&b, handler, strlen(handler));
  if (!r) r = wp__put_varint(&b, (uint64_t)nargs);
  for (i = 0; !r && i < nargs; i++)
    r = wp__put_cvalue(&b, &args[i]);
  if (!r) r = submit_msg(p, &b, NULL, out);
  wp__buf_free(&b);
  return r;
}

typedef struct encode_call {
  wp__buf *b;
  const char *what;
  int nargs;
  int after; /* b holds the task already, from its record: the arguments */
} encode_call;

/* [-(n+1), +0, e] Encodes a task message from its arguments: the call
 * description, then the task and its arguments. */
static int encode_pmain(lua_State *L) {
  encode_call *c = lua_touserdata(L, 1);
  wp__buf *b = c->b;
  int r;
  if (c->after) {
    wp__encode_after(L, b, 2, 3, c->nargs, c->what, 2);
  } else if (lua_type(L, 2) == LUA_TSTRING) {
    size_t len;
    const char *name = lua_tolstring(L, 2, &len);
    if ((r = put_name(b, name, len)) != 0)
      return luaL_error(L, "%s", wp_strerror(r));
    wp__encode(L, b, 3, c->nargs, c->what, 2);
  } else {
    if ((r = wp__buf_reserve(b, 1)) != 0)
      return luaL_error(L, "%s", wp_strerror(r));
    b->data[b->len++] = WP__TASK_FUNC;
    wp__encode(L, b, 2, c->nargs + 1, c->what, 1);
  }
  return 0;
}

int wp__fn_env_only(lua_State *L, int idx, int n) {
  int i, same = 1;
  idx = lua_absindex(L, idx);
  if (!lua_checkstack(L, 2)) return 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
  for (i = 1; same && i <= n; i++) {
    if (lua_getupvalue(L, idx, i) == NULL) {
      same = 0;
      break;
    }
    same = lua_rawequal(L, -1, -2);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return same;
}

int wp__fn_record(lua_State *L, int idx, char *out, size_t cap, size_t *len,
                  int *nenv) {
  char storage[WP__INLINE_MSG];
  wp__buf b = WP__BUF_ON(storage);
  int ok = 0, n = 0;
  idx = lua_absindex(L, idx);
  if (lua_type(L, idx) != LUA_TFUNCTION || lua_iscfunction(L, idx) ||
      !lua_checkstack(L, 1))
    return 0;
  while (lua_getupvalue(L, idx, n + 1) != NULL) {
    lua_pop(L, 1);
    n++;
  }
  if (!wp__fn_env_only(L, idx, n)) return 0;
  /* One value: its count is the one byte 1, then WP__T_FUNC, the id, the
   * length, the bytecode, and the rest (the upvalue count, the pure byte,
   * WP__T_ENV for each upvalue).  Interned in the function store, the id,
   * length and bytecode become WP__T_FUNCID and an index. */
  if (wp__encode_fast(L, &b, idx, 1) && b.len > 14 && b.data[0] == 1 &&
      (unsigned char)b.data[1] == WP__T_FUNC) {
    const char *hdr = b.data + 2, *rest;
    uint32_t blen, index;
    memcpy(&blen, hdr + 8, 4);
    rest = hdr + 12 + blen;
    if (wp__fnstore_intern(hdr, (size_t)(rest - hdr), &index) == 0) {
      char *p = out;
      size_t tail = (size_t)(b.data + b.len - rest);
      if (1 + WP__VARINT_MAX + tail <= cap) {
        *p++ = (char)WP__T_FUNCID;
        p = wp__varint_at(p, index);
        memcpy(p, rest, tail);
        *len = (size_t)(p - out) + tail;
        ok = 1;
      }
    } else if (b.len - 1 <= cap) {
      memcpy(out, b.data + 1, b.len - 1);
      *len = b.len - 1;
      ok = 1;
    }
    *nenv = n;
  }
  wp__buf_free(&b);
  return ok;
}

/* Encodes the task at `task` (a string or a Lua function, checked) and its
 * nargs arguments into b; rec, when not NULL, is the function's record
 * (wp__fn_record).  Raises like wp_submit_lua_opts. */
static void encode_task(lua_State *L, wp__buf *b, int task, int t, int nargs,
                        const char *what, const char *rec, size_t rlen) {
  encode_call c;
  int i;
  size_t head = 0;
  /* Scalars and functions sent before need no protected call. */
  if (t == LUA_TSTRING) {
    size_t len;
    const char *name = lua_tolstring(L, task, &len);
    if (put_name(b, name, len) == 0 && wp__encode_fast(L, b, task + 1, nargs))
      return;
  } else if (rec) {
    /* The tag, the count, the record, then the arguments: those the fast
     * path refuses (a table, mostly) go to the full encoder after the
     * record, so the function is not encoded again. */
    if (wp__buf_reserve(b, 1 + WP__VARINT_MAX + rlen) == 0) {
      char *p = b->data + b->len;
      *p++ = (char)WP__TASK_FUNC;
      p = wp__varint_at(p, (uint64_t)nargs + 1);
      memcpy(p, rec, rlen);
      b->len = head = (size_t)(p + rlen - b->data);
      if (wp__encode_fast_values(L, b, task + 1, nargs)) return;
    }
  } else if (wp__buf_reserve(b, 1) == 0) {
    b->data[b->len++] = WP__TASK_FUNC;
    if (wp__encode_fast(L, b, task, nargs + 1)) return;
  }
  b->len = head;
  c.b = b;
  c.what = what;
  c.nargs = nargs;
  c.after = head > 0;
  luaL_checkstack(L, nargs + 3, "too many arguments");
  lua_pushcfunction(L, encode_pmain);
  lua_pushlightuserdata(L, &c);
  for (i = 0; i <= nargs; i++)
    lua_pushvalue(L, task + i);
  if (lua_pcall(L, nargs + 2, 0, 0) != LUA_OK) {
    wp__buf_free(b);
    lua_error(L);
  }
}

int wp_submit_lua_opts(wp_pool *p, lua_State *L, int task, int nargs,
                       const char *what, const wp_task_opts *opts,
                       wp_future **out) {
  return wp__submit_lua_rec(p, L, task, nargs, what, opts, out, NULL, 0);
}

int wp__submit_lua_rec(wp_pool *p, lua_State *L, int task, int nargs,
                       const char *what, const wp_task_opts *opts,
                       wp_future **out, const char *rec, size_t rlen) {
  char storage[WP__INLINE_MSG];
  wp__buf b = WP__BUF_ON(storage);
  int t, r;
  if (out) *out = NULL;
  task = lua_absindex(L, task);
  t = lua_type(L, task);
  if (t != LUA_TSTRING && (t != LUA_TFUNCTION || lua_iscfunction(L, task)))
    luaL_error(L,
               "bad argument #1 to '%s' (handler name or Lua function "
               "expected, got %s)",
               what, lua_typename(L, t));
  if (wp__pool_forked(p)) return WP_EFORKED;
  if (atomic_load(&p->stopped)) {
    wp__count_drop(p, WP__DROP_STOPPED, 1);
    return WP_ESTOPPED;
  }
  encode_task(L, &b, task, t, nargs, what, t == LUA_TFUNCTION ? rec : NULL,
              rlen);
  r = submit_msg(p, &b, opts, out);
  wp__buf_free(&b);
  return r;
}

int wp_submit_lua(wp_pool *p, lua_State *L, int task, int nargs,
                  const char *what, wp_future **out) {
  return wp_submit_lua_opts(p, L, task, nargs, what, NULL, out);
}
