/*
 * log.c: structured logs, one JSON object per line.
 *
 * Every line has "ts" (UTC, ISO 8601 with milliseconds), "level" and
 * "event", then the event's own fields.  Lines go to stderr unless a file
 * was set, are written whole under one mutex, and may come from any
 * thread.  A line that cannot be built (out of memory) is dropped: logging
 * never fails its caller.  docs/logging.md lists the events.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include <uv.h>

#include "lbind.h"

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
  f = json_pack("{s:s}", "pool", ev->pool ? ev->pool : "?");
  if (f == NULL) return;
  if (ev->task) json_object_set_new(f, "task", json_string(ev->task));
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
    json_object_set_new(f, "error",
                        json_string(ev->message ? ev->message : "?"));
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
    json_object_set_new(f, "msg", json_string(msg));
    json_object_set_new(f, "dropped", json_integer(ev->n));
    json_object_set_new(f, "reason", json_string(ev->reason));
    json_object_set_new(f, "interval_s", json_real(ev->seconds));
    break;
  default:
    break;
  }
  wpl_log(kinds[ev->type].level, kinds[ev->type].name, f);
}

/* ---- from Lua -------------------------------------------------------- */

typedef struct conv {
  json_t *root; /* owned here until handed to wpl_log */
} conv;

/* A JSON string of s with every non-ASCII byte replaced by '?'. */
static json_t *ascii_copy(const char *s, size_t len) {
  char *copy = malloc(len ? len : 1);
  json_t *j;
  size_t i;
  if (copy == NULL) return NULL;
  for (i = 0; i < len; i++)
    copy[i] = (unsigned char)s[i] < 0x80 ? s[i] : '?';
  j = json_stringn(copy, len);
  free(copy);
  return j;
}

/* [-0, +0, m] The value at idx as JSON (NULL when out of memory). */
static json_t *to_json(lua_State *L, int idx, int depth) {
  switch (lua_type(L, idx)) {
  case LUA_TNIL:
    return json_null();
  case LUA_TBOOLEAN:
    return json_boolean(lua_toboolean(L, idx));
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx)) return json_integer(lua_tointeger(L, idx));
    if (!isfinite(lua_tonumber(L, idx))) return json_null();
    return json_real(lua_tonumber(L, idx));
  case LUA_TSTRING: {
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    json_t *j = json_stringn(s, len);
    if (j == NULL) j = ascii_copy(s, len); /* not UTF-8 */
    return j;
  }
  case LUA_TTABLE:
    if (depth < 8) {
      json_t *obj = json_object();
      luaL_checkstack(L, 3, NULL);
      lua_pushnil(L);
      while (obj && lua_next(L, idx)) {
        const char *k;
        json_t *v;
        lua_pushvalue(L, -2);
        k = luaL_tolstring(L, -1, NULL);
        v = to_json(L, lua_gettop(L) - 2, depth + 1); /* the value */
        if (v == NULL || json_object_set_new(obj, k, v)) {
          json_decref(obj);
          obj = NULL;
        }
        lua_pop(L, 3);
      }
      return obj;
    }
    return json_string(luaL_tolstring(L, idx, NULL)); /* too deep */
  default:
    return json_string(luaL_tolstring(L, idx, NULL));
  }
}

/* [-3, +0, m] fields table (or nil) at 3, message at 2. */
static int log_pmain(lua_State *L) {
  conv *c = lua_touserdata(L, 1);
  json_t *msg;
  if (lua_istable(L, 3)) c->root = to_json(L, 3, 1);
  if (c->root == NULL) c->root = json_object();
  if (c->root == NULL) return 0;
  /* Invalid UTF-8 in a message is kept, escaped byte by byte. */
  msg = to_json(L, 2, 0);
  if (msg) json_object_set_new(c->root, "msg", msg);
  return 0;
}

/* workerpool.log(level, msg [, fields])   [-0, +0, e] Any state. */
int wpl_lua_log(lua_State *L) {
  int level = wpl_log_level_parse(luaL_checkstring(L, 1));
  conv c = {NULL};
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
  lua_remove(L, 3); /* the level */
  if (lua_pcall(L, 3, 0, 0) != LUA_OK) {
    json_decref(c.root);
    return lua_error(L);
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
