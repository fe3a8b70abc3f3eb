/*
 * log.c: structured logs, one JSON object per line.
 *
 * Every line has "ts" (UTC, ISO 8601 with milliseconds), "level" and
 * "event", then the event's own fields.  Lines go to stderr unless a file
 * was set, are written whole under one mutex, and may come from any
 * thread.  A line that cannot be built (out of memory) is dropped: logging
 * never fails its caller.  Text goes in as valid UTF-8, with '?' for each
 * byte that is not part of a valid sequence.  docs/logging.md lists the
 * events.
 */
#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include <uv.h>

#include "lbind.h"
#include "wp_internal.h" /* WP__FORK_* */
#include "wpool_host.h"

_Static_assert((int)WPL_DEBUG == (int)WPOOL_LOG_DEBUG &&
                   (int)WPL_INFO == (int)WPOOL_LOG_INFO &&
                   (int)WPL_WARN == (int)WPOOL_LOG_WARN &&
                   (int)WPL_ERROR == (int)WPOOL_LOG_ERROR &&
                   (int)WPL_OFF == (int)WPOOL_LOG_OFF,
               "the public log levels are the internal ones");

static const char *const level_names[] = {"debug", "info", "warn",
                                          "error", "off",  NULL};

static struct {
  uv_once_t once;
  uv_mutex_t mu;
  FILE *sink; /* NULL: stderr */
  int level;  /* lines below it are skipped */
} logger = {.once = UV_ONCE_INIT, .level = WPL_OFF}; /* wpool: info */

static void log_init(void) {
  if (uv_mutex_init(&logger.mu)) abort();
}

void wpl_log_atfork(int phase) {
  wp__atfork_lock(phase, &logger.once, log_init, &logger.mu);
}

int wpl_log_level_parse(const char *name) {
  int i;
  for (i = 0; level_names[i]; i++)
    if (strcmp(name, level_names[i]) == 0) return i;
  return -1;
}

void wpl_log_set_level(int level) {
  uv_once(&logger.once, log_init);
  uv_mutex_lock(&logger.mu);
  logger.level = level;
  uv_mutex_unlock(&logger.mu);
}

int wpl_log_enabled(int level) {
  int on;
  uv_once(&logger.once, log_init);
  uv_mutex_lock(&logger.mu);
  on = level >= logger.level;
  uv_mutex_unlock(&logger.mu);
  return on;
}

int wpl_log_set_file(const char *path) {
  FILE *fp = NULL;
  uv_once(&logger.once, log_init);
  if (path && (fp = fopen(path, "a")) == NULL) return errno;
  uv_mutex_lock(&logger.mu);
  if (logger.sink) fclose(logger.sink);
  logger.sink = fp;
  uv_mutex_unlock(&logger.mu);
  return 0;
}

void wpl_log(int level, const char *event, json_t *fields) {
  json_t *line;
  char ts[40], *text;
  struct timeval tv;
  struct tm tm;
  if (!wpl_log_enabled(level)) {
    json_decref(fields);
    return;
  }
  gettimeofday(&tv, NULL);
  gmtime_r(&tv.tv_sec, &tm);
  strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
  snprintf(ts + strlen(ts), sizeof ts - strlen(ts), ".%03dZ",
           (int)(tv.tv_usec / 1000));
  line = json_pack("{s:s, s:s, s:s}", "ts", ts, "level", level_names[level],
                   "event", event);
  if (line && fields) json_object_update_missing(line, fields);
  json_decref(fields);
  if (line == NULL) return;
  text = json_dumps(line, JSON_COMPACT | JSON_ENSURE_ASCII);
  json_decref(line);
  if (text == NULL) return;
  uv_mutex_lock(&logger.mu);
  fprintf(logger.sink ? logger.sink : stderr, "%s\n", text);
  fflush(logger.sink ? logger.sink : stderr);
  uv_mutex_unlock(&logger.mu);
  free(text);
}

/* ---- the public settings (wpool_host.h) ------------------------------ */

/* Whether the embedder chose the event sink (wpool_host_set_event_sink):
 * luaopen_workerpool then leaves it alone. */
static atomic_int sink_chosen;
static uv_once_t default_sink_once = UV_ONCE_INIT;

int wpool_host_set_log_level(int level) {
  if (level < WPL_DEBUG || level > WPL_OFF) return WP_EINVAL;
  wpl_log_set_level(level);
  return 0;
}

int wpool_host_log_level(const char *name) {
  int level = name ? wpl_log_level_parse(name) : -1;
  return level < 0 ? WP_EINVAL : level;
}

int wpool_host_set_log_file(const char *path) {
  int err = wpl_log_set_file(path);
  if (err == 0) return 0;
  errno = err;
  return err == ENOMEM ? WP_ENOMEM : WP_ESYS;
}

void wpool_host_set_event_sink(wp_event_fn fn) {
  atomic_store(&sink_chosen, 1);
  wp_set_event_handler(fn);
}

void wpool_host_log_event(const wp_event *ev) {
  wpl_log_event(ev);
}

static void install_default_sink(void) {
  if (!atomic_load(&sink_chosen)) wp_set_event_handler(wpl_log_event);
}

void wpl_log_default_sink(void) {
  uv_once(&default_sink_once, install_default_sink);
}

/* ---- core events ----------------------------------------------------- */

void wpl_log_event(const wp_event *ev) {
  static const struct {
    const char *name;
    int level;
  } kinds[] = {
      [WP_EV_POOL_CREATED] = {"pool.created", WPL_INFO},
      [WP_EV_POOL_RESIZED] = {"pool.resized", WPL_INFO},
      [WP_EV_POOL_DRAINING] = {"pool.draining", WPL_INFO},
      [WP_EV_POOL_DRAINED] = {"pool.drained", WPL_INFO},
      [WP_EV_POOL_STOPPED] = {"pool.stopped", WPL_INFO},
      [WP_EV_TASK_ERROR] = {"task.error", WPL_ERROR},
      [WP_EV_TASK_SLOW] = {"task.slow", WPL_WARN},
      [WP_EV_TASK_TIMEOUT] = {"task.timeout", WPL_WARN},
      [WP_EV_WORKER_STUCK] = {"worker.stuck", WPL_ERROR},
      [WP_EV_MEMORY_LIMIT] = {"worker.memory_limit", WPL_WARN},
      [WP_EV_DROPPED] = {"tasks.dropped", WPL_WARN},
  };
  json_t *f;
  char msg[160];
  if ((unsigned)ev->type >= sizeof kinds / sizeof *kinds ||
      !wpl_log_enabled(kinds[ev->type].level))
    return;
  if ((f = json_object()) == NULL) return;
  json_object_set_new(f, "pool", wpl_json_str(ev->pool));
  if (ev->task) json_object_set_new(f, "task", wpl_json_str(ev->task));
  if (ev->tenant) json_object_set_new(f, "tenant", wpl_json_str(ev->tenant));
  if (ev->worker) json_object_set_new(f, "worker", json_integer(ev->worker));
  switch (ev->type) {
  case WP_EV_POOL_CREATED:
    json_object_set_new(f, "max_workers", json_integer(ev->n));
    break;
  case WP_EV_POOL_RESIZED:
    json_object_set_new(f, "max_workers", json_integer(ev->n));
    json_object_set_new(f, "was", json_integer(ev->n2));
    break;
  case WP_EV_POOL_DRAINING:
    json_object_set_new(f, "queued", json_integer(ev->n));
    json_object_set_new(f, "running", json_integer(ev->n2));
    break;
  case WP_EV_POOL_STOPPED:
    json_object_set_new(f, "dropped", json_integer(ev->n));
    break;
  case WP_EV_TASK_ERROR:
    json_object_set_new(f, "error", wpl_json_str(ev->message));
    break;
  case WP_EV_TASK_SLOW:
    json_object_set_new(f, "running_s", json_real(ev->seconds));
    break;
  case WP_EV_TASK_TIMEOUT:
    json_object_set_new(f, "timeout_s", json_real(ev->seconds));
    break;
  case WP_EV_WORKER_STUCK:
    json_object_set_new(f, "past_deadline_s", json_real(ev->seconds));
    break;
  case WP_EV_MEMORY_LIMIT:
    json_object_set_new(f, "limit_bytes", json_integer(ev->n));
    break;
  case WP_EV_DROPPED:
    snprintf(msg, sizeof msg, "dropped %lld tasks in the last %g s, reason=%s",
             (long long)ev->n, ev->seconds, ev->reason ? ev->reason : "?");
    /* the tenant is its own field, not in msg: it may be any text */
    json_object_set_new(f, "msg", wpl_json_str(msg));
    json_object_set_new(f, "dropped", json_integer(ev->n));
    json_object_set_new(f, "reason", wpl_json_str(ev->reason));
    json_object_set_new(f, "interval_s", json_real(ev->seconds));
    break;
  default:
    break;
  }
  wpl_log(kinds[ev->type].level, kinds[ev->type].name, f);
}

/* ---- text for JSON ---------------------------------------------------- */

size_t wpl_utf8_len(const char *s, size_t n) {
  const unsigned char *u = (const unsigned char *)s;
  unsigned char lo = 0x80, hi = 0xBF;
  size_t need, i;
  if (u[0] < 0x80) return 1;
  if (u[0] < 0xC2) return 0; /* a continuation byte, or overlong */
  if (u[0] < 0xE0) {
    need = 2;
  } else if (u[0] < 0xF0) {
    need = 3;
    if (u[0] == 0xE0) lo = 0xA0; /* overlong */
    if (u[0] == 0xED) hi = 0x9F; /* surrogates */
  } else if (u[0] < 0xF5) {
    need = 4;
    if (u[0] == 0xF0) lo = 0x90; /* overlong */
    if (u[0] == 0xF4) hi = 0x8F; /* past U+10FFFF */
  } else {
    return 0;
  }
  if (n < need || u[1] < lo || u[1] > hi) return 0;
  for (i = 2; i < need; i++)
    if (u[i] < 0x80 || u[i] > 0xBF) return 0;
  return need;
}

int wpl_utf8_valid(const char *s, size_t n) {
  size_t k;
  for (; n > 0; s += k, n -= k)
    if ((k = wpl_utf8_len(s, n)) == 0) return 0;
  return 1;
}

/* Copies at most max bytes of s (len bytes) to dst, which has room for
 * that many, replacing each byte that is not part of a valid UTF-8
 * sequence with '?', and NUL too when nul.  Never splits a sequence.
 * Returns the bytes written; *cut tells whether s did not fit. */
static size_t clean_text(char *dst, const char *s, size_t len, size_t max,
                         int nul, int *cut) {
  size_t i = 0, k;
  while (i < len) {
    k = wpl_utf8_len(s + i, len - i);
    if (i + (k ? k : 1) > max) break;
    if (k == 0 || (nul && s[i] == '\0')) {
      dst[i] = '?';
      k = 1;
    } else {
      memcpy(dst + i, s + i, k);
    }
    i += k;
  }
  *cut = i < len;
  return i;
}

/* Whether s (len bytes) goes into JSON as it is. */
static int is_clean(const char *s, size_t len, size_t max, int nul) {
  return len <= max && wpl_utf8_valid(s, len) && (!nul || !memchr(s, 0, len));
}

json_t *wpl_json_text(const char *s, size_t len) {
  char *copy;
  json_t *j;
  int cut;
  if (is_clean(s, len, len, 0)) return json_stringn_nocheck(s, len);
  if ((copy = malloc(len)) == NULL) return NULL;
  j = json_stringn_nocheck(copy, clean_text(copy, s, len, len, 0, &cut));
  free(copy);
  return j;
}

json_t *wpl_json_str(const char *s) {
  return wpl_json_text(s ? s : "?", s ? strlen(s) : 1);
}

/* ---- from Lua -------------------------------------------------------- */

/* Bounds on what one workerpool.log call turns into JSON. */
#define LOG_MAX_DEPTH 8      /* levels of nested tables; deeper: tostring */
#define LOG_MAX_ENTRIES 1000 /* table entries per line; the rest left out */
#define LOG_MAX_STRING 8192  /* bytes per string; longer ones are cut */

typedef struct conv {
  json_t *root;  /* the line's fields; everything built hangs from it */
  int entries;   /* table entries converted so far */
  int truncated; /* entries were left out */
} conv;

/* [-0, +1, m] Pushes the string at absolute index idx as clean JSON text
 * (see clean_text; nul: NUL becomes '?' too, for keys), cut to
 * LOG_MAX_STRING bytes plus "..." when longer.  Returns it. */
static const char *push_clean(lua_State *L, int idx, int nul) {
  size_t len, n;
  const char *s = lua_tolstring(L, idx, &len);
  luaL_Buffer b;
  char *p;
  int cut;
  if (is_clean(s, len, LOG_MAX_STRING, nul)) {
    lua_pushvalue(L, idx);
    return s;
  }
  p = luaL_buffinitsize(L, &b,
                        (len < LOG_MAX_STRING ? len : LOG_MAX_STRING) + 3);
  n = clean_text(p, s, len, LOG_MAX_STRING, nul, &cut);
  if (cut) {
    memcpy(p + n, "...", 3);
    n += 3;
  }
  luaL_pushresultsize(&b, n);
  return lua_tostring(L, -1);
}

/* [-1, +1, e] tostring of argument 1. */
static int tostring_p(lua_State *L) {
  luaL_tolstring(L, 1, NULL);
  return 1;
}

/* [-0, +1, m] Pushes tostring of the value at idx.  A metamethod runs
 * protected; when it fails, the value is "(<__name or type>: tostring
 * failed)". */
static void push_tostring(lua_State *L, int idx) {
  int t;
  idx = lua_absindex(L, idx);
  if (!lua_getmetatable(L, idx)) {
    luaL_tolstring(L, idx, NULL); /* only memory errors */
    return;
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, tostring_p);
  lua_pushvalue(L, idx);
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
    lua_pop(L, 1);
    if ((t = luaL_getmetafield(L, idx, "__name")) != LUA_TSTRING) {
      if (t != LUA_TNIL) lua_pop(L, 1);
      lua_pushstring(L, luaL_typename(L, idx));
    }
    lua_pushfstring(L, "(%s: tostring failed)", lua_tostring(L, -1));
    lua_remove(L, -2);
  }
}

static void put_table(lua_State *L, conv *c, json_t *obj, int idx, int depth);

/* [-0, +0, m] Sets obj[key] to the value at idx, where obj hangs from
 * c->root (an error leaves nothing unowned) and key is clean text.  Tables
 * up to LOG_MAX_DEPTH become objects; other values that are not JSON
 * become their tostring. */
static void put(lua_State *L, conv *c, json_t *obj, const char *key, int idx,
                int depth) {
  json_t *v;
  int top = lua_gettop(L);
  if (lua_type(L, idx) == LUA_TTABLE && depth <= LOG_MAX_DEPTH) {
    if ((v = json_object()) != NULL &&
        json_object_set_new_nocheck(obj, key, v) == 0)
      put_table(L, c, v, idx, depth); /* v is owned by obj now */
    return;
  }
  switch (lua_type(L, idx)) {
  case LUA_TNIL:
    v = json_null();
    break;
  case LUA_TBOOLEAN:
    v = json_boolean(lua_toboolean(L, idx));
    break;
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx))
      v = json_integer(lua_tointeger(L, idx));
    else if (isfinite(lua_tonumber(L, idx)))
      v = json_real(lua_tonumber(L, idx));
    else
      v = json_null();
    break;
  default: /* strings, and tostring of the rest (tables too deep) */
    if (lua_type(L, idx) == LUA_TSTRING)
      lua_pushvalue(L, idx);
    else
      push_tostring(L, idx);
    push_clean(L, lua_gettop(L), 0);
    v = json_stringn_nocheck(lua_tostring(L, -1), lua_rawlen(L, -1));
    lua_settop(L, top);
  }
  if (v) json_object_set_new_nocheck(obj, key, v);
}

/* [-0, +0, m] Adds the entries of the table at idx to obj (hanging from
 * c->root), keys by their tostring, until LOG_MAX_ENTRIES. */
static void put_table(lua_State *L, conv *c, json_t *obj, int idx, int depth) {
  int top;
  idx = lua_absindex(L, idx);
  luaL_checkstack(L, 8, NULL);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    top = lua_gettop(L); /* key at top - 1, value at top */
    if (c->entries++ >= LOG_MAX_ENTRIES) {
      c->truncated = 1;
      lua_pop(L, 2);
      return;
    }
    if (lua_type(L, top - 1) == LUA_TSTRING)
      lua_pushvalue(L, top - 1);
    else
      push_tostring(L, top - 1);
    put(L, c, obj, push_clean(L, top + 1, 1), top, depth + 1);
    lua_settop(L, top - 1);
  }
}

/* [-3, +0, m] Under lua_pcall: builds c->root (light userdata at 1) from
 * the message at 2 and the fields (a table, or nil) at 3. */
static int log_pmain(lua_State *L) {
  conv *c = lua_touserdata(L, 1);
  if ((c->root = json_object()) == NULL) return 0;
  if (lua_istable(L, 3)) put_table(L, c, c->root, 3, 1);
  put(L, c, c->root, "msg", 2, 1);
  if (c->truncated) json_object_set_new(c->root, "truncated", json_true());
  return 0;
}

/* workerpool.log(level, msg [, fields])   [-0, +0, e] Any state.  Raises
 * on a bad level or fields that are not a table; otherwise never fails: a
 * line that cannot be built is dropped. */
int wpl_lua_log(lua_State *L) {
  int level = wpl_log_level_parse(luaL_checkstring(L, 1));
  conv c = {NULL, 0, 0};
  luaL_argcheck(L, level >= 0 && level != WPL_OFF, 1,
                "level must be debug, info, warn or error");
  luaL_checkany(L, 2);
  if (!lua_isnoneornil(L, 3)) luaL_checktype(L, 3, LUA_TTABLE);
  if (!wpl_log_enabled(level)) return 0;
  lua_settop(L, 3);
  lua_pushcfunction(L, log_pmain);
  lua_insert(L, 1);
  lua_pushlightuserdata(L, &c);
  lua_insert(L, 2);
  lua_remove(L, 3);                      /* the level */
  if (lua_pcall(L, 3, 0, 0) != LUA_OK) { /* out of memory */
    json_decref(c.root);
    if (wp_interrupted()) return lua_error(L); /* the task is stopping */
    return 0;
  }
  wpl_log(level, "log", c.root);
  return 0;
}

/* workerpool.set_log_level(level)   [-0, +0, e] Any state. */
int wpl_lua_set_log_level(lua_State *L) {
  int level = wpl_log_level_parse(luaL_checkstring(L, 1));
  luaL_argcheck(L, level >= 0, 1,
                "level must be debug, info, warn, error or off");
  wpl_log_set_level(level);
  return 0;
}
