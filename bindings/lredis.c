/*
 * lredis.c: the Redis client of the module (hiredis), under the
 * redis-stream source, sink and dead letter and the Redis-backed token
 * bucket (lua/workerpool/redis.lua, docs/scale-out.md).  Raw keys of the
 * module table:
 *
 *   redis.parse_url(url)          -> {host=, port=, db=, password=} | nil, msg
 *   redis.connect(host, port, timeout_s)
 *                                 -> blocking connection | nil, msg, "io"
 *   redis.connect_async(host, port)
 *                                 -> connection on the host's loop | nil, msg
 *   redis.has_loop()              -> true in a host state (wpool run)
 *   redis.consumer_name()         -> "<hostname>-<pid>"
 *   redis.status(url, dclients, ddown), redis.count(url, decision),
 *   redis.metrics()               -> the process-wide registry behind the
 *                                    workerpool_redis_* metrics and /readyz
 *
 * Replies become Lua values: bulk and status strings are strings, integers
 * integers, a nil reply false, an array a list; an error reply is nil,
 * message, "reply" at the top, {error = message} inside a list or a
 * pipeline.  A broken connection gives nil, message, "io"; the Lua side
 * then opens a new one (with backoff).
 *
 * An async connection lives on the host's loop (hiredis' libuv adapter) and
 * is used from the loop thread only: c:send(cb, args...) queues a command
 * and cb(reply) (or cb(nil, message, kind)) runs later from the loop, in
 * the main state, under lua_pcall.  The C struct outlives the userdata
 * until hiredis lets go of it: every hiredis callback finds it through
 * ac->data, which a close sets to NULL first.  While replies are pending
 * the userdata is anchored in its table of callbacks and the socket's
 * handle keeps the loop alive; when none are, the handle is unref'd so an
 * idle connection never holds the loop open.
 *
 * A blocking connection (worker states, plain lua5.4) belongs to the state
 * that opened it.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <hiredis/adapters/libuv.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>

#include "lbind.h"
#include "wp_internal.h" /* WP__FORK_* */

#define SYNC_MT "workerpool.redis.conn"
#define ASYNC_MT "workerpool.redis.async"
#define BOX_MT "workerpool.redis.reply"
#define MAX_ARGS 4096

/* ---- replies --------------------------------------------------------- */

/* [-0, +1, m] Pushes r as a Lua value (an error reply as {error = msg}). */
static void push_reply(lua_State *L, const redisReply *r) {
  size_t i;
  luaL_checkstack(L, 4, "reply nested too deep");
  switch (r->type) {
  case REDIS_REPLY_STRING:
  case REDIS_REPLY_STATUS:
    lua_pushlstring(L, r->str, r->len);
    break;
  case REDIS_REPLY_INTEGER:
    lua_pushinteger(L, (lua_Integer)r->integer);
    break;
  case REDIS_REPLY_ARRAY:
    lua_createtable(L, (int)r->elements, 0);
    for (i = 0; i < r->elements; i++) {
      push_reply(L, r->element[i]);
      lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    break;
  case REDIS_REPLY_ERROR:
    lua_createtable(L, 0, 1);
    lua_pushlstring(L, r->str, r->len);
    lua_setfield(L, -2, "error");
    break;
  default: /* REDIS_REPLY_NIL */
    lua_pushboolean(L, 0);
  }
}

/* [-0, +1|3, m] A top-level reply: the value, or nil, message, "reply". */
static int push_top(lua_State *L, const redisReply *r) {
  if (r->type == REDIS_REPLY_ERROR) {
    lua_pushnil(L);
    lua_pushlstring(L, r->str, r->len);
    lua_pushliteral(L, "reply");
    return 3;
  }
  push_reply(L, r);
  return 1;
}

/* A reply owned while it is converted: freed by __gc if that raises. */
typedef struct reply_box {
  redisReply *r;
} reply_box;

static int box_gc(lua_State *L) {
  reply_box *b = luaL_checkudata(L, 1, BOX_MT);
  if (b->r) freeReplyObject(b->r);
  b->r = NULL;
  return 0;
}

/* [-0, +1, m] A box that will own a reply. */
static reply_box *new_box(lua_State *L) {
  reply_box *b = lua_newuserdatauv(L, sizeof *b, 0);
  b->r = NULL;
  luaL_setmetatable(L, BOX_MT);
  return b;
}

/* [-0, +0, v] The command at stack indices first..last (strings or
 * numbers) as argv/argvlen in a scratch userdata pushed on the stack.
 * Returns argc. */
static int command_args(lua_State *L, int first, int last, const char ***argv,
                        size_t **lens) {
  int n = last - first + 1, i;
  void *mem;
  if (n < 1) luaL_error(L, "a Redis command needs at least its name");
  if (n > MAX_ARGS)
    luaL_error(L, "a Redis command takes at most %d arguments", MAX_ARGS);
  mem = lua_newuserdatauv(L, (size_t)n * (sizeof(char *) + sizeof(size_t)), 0);
  *argv = mem;
  *lens = (size_t *)((char *)mem + (size_t)n * sizeof(char *));
  for (i = 0; i < n; i++) {
    int t = lua_type(L, first + i);
    if (t != LUA_TSTRING && t != LUA_TNUMBER)
      luaL_error(L,
                 "Redis command argument %d: string or number expected, "
                 "got %s",
                 i + 1, lua_typename(L, t));
    (*argv)[i] = lua_tolstring(L, first + i, &(*lens)[i]);
  }
  return n;
}

/* ---- URLs ------------------------------------------------------------ */

/* redis.parse_url(url) -> {host, port, db, password} | nil, message
 * [-0, +1|2, m]  Accepts redis://[[user]:password@]host[:port][/db]. */
static int parse_url(lua_State *L) {
  size_t len;
  const char *u = luaL_checklstring(L, 1, &len), *p, *at, *hend, *slash;
  char host[256];
  long port = 6379, db = 0;
  if (strncmp(u, "redis://", 8) != 0) goto bad;
  p = u + 8;
  slash = strchr(p, '/');
  at = memchr(p, '@', (size_t)((slash ? slash : u + len) - p));
  lua_createtable(L, 0, 4);
  if (at) {
    const char *colon = memchr(p, ':', (size_t)(at - p));
    if (colon == NULL) goto bad;
    lua_pushlstring(L, colon + 1, (size_t)(at - colon - 1));
    lua_setfield(L, -2, "password");
    p = at + 1;
  }
  hend = slash ? slash : u + len;
  {
    const char *colon = memchr(p, ':', (size_t)(hend - p));
    const char *h_end = colon ? colon : hend;
    size_t hl = (size_t)(h_end - p), i;
    if (hl == 0 || hl >= sizeof host) goto bad;
    for (i = 0; i < hl; i++) {
      char ch = p[i];
      if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
            (ch >= '0' && ch <= '9') || ch == '.' || ch == '-' || ch == '_'))
        goto bad;
    }
    memcpy(host, p, hl);
    host[hl] = '\0';
    if (colon) {
      char *end;
      if (colon + 1 == hend) goto bad;
      port = strtol(colon + 1, &end, 10);
      if (end != hend || port < 1 || port > 65535 || colon[1] == '-' ||
          colon[1] == '+')
        goto bad;
    }
  }
  if (slash && slash[1] != '\0') {
    char *end;
    if (slash[1] < '0' || slash[1] > '9') goto bad;
    db = strtol(slash + 1, &end, 10);
    if (*end != '\0' || db < 0 || db > 1000000) goto bad;
  }
  lua_pushstring(L, host);
  lua_setfield(L, -2, "host");
  lua_pushinteger(L, port);
  lua_setfield(L, -2, "port");
  lua_pushinteger(L, db);
  lua_setfield(L, -2, "db");
  return 1;
bad:
  lua_pushnil(L);
  lua_pushfstring(L,
                  "bad Redis URL \"%s\" (redis://[:password@]host[:port][/db] "
                  "expected)",
                  u);
  return 2;
}

/* ---- blocking connections ------------------------------------------- */

typedef struct sconn {
  redisContext *c; /* NULL once closed */
  int dirty;       /* a pipeline was cut short: replies are out of step */
} sconn;

/* The connection at 1; one a raised error left with commands whose replies
 * were never read is closed (the next call reports it, the client opens a
 * new one). */
static sconn *check_sconn(lua_State *L) {
  sconn *s = luaL_checkudata(L, 1, SYNC_MT);
  if (s->dirty && s->c) {
    redisFree(s->c);
    s->c = NULL;
  }
  s->dirty = 0;
  return s;
}

/* redis.connect(host, port, timeout) -> conn | nil, message, "io"
 * [-0, +1|3, m]  Blocks for at most timeout seconds, and so does each
 * command.  Callable from any thread; the connection belongs to L. */
static int sconnect(lua_State *L) {
  const char *host = luaL_checkstring(L, 1);
  int port = (int)luaL_checkinteger(L, 2);
  double t = luaL_checknumber(L, 3);
  struct timeval tv;
  sconn *s = lua_newuserdatauv(L, sizeof *s, 0);
  s->c = NULL;
  s->dirty = 0;
  luaL_setmetatable(L, SYNC_MT);
  if (!(t > 0)) t = 1;
  tv.tv_sec = (time_t)t;
  tv.tv_usec = (suseconds_t)((t - (double)tv.tv_sec) * 1e6);
  s->c = redisConnectWithTimeout(host, port, tv);
  if (s->c == NULL || s->c->err) {
    lua_pushnil(L);
    lua_pushstring(L, s->c ? s->c->errstr : "cannot allocate a connection");
    lua_pushliteral(L, "io");
    if (s->c) redisFree(s->c);
    s->c = NULL;
    return 3;
  }
  redisSetTimeout(s->c, tv);
  redisEnableKeepAlive(s->c);
  return 1;
}

/* [-0, +3, m] nil, the connection's error, "io"; closes it. */
static int sconn_ioerr(lua_State *L, sconn *s) {
  lua_pushnil(L);
  lua_pushstring(L, s->c && s->c->errstr[0] ? s->c->errstr : "disconnected");
  lua_pushliteral(L, "io");
  if (s->c) redisFree(s->c);
  s->c = NULL;
  return 3;
}

/* c:call(arg...) -> reply | nil, message, "reply" | nil, message, "io"
 * [-0, +1|3, e]  Blocks the calling thread. */
static int scall(lua_State *L) {
  sconn *s = check_sconn(L);
  const char **argv;
  size_t *lens;
  int top = lua_gettop(L), argc;
  reply_box *b;
  argc = command_args(L, 2, top, &argv, &lens);
  b = new_box(L);
  if (s->c == NULL) return sconn_ioerr(L, s);
  b->r = redisCommandArgv(s->c, argc, argv, lens);
  if (b->r == NULL) return sconn_ioerr(L, s);
  argc = push_top(L, b->r);
  freeReplyObject(b->r);
  b->r = NULL;
  return argc;
}

/* c:pipeline({cmd...}) -> {reply...} | nil, message, "io"
 * [-0, +1|3, e]  Sends every command (each a list of arguments), then
 * reads every reply; error replies are {error = message}. */
static int spipeline(lua_State *L) {
  sconn *s = check_sconn(L);
  lua_Integer n, i;
  reply_box *b;
  luaL_checktype(L, 2, LUA_TTABLE);
  n = (lua_Integer)lua_rawlen(L, 2);
  if (s->c == NULL) return sconn_ioerr(L, s);
  s->dirty = 1; /* until every reply was read */
  for (i = 1; i <= n; i++) {
    const char **argv;
    size_t *lens;
    int top, argc;
    lua_rawgeti(L, 2, i);
    luaL_checktype(L, -1, LUA_TTABLE);
    top = lua_gettop(L);
    argc = (int)lua_rawlen(L, top);
    luaL_checkstack(L, argc + 2, "too many arguments");
    for (int k = 1; k <= argc; k++)
      lua_rawgeti(L, top, k);
    argc = command_args(L, top + 1, top + argc, &argv, &lens);
    if (redisAppendCommandArgv(s->c, argc, argv, lens) != REDIS_OK)
      return sconn_ioerr(L, s);
    lua_settop(L, 2);
  }
  lua_createtable(L, (int)n, 0);
  b = new_box(L);
  for (i = 1; i <= n; i++) {
    void *r = NULL;
    if (redisGetReply(s->c, &r) != REDIS_OK || r == NULL)
      return sconn_ioerr(L, s);
    b->r = r;
    push_reply(L, b->r);
    lua_rawseti(L, -3, i);
    freeReplyObject(b->r);
    b->r = NULL;
  }
  s->dirty = 0;
  lua_pop(L, 1);
  return 1;
}

/* c:close() and __gc   [-0, +0, -] */
static int sclose(lua_State *L) {
  sconn *s = check_sconn(L);
  if (s->c) redisFree(s->c);
  s->c = NULL;
  return 0;
}

/* ---- async connections ----------------------------------------------- */

typedef struct aconn {
  redisAsyncContext *ac; /* NULL once hiredis let go of it or we closed */
  lua_State *L;          /* the main state */
  int pend_ref;          /* registry: {[id] = callback, [0] = userdata} */
  int next_id, npending;
  char err[160];
} aconn;

/* hiredis' libuv adapter ignores a poll callback with an error status; but
 * libuv reports POLLERR (a write to a socket the server reset) that way and
 * stops the handle, so hiredis would never learn that the connection died
 * and its callbacks would never run.  The adapter's handle and cleanup are
 * kept; its four event hooks are replaced by these, whose callback lets
 * hiredis read (and so fail) on an error status. */
static void poll_cb(uv_poll_t *handle, int status, int events) {
  redisLibuvEvents *p = handle->data;
  if (status == 0) {
    redisLibuvPoll(handle, status, events);
    return;
  }
  if (p->context == NULL) return;
  redisAsyncHandleRead(p->context);    /* fails, and disconnects */
  if (p->context != NULL && p->events) /* it did not: watch again */
    uv_poll_start(&p->handle, p->events, poll_cb);
}

static void ev_update(redisLibuvEvents *p) {
  if (p->events)
    uv_poll_start(&p->handle, p->events, poll_cb);
  else
    uv_poll_stop(&p->handle);
}

static void ev_add_read(void *privdata) {
  redisLibuvEvents *p = privdata;
  p->events |= UV_READABLE;
  ev_update(p);
}

static void ev_del_read(void *privdata) {
  redisLibuvEvents *p = privdata;
  p->events &= ~UV_READABLE;
  ev_update(p);
}

static void ev_add_write(void *privdata) {
  redisLibuvEvents *p = privdata;
  p->events |= UV_WRITABLE;
  ev_update(p);
}

static void ev_del_write(void *privdata) {
  redisLibuvEvents *p = privdata;
  p->events &= ~UV_WRITABLE;
  ev_update(p);
}

static uv_handle_t *poll_handle(redisAsyncContext *ac) {
  return (uv_handle_t *)&((redisLibuvEvents *)ac->ev.data)->handle;
}

static void note_err(aconn *c, const redisAsyncContext *ac, const char *dflt) {
  const char *e = ac && ac->errstr && ac->errstr[0] ? ac->errstr : dflt;
  snprintf(c->err, sizeof c->err, "%s", e);
}

static int deliver_pmain(lua_State *L) {
  aconn *c = lua_touserdata(L, 1);
  lua_Integer id = lua_tointeger(L, 2);
  redisReply *r = lua_touserdata(L, 3);
  int nargs;
  lua_rawgeti(L, LUA_REGISTRYINDEX, c->pend_ref);
  lua_rawgeti(L, -1, id);
  lua_pushnil(L);
  lua_rawseti(L, -3, id);
  if (--c->npending == 0) {
    lua_pushnil(L);
    lua_rawseti(L, -3, 0); /* no longer anchored */
    if (c->ac) uv_unref(poll_handle(c->ac));
  }
  if (!lua_isfunction(L, -1)) return 0;
  if (r) {
    nargs = push_top(L, r);
  } else {
    lua_pushnil(L);
    lua_pushstring(L, c->err[0] ? c->err : "disconnected");
    lua_pushliteral(L, "io");
    nargs = 3;
  }
  lua_call(L, nargs, 0); /* c may be gone after this */
  return 0;
}

static void on_reply(redisAsyncContext *ac, void *r, void *priv) {
  aconn *c = ac->data;
  lua_State *L;
  int top;
  if (c == NULL || c->L == NULL) return;
  if (r == NULL) { /* only while hiredis frees the context */
    if (!c->err[0]) note_err(c, ac, "disconnected");
    c->ac = NULL;
  }
  L = c->L;
  top = lua_gettop(L);
  lua_pushcfunction(L, deliver_pmain);
  lua_pushlightuserdata(L, c);
  lua_pushinteger(L, (lua_Integer)(intptr_t)priv);
  lua_pushlightuserdata(L, r);
  if (lua_pcall(L, 3, 0, 0) != LUA_OK)
    wpl_log(WPL_ERROR, "redis.error",
            json_pack("{s:o}", "error", wpl_json_str(lua_tostring(L, -1))));
  lua_settop(L, top);
}

static void on_connect(const redisAsyncContext *ac, int status) {
  aconn *c = ac->data;
  if (c == NULL || status == REDIS_OK) return;
  note_err(c, ac, "cannot connect");
  c->ac = NULL; /* hiredis frees it after this */
}

static void on_disconnect(const redisAsyncContext *ac, int status) {
  aconn *c = ac->data;
  (void)status;
  if (c == NULL) return;
  if (!c->err[0]) note_err(c, ac, "disconnected");
  c->ac = NULL;
}

static aconn *check_aconn(lua_State *L) {
  aconn **box = luaL_checkudata(L, 1, ASYNC_MT);
  if (*box == NULL) luaL_error(L, "redis connection already collected");
  return *box;
}

/* Lets go of c's context: no hiredis callback reaches c afterwards. */
static void aconn_detach(aconn *c) {
  redisAsyncContext *ac = c->ac;
  c->ac = NULL;
  if (ac) {
    ac->data = NULL;
    redisAsyncFree(ac); /* deferred by hiredis inside its callbacks */
  }
}

/* redis.connect_async(host, port) -> conn | nil, message, "io"
 * [-0, +1|3, m]  Loop thread of a host state only (raises elsewhere).
 * The connection completes in the background; commands sent meanwhile
 * wait for it. */
static int aconnect(lua_State *L) {
  const char *host = luaL_checkstring(L, 1);
  int port = (int)luaL_checkinteger(L, 2);
  uv_loop_t *loop = wpl_host_loop(L);
  aconn **box, *c;
  redisAsyncContext *ac;
  int ref;
  if (loop == NULL)
    return luaL_error(L, "redis.connect_async needs a host loop (wpool run)");
  box = lua_newuserdatauv(L, sizeof *box, 0);
  *box = NULL;
  luaL_setmetatable(L, ASYNC_MT);
  lua_newtable(L);
  ref = luaL_ref(L, LUA_REGISTRYINDEX);
  if ((c = calloc(1, sizeof *c)) == NULL) {
    luaL_unref(L, LUA_REGISTRYINDEX, ref);
    return luaL_error(L, "not enough memory");
  }
  c->pend_ref = ref;
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  c->L = lua_tothread(L, -1);
  lua_pop(L, 1);
  *box = c; /* from here __gc frees c */
  ac = redisAsyncConnect(host, port);
  if (ac == NULL || ac->err) {
    lua_pushnil(L);
    lua_pushstring(L, ac ? ac->errstr : "cannot allocate a connection");
    lua_pushliteral(L, "io");
    if (ac) redisAsyncFree(ac);
    return 3;
  }
  if (redisLibuvAttach(ac, loop) != REDIS_OK) {
    redisAsyncFree(ac);
    lua_pushnil(L);
    lua_pushliteral(L, "cannot watch the connection on the loop");
    lua_pushliteral(L, "io");
    return 3;
  }
  ac->ev.addRead = ev_add_read;
  ac->ev.delRead = ev_del_read;
  ac->ev.addWrite = ev_add_write;
  ac->ev.delWrite = ev_del_write;
  ac->data = c;
  c->ac = ac;
  redisAsyncSetConnectCallback(ac, on_connect);
  redisAsyncSetDisconnectCallback(ac, on_disconnect);
  uv_unref(poll_handle(ac));
  return 1;
}

/* c:send(cb, arg...) -> true | nil, message, "io"
 * [-0, +1|3, e]  Queues the command; cb(reply) or cb(nil, message, kind)
 * runs later from the loop (never before send returns). */
static int asend(lua_State *L) {
  aconn *c = check_aconn(L);
  const char **argv;
  size_t *lens;
  int top = lua_gettop(L), argc, id;
  luaL_checktype(L, 2, LUA_TFUNCTION);
  argc = command_args(L, 3, top, &argv, &lens);
  if (c->ac == NULL) {
    lua_pushnil(L);
    lua_pushstring(L, c->err[0] ? c->err : "disconnected");
    lua_pushliteral(L, "io");
    return 3;
  }
  id = ++c->next_id;
  if (c->next_id >= INT32_MAX) c->next_id = 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, c->pend_ref);
  lua_pushvalue(L, 2);
  lua_rawseti(L, -2, id);
  if (c->npending == 0) {
    lua_pushvalue(L, 1);
    lua_rawseti(L, -2, 0);
  }
  if (redisAsyncCommandArgv(c->ac, on_reply, (void *)(intptr_t)id, argc, argv,
                            lens) != REDIS_OK) {
    lua_pushnil(L);
    lua_rawseti(L, -2, id);
    if (c->npending == 0) {
      lua_pushnil(L);
      lua_rawseti(L, -2, 0);
    }
    lua_pushnil(L);
    lua_pushstring(L, c->err[0] ? c->err : "disconnected");
    lua_pushliteral(L, "io");
    return 3;
  }
  if (c->npending++ == 0) uv_ref(poll_handle(c->ac));
  lua_pushboolean(L, 1);
  return 1;
}

/* c:connected() -> boolean   [-0, +1, -] */
static int aconnected(lua_State *L) {
  aconn *c = check_aconn(L);
  lua_pushboolean(L, c->ac != NULL);
  return 1;
}

/* c:close()   [-0, +0, -]  Callbacks still pending never run. */
static int aclose(lua_State *L) {
  aconn **box = luaL_checkudata(L, 1, ASYNC_MT), *c = *box;
  if (c == NULL) return 0; /* collected already (a finalizer's order) */
  aconn_detach(c);
  lua_rawgeti(L, LUA_REGISTRYINDEX, c->pend_ref);
  lua_pushnil(L);
  lua_rawseti(L, -2, 0);
  c->npending = 0;
  return 0;
}

/* __gc   [-0, +0, -] */
static int agc(lua_State *L) {
  aconn **box = luaL_checkudata(L, 1, ASYNC_MT);
  aconn *c = *box;
  if (c == NULL) return 0;
  *box = NULL;
  c->L = NULL;
  aconn_detach(c);
  luaL_unref(L, LUA_REGISTRYINDEX, c->pend_ref);
  free(c);
  return 0;
}

/* redis.has_loop() -> boolean   [-0, +1, -] */
static int has_loop(lua_State *L) {
  lua_pushboolean(L, wpl_host_loop(L) != NULL);
  return 1;
}

/* redis.consumer_name() -> "<hostname>-<pid>"   [-0, +1, m] */
static int consumer_name(lua_State *L) {
  char host[256];
  if (gethostname(host, sizeof host) != 0) strcpy(host, "localhost");
  host[sizeof host - 1] = '\0';
  lua_pushfstring(L, "%s-%d", host, (int)getpid());
  return 1;
}

/* ---- the process-wide registry (metrics, /readyz) -------------------- */

typedef struct url_entry {
  struct url_entry *next;
  char *url;
  long clients, down;
  uint64_t reject, allow; /* bucket decisions taken without Redis */
} url_entry;

static uv_once_t reg_once = UV_ONCE_INIT;
static uv_mutex_t reg_mu; /* a leaf lock; no Lua call while held */
static url_entry *reg_head;

static void reg_init(void) {
  if (uv_mutex_init(&reg_mu)) abort();
}

void wpl_redis_atfork(int phase) {
  wp__atfork_lock(phase, &reg_once, reg_init, &reg_mu);
}

/* Under reg_mu: the entry of url, made if absent (NULL without memory). */
static url_entry *reg_get(const char *url) {
  url_entry *e;
  for (e = reg_head; e; e = e->next)
    if (strcmp(e->url, url) == 0) return e;
  if ((e = calloc(1, sizeof *e)) == NULL) return NULL;
  if ((e->url = strdup(url)) == NULL) {
    free(e);
    return NULL;
  }
  e->next = reg_head;
  reg_head = e;
  return e;
}

/* redis.status(url, dclients, ddown)   [-0, +0, v] */
static int reg_status(lua_State *L) {
  const char *url = luaL_checkstring(L, 1);
  lua_Integer dc = luaL_checkinteger(L, 2), dd = luaL_checkinteger(L, 3);
  url_entry *e;
  uv_once(&reg_once, reg_init);
  uv_mutex_lock(&reg_mu);
  if ((e = reg_get(url)) != NULL) {
    e->clients += (long)dc;
    e->down += (long)dd;
    if (e->down < 0) e->down = 0;
  }
  uv_mutex_unlock(&reg_mu);
  return 0;
}

/* redis.count(url, "reject"|"allow")   [-0, +0, v] */
static int reg_count(lua_State *L) {
  const char *url = luaL_checkstring(L, 1);
  int allow = strcmp(luaL_checkstring(L, 2), "allow") == 0;
  url_entry *e;
  uv_once(&reg_once, reg_init);
  uv_mutex_lock(&reg_mu);
  if ((e = reg_get(url)) != NULL) {
    if (allow)
      e->allow++;
    else
      e->reject++;
  }
  uv_mutex_unlock(&reg_mu);
  return 0;
}

int wpl_redis_down(void) {
  url_entry *e;
  int down = 0;
  uv_once(&reg_once, reg_init);
  uv_mutex_lock(&reg_mu);
  for (e = reg_head; e; e = e->next)
    if (e->down > 0) down = 1;
  uv_mutex_unlock(&reg_mu);
  return down;
}

/* Appends a label value, escaped, to the buffer. */
static void add_label(luaL_Buffer *b, const char *s) {
  for (; *s; s++) {
    if (*s == '\\' || *s == '"') luaL_addchar(b, '\\');
    if (*s == '\n') {
      luaL_addstring(b, "\\n");
      continue;
    }
    luaL_addchar(b, *s);
  }
}

/* redis.metrics() -> Prometheus text ("" before any client)
 * [-0, +1, m]  Copies the registry under the lock, formats outside it. */
static int reg_metrics(lua_State *L) {
  url_entry *e;
  size_t n = 0, i;
  luaL_Buffer b;
  char num[64];
  lua_newtable(L);
  uv_once(&reg_once, reg_init);
  for (;;) { /* count, allocate outside the lock, then copy */
    size_t have;
    url_entry *copy;
    uv_mutex_lock(&reg_mu);
    for (have = 0, e = reg_head; e; e = e->next)
      have++;
    uv_mutex_unlock(&reg_mu);
    copy = lua_newuserdatauv(L, (have ? have : 1) * sizeof *copy, 0);
    uv_mutex_lock(&reg_mu);
    for (n = 0, e = reg_head; e && n < have; e = e->next)
      copy[n++] = *e;
    i = e == NULL;
    uv_mutex_unlock(&reg_mu);
    if (i) break; /* the list did not grow meanwhile */
    lua_pop(L, 1);
  }
  {
    url_entry *copy = lua_touserdata(L, -1);
    /* url strings are never freed: entries live as long as the process */
    luaL_buffinit(L, &b);
    if (n > 0) {
      luaL_addstring(&b, "# HELP workerpool_redis_connected 1 while every "
                         "Redis client of the process for this URL is "
                         "connected.\n# TYPE workerpool_redis_connected "
                         "gauge\n");
      for (i = 0; i < n; i++) {
        luaL_addstring(&b, "workerpool_redis_connected{url=\"");
        add_label(&b, copy[i].url);
        luaL_addstring(&b, copy[i].down > 0 ? "\"} 0\n" : "\"} 1\n");
      }
      luaL_addstring(&b, "# HELP workerpool_redis_bucket_unavailable_total "
                         "Token-bucket decisions taken without Redis "
                         "(on_unavailable).\n# TYPE "
                         "workerpool_redis_bucket_unavailable_total "
                         "counter\n");
      for (i = 0; i < n; i++) {
        const char *d[2] = {"reject", "allow"};
        uint64_t v[2] = {copy[i].reject, copy[i].allow};
        for (int k = 0; k < 2; k++) {
          luaL_addstring(&b,
                         "workerpool_redis_bucket_unavailable_total{url=\"");
          add_label(&b, copy[i].url);
          snprintf(num, sizeof num, "\",decision=\"%s\"} %" PRIu64 "\n", d[k],
                   v[k]);
          luaL_addstring(&b, num);
        }
      }
    }
    luaL_pushresult(&b);
  }
  return 1;
}

/* ---- registration ----------------------------------------------------- */

static const luaL_Reg sync_methods[] = {
    {"call", scall}, {"pipeline", spipeline}, {"close", sclose}, {NULL, NULL}};
static const luaL_Reg async_methods[] = {{"send", asend},
                                         {"connected", aconnected},
                                         {"close", aclose},
                                         {NULL, NULL}};

/* [-0, +0, m] Sets the redis.* functions in the module table at the top. */
void wpl_redis_open(lua_State *L) {
  static const luaL_Reg funcs[] = {{"redis.parse_url", parse_url},
                                   {"redis.connect", sconnect},
                                   {"redis.connect_async", aconnect},
                                   {"redis.has_loop", has_loop},
                                   {"redis.status", reg_status},
                                   {"redis.count", reg_count},
                                   {"redis.metrics", reg_metrics},
                                   {"redis.consumer_name", consumer_name},
                                   {NULL, NULL}};
  const luaL_Reg *f;
  if (luaL_newmetatable(L, SYNC_MT)) {
    luaL_newlib(L, sync_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, sclose);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, ASYNC_MT)) {
    luaL_newlib(L, async_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, agc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, BOX_MT)) {
    lua_pushcfunction(L, box_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  for (f = funcs; f->name; f++) {
    lua_pushcfunction(L, f->func);
    lua_setfield(L, -2, f->name);
  }
}
