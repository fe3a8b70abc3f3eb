/*
 * lworkerpool.c: the `workerpool` Lua module: pools, futures and the
 * functions every state gets (worker_id, pool_name, sleep, now, get).
 *
 * A pool handle is a userdata holding a reference to a core pool.  The
 * handle made by workerpool.new owns the pool: collecting it drains and
 * stops the pool.  Handles from workerpool.get borrow it: collecting one
 * changes nothing.  Closing any handle (a <close> variable) is an explicit
 * stop_wait.
 * Misuse raises; runtime failures return nil, message, name.
 */
#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "lbind.h"
#include "lpipeline.h"
#include "wpool_host.h"

#define WPL_MAX_WORKERS 10000

/* The last field of each userdata names its class: checking an argument
 * compares its size and that pointer, with no metatable lookup.  (policy.c
 * reads a future userdata as the wp_future pointer it starts with.) */
static const char pool_class[] = WPL_POOL_MT;
static const char future_class[] = WPL_FUTURE_MT;

typedef struct wpl_pool {
  wp_pool *p;      /* a handle reference, or NULL once collected */
  int owner;       /* made by workerpool.new: collecting it stops the pool */
  const char *cls; /* pool_class */
} wpl_pool;

typedef struct wpl_future {
  wp_future *f;    /* a reference, or NULL before submit succeeded */
  const char *cls; /* future_class */
} wpl_future;

int wpl_pusherr(lua_State *L, int err) {
  lua_pushnil(L);
  lua_pushstring(L, wp_strerror(err));
  lua_pushstring(L, wp_err_name(err));
  return 3;
}

/* Methods and metamethods of pools and futures carry both metatables as
 * upvalues: making a future sets its metatable without a lookup by name. */
#define FUTURE_MT lua_upvalueindex(2)

/* [-0, +0, v] The pool / future userdata at idx, or raises. */
static wpl_pool *topool(lua_State *L, int idx) {
  wpl_pool *u =
      lua_type(L, idx) == LUA_TUSERDATA ? lua_touserdata(L, idx) : NULL;
  if (u == NULL || lua_rawlen(L, idx) != sizeof *u || u->cls != pool_class)
    luaL_typeerror(L, idx, WPL_POOL_MT);
  return u;
}

static wpl_future *tofuture(lua_State *L, int idx) {
  wpl_future *u =
      lua_type(L, idx) == LUA_TUSERDATA ? lua_touserdata(L, idx) : NULL;
  if (u == NULL || lua_rawlen(L, idx) != sizeof *u || u->cls != future_class)
    luaL_typeerror(L, idx, WPL_FUTURE_MT);
  return u;
}

static wpl_pool *checkpool(lua_State *L) {
  wpl_pool *u = topool(L, 1);
  if (u->p == NULL) luaL_error(L, "attempt to use a collected pool");
  return u;
}

static wpl_future *checkfuture(lua_State *L) {
  wpl_future *u = tofuture(L, 1);
  if (u->f == NULL) luaL_error(L, "attempt to use an empty future");
  return u;
}

/* ---- workerpool.new -------------------------------------------------- */

static const char *const pool_options[] = {"name",
                                           "max_workers",
                                           "min_workers",
                                           "idle_timeout",
                                           "init",
                                           "init_file",
                                           "queue_cap",
                                           "on_full",
                                           "submit_timeout",
                                           "task_timeout",
                                           "stuck_grace",
                                           "slow_task",
                                           "memory_limit",
                                           "max_tasks_per_worker",
                                           "drop_log_interval",
                                           "tenant_label_limit",
                                           NULL};

/* [-0, +0, e] Raises on a key of opts that is not an option. */
static void check_option_names(lua_State *L) {
  lua_pushnil(L);
  while (lua_next(L, 1)) {
    int i, known = 0;
    lua_pop(L, 1);
    if (lua_type(L, -1) == LUA_TSTRING)
      for (i = 0; pool_options[i] && !known; i++)
        known = strcmp(lua_tostring(L, -1), pool_options[i]) == 0;
    if (!known)
      luaL_error(L, "workerpool.new: unknown option '%s'",
                 luaL_tolstring(L, -1, NULL));
  }
}

/* [-0, +0, e] opts[k] as an integer in [lo, hi]; def when absent, unless
 * required.  Anything else raises msg. */
static lua_Integer int_option(lua_State *L, const char *k, lua_Integer lo,
                              lua_Integer hi, int required, lua_Integer def,
                              const char *msg) {
  lua_Integer v = def;
  int ok;
  int t = lua_getfield(L, 1, k);
  if (t == LUA_TNIL) {
    if (required) luaL_error(L, "workerpool.new: %s", msg);
  } else {
    v = lua_tointegerx(L, -1, &ok);
    if (t != LUA_TNUMBER || !ok || v < lo)
      luaL_error(L, "workerpool.new: %s", msg);
    if (v > hi)
      luaL_error(L, "workerpool.new: %s (at most %I)", msg, (LUAI_UACINT)hi);
  }
  lua_pop(L, 1);
  return v;
}

/* [-0, +0, e] opts[k] as a number of seconds: def when absent; else it
 * must be finite and above 0 (or at least 0 with zero_ok). */
static double secs_option(lua_State *L, const char *k, double def,
                          int zero_ok) {
  double v = def;
  if (lua_getfield(L, 1, k) != LUA_TNIL) {
    v = lua_type(L, -1) == LUA_TNUMBER ? (double)lua_tonumber(L, -1) : NAN;
    if (!isfinite(v) || v < 0 || (v == 0 && !zero_ok))
      luaL_error(L, "workerpool.new: %s must be a %s number of seconds", k,
                 zero_ok ? "non-negative" : "positive");
  }
  lua_pop(L, 1);
  return v;
}

/* [-0, +1, e] opts[k] as a string left on the stack, or NULL (pushing
 * nil). */
static const char *str_option(lua_State *L, int idx, const char *k) {
  int t = lua_getfield(L, idx, k);
  if (t == LUA_TNIL) return NULL;
  if (t != LUA_TSTRING) luaL_error(L, "workerpool.new: %s must be a string", k);
  return lua_tostring(L, -1);
}

/* Reads a whole file into a malloc'd buffer.  No Lua calls.  Returns NULL
 * with errno set on failure. */
static char *read_file(const char *path, size_t *len) {
  FILE *fp = fopen(path, "rb");
  char *buf = NULL, *nb;
  size_t cap = 0, n = 0, got;
  int saved;
  struct stat st;
  if (fp == NULL) return NULL;
  if (fstat(fileno(fp), &st) == 0 && S_ISDIR(st.st_mode)) {
    errno = EISDIR; /* fopen opens a directory; reading it reports EIO */
    goto err;
  }
  do {
    if (cap - n < 4096) {
      cap = cap ? cap * 2 : 8192;
      if ((nb = realloc(buf, cap)) == NULL) goto err;
      buf = nb;
    }
    got = fread(buf + n, 1, cap - n, fp);
    n += got;
  } while (got > 0);
  if (ferror(fp)) {
    errno = EIO;
    goto err;
  }
  fclose(fp);
  *len = n;
  return buf;
err:
  saved = errno;
  free(buf);
  fclose(fp);
  errno = saved;
  return NULL;
}

static void open_worker(lua_State *L, void *ud) {
  (void)ud;
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, luaopen_workerpool);
  lua_setfield(L, -2, "workerpool");
  lua_pop(L, 1);
}

/* workerpool.new(opts) -> pool   [-0, +1, e] */
static int wpl_new(lua_State *L) {
  wp_options o;
  wpl_pool *u;
  char err[4096], *file = NULL, initname[512];
  const char *init_file;
  size_t len = 0;
  int r, saved, label_limit;
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  check_option_names(L);
  wp_options_init(&o);
  o.max_workers = (int)int_option(L, "max_workers", 1, WPL_MAX_WORKERS, 1, 0,
                                  "max_workers must be a positive integer");
  o.min_workers =
      (int)int_option(L, "min_workers", 0, o.max_workers, 0, 0,
                      "min_workers must be an integer from 0 to max_workers");
  if (lua_getfield(L, 1, "idle_timeout") != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TNUMBER || isnan(lua_tonumber(L, -1)))
      luaL_error(L, "workerpool.new: idle_timeout must be a number of "
                    "seconds (negative disables reaping)");
    o.idle_timeout = (double)lua_tonumber(L, -1);
  }
  o.queue_cap = (size_t)int_option(L, "queue_cap", 1, (lua_Integer)1 << 40, 0,
                                   0, "queue_cap must be a positive integer");
  if (lua_getfield(L, 1, "on_full") != LUA_TNIL) {
    const char *how = lua_tostring(L, -1);
    if (lua_type(L, -1) != LUA_TSTRING ||
        (strcmp(how, "reject") != 0 && strcmp(how, "block") != 0))
      luaL_error(L, "workerpool.new: on_full must be \"reject\" or "
                    "\"block\"");
    if (o.queue_cap == 0)
      luaL_error(L, "workerpool.new: on_full needs a queue_cap");
    o.block_when_full = strcmp(how, "block") == 0;
  }
  lua_pop(L, 1);
  o.submit_timeout = secs_option(L, "submit_timeout", -1, 1);
  o.task_timeout = secs_option(L, "task_timeout", 0, 0);
  o.stuck_grace = secs_option(L, "stuck_grace", o.stuck_grace, 1);
  o.slow_task = secs_option(L, "slow_task", 0, 0);
  o.drop_log_interval =
      secs_option(L, "drop_log_interval", o.drop_log_interval, 0);
  o.memory_limit =
      (size_t)int_option(L, "memory_limit", 1, (lua_Integer)1 << 48, 0, 0,
                         "memory_limit must be a positive integer (bytes)");
  o.max_tasks_per_worker =
      (int)int_option(L, "max_tasks_per_worker", 1, INT32_MAX, 0, 0,
                      "max_tasks_per_worker must be a positive integer");
  label_limit =
      (int)int_option(L, "tenant_label_limit", 0, INT32_MAX, 0, 100,
                      "tenant_label_limit must be a non-negative integer");
  lua_settop(L, 1); /* the strings below stay on the stack, anchored */
  o.name = str_option(L, 1, "name");         /* 2 */
  o.init = str_option(L, 1, "init");         /* 3 */
  init_file = str_option(L, 1, "init_file"); /* 4 */
  /* A name shows in logs and metric labels, which hold only UTF-8. */
  if (o.name && strlen(o.name) != lua_rawlen(L, 2))
    luaL_argerror(L, 1, "name must not contain '\\0'");
  if (o.name && !wpl_utf8_valid(o.name, lua_rawlen(L, 2)))
    luaL_argerror(L, 1, "name must be valid UTF-8");
  if (init_file && strlen(init_file) != lua_rawlen(L, 4))
    luaL_argerror(L, 1, "init_file must not contain '\\0'");
  if (o.init && init_file)
    luaL_error(L, "workerpool.new: init and init_file are mutually "
                  "exclusive");
  if (o.init) {
    o.init_len = lua_rawlen(L, 3);
    o.init_name = "=init";
  }
  if (init_file) snprintf(initname, sizeof initname, "@%s", init_file);
  if (lua_getglobal(L, "package") == LUA_TTABLE) { /* 5 */
    o.package_path = str_option(L, 5, "path");     /* 6 */
    o.package_cpath = str_option(L, 5, "cpath");   /* 7 */
  }
  o.open_state = open_worker;
  u = lua_newuserdatauv(L, sizeof *u, 0);
  u->cls = pool_class;
  u->p = NULL;
  u->owner = 1;
  luaL_setmetatable(L, WPL_POOL_MT);
  /* From here to wp_pool_new returning, no Lua call: file is ours. */
  if (init_file) {
    if ((file = read_file(init_file, &len)) == NULL) {
      saved = errno;
      return luaL_error(L, "workerpool.new: cannot read init_file '%s': %s",
                        init_file, strerror(saved));
    }
    o.init = file;
    o.init_len = len;
    o.init_name = initname;
  }
  r = wp_pool_new(&o, &u->p, err, sizeof err);
  free(file);
  if (r == WP_EINIT)
    return luaL_error(L, "workerpool.new: init failed: %s", err);
  if (r == WP_EINVAL || r == WP_EEXISTS)
    return luaL_error(L, "workerpool.new: %s", err);
  if (r) return luaL_error(L, "workerpool.new: %s", wp_strerror(r));
  wpl_metrics_pool_created(u->p, label_limit);
  return 1;
}

/* workerpool.get(name) -> pool | nil   [-0, +1, e] */
static int wpl_get(lua_State *L) {
  size_t len;
  const char *name = luaL_checklstring(L, 1, &len);
  wpl_pool *u = lua_newuserdatauv(L, sizeof *u, 0);
  u->cls = pool_class;
  u->p = NULL;
  u->owner = 0;
  luaL_setmetatable(L, WPL_POOL_MT);
  /* No pool name holds '\0': "a\0b" is not pool "a". */
  if (strlen(name) != len || (u->p = wp_pool_find(name)) == NULL)
    lua_pushnil(L);
  return 1;
}

/* ---- pool methods ---------------------------------------------------- */

/* ---- submitting ------------------------------------------------------ */

static const char *const desc_fields[] = {"fn",      "handler", "name",
                                          "timeout", "tenant",  NULL};

static int desc_error(lua_State *L, const char *what, const char *msg) {
  return luaL_error(L, "bad argument #1 to '%s' (%s)", what, msg);
}

/* [-0, +0, e] Copies string field k (name or tenant) of the descriptor at
 * 2, read through any __index, into the private copy at the top; returns
 * it, anchored there, or NULL when absent.  Raises when it is not a string
 * or holds '\0'. */
static const char *desc_string(lua_State *L, const char *what, const char *k) {
  size_t len;
  const char *s;
  if (lua_getfield(L, 2, k) == LUA_TNIL) {
    lua_pop(L, 1);
    return NULL;
  }
  if (lua_type(L, -1) != LUA_TSTRING) {
    lua_pushfstring(L, "%s must be a string", k);
    desc_error(L, what, lua_tostring(L, -1));
  }
  s = lua_tolstring(L, -1, &len);
  if (strlen(s) != len) {
    lua_pushfstring(L, "%s must not contain '\\0'", k);
    desc_error(L, what, lua_tostring(L, -1));
  }
  lua_setfield(L, -2, k); /* the copy keeps s alive */
  return s;
}

/* [-0, +0|1, e] When the task at 2 is a descriptor table, reads it into o,
 * puts a private copy of it below self (index 1: the copy anchors o's
 * strings, and no Lua code can change it) and its function or handler name
 * in its place.  Returns the index of self afterwards. */
static int parse_task(lua_State *L, const char *what, wp_task_opts *o) {
  int i, has_fn, has_handler;
  memset(o, 0, sizeof *o);
  if (lua_type(L, 2) != LUA_TTABLE) return 1;
  lua_pushnil(L);
  while (lua_next(L, 2)) {
    int known = 0;
    lua_pop(L, 1);
    if (lua_type(L, -1) == LUA_TSTRING)
      for (i = 0; desc_fields[i] && !known; i++)
        known = strcmp(lua_tostring(L, -1), desc_fields[i]) == 0;
    if (!known) {
      lua_pushfstring(L, "unknown task field '%s'", luaL_tolstring(L, -1, 0));
      return desc_error(L, what, lua_tostring(L, -1));
    }
  }
  lua_createtable(L, 0, 4); /* the copy */
  has_fn = lua_getfield(L, 2, "fn") != LUA_TNIL;
  has_handler = lua_getfield(L, 2, "handler") != LUA_TNIL;
  if (has_fn == has_handler)
    return desc_error(L, what, "a task descriptor needs fn or handler");
  if (has_fn && (!lua_isfunction(L, -2) || lua_iscfunction(L, -2)))
    return desc_error(L, what, "fn must be a Lua function");
  if (has_handler && lua_type(L, -1) != LUA_TSTRING)
    return desc_error(L, what, "handler must be a string");
  lua_remove(L, has_fn ? -1 : -2); /* the nil one: the task is on top */
  lua_pushvalue(L, -1);
  lua_setfield(L, -3, has_fn ? "fn" : "handler");
  lua_insert(L, -2); /* the copy on top, the task below it */
  o->name = desc_string(L, what, "name");
  o->tenant = desc_string(L, what, "tenant");
  if (lua_getfield(L, 2, "timeout") != LUA_TNIL) {
    double t = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : NAN;
    if (!(t > 0))
      return desc_error(L, what,
                        "timeout must be a positive number of "
                        "seconds");
    o->timeout = isinf(t) ? -1 : t; /* math.huge: no deadline */
    lua_setfield(L, -2, "timeout");
  } else {
    lua_pop(L, 1);
  }
  lua_insert(L, 1);  /* the copy, below self */
  lua_replace(L, 3); /* the function or handler, where the table was */
  return 2;
}

/* How long a coroutine waits before trying a full queue again. */
#define FULL_RETRY 0.005

static int submit_k(lua_State *L, int status, lua_KContext ctx);

typedef struct guarded {
  wp_pool *p;
  const char *what;
  wp_task_opts *o;
  wp_future **out;
  int r;
} guarded;

/* [-(n+1), +0, e] wp_submit_lua_opts on its arguments. */
static int guarded_main(lua_State *L) {
  guarded *g = lua_touserdata(L, 1);
  g->r =
      wp_submit_lua_opts(g->p, L, 2, lua_gettop(L) - 2, g->what, g->o, g->out);
  return 0;
}

/* [-0, +0, e] Submits the task at `task` with nargs arguments.  When
 * policies admitted it (their task table at tt), a refused argument gives
 * back what they took before the error goes on. */
static int submit_guarded(lua_State *L, wp_pool *p, int task, int nargs,
                          const char *what, wp_task_opts *o, wp_future **out,
                          int tt) {
  guarded g;
  int i;
  if (!tt) return wp_submit_lua_opts(p, L, task, nargs, what, o, out);
  g.p = p;
  g.what = what;
  g.o = o;
  g.out = out;
  g.r = 0;
  luaL_checkstack(L, nargs + 3, "too many arguments");
  lua_pushcfunction(L, guarded_main);
  lua_pushlightuserdata(L, &g);
  for (i = 0; i <= nargs; i++)
    lua_pushvalue(L, task + i);
  if (lua_pcall(L, nargs + 2, 0, 0) != LUA_OK) {
    wpl_policy_undo(L, p, tt);
    lua_error(L);
  }
  return g.r;
}

/* What a submitting call returns; kept in its continuation context. */
enum { RET_FUTURE = 0, RET_WAIT = 1, RET_TRUE = 4 };

/* [-0, +1|3, e] Ends a submit whose future is at the top (below it, the
 * task table when admitted): tracks the task for its policies, or gives
 * back what they took.  pool:post answers true instead of the future. */
static int submitted(lua_State *L, wp_pool *p, int r, int admitted, int ret) {
  if (admitted) {
    if (r == 0)
      wpl_policy_track(L, p, -2, -1);
    else
      wpl_policy_undo(L, p, -2);
  }
  if (r) return wpl_pusherr(L, r);
  if (ret == RET_TRUE) lua_pushboolean(L, 1);
  return 1;
}

/* [-0, +1|3, e] Queues the task (plain or descriptor) with the arguments
 * after it and pushes its future (or true, for post), or returns nil,
 * "stopped" / nil, "full".  With on_full = "block" a host coroutine waits
 * for room without blocking the loop; any other caller blocks its thread. */
static int submit(lua_State *L, const char *what, int ret) {
  wpl_pool *u = checkpool(L);
  wp_task_opts o;
  double submit_timeout;
  wpl_future *fu;
  int self, task, nargs, r, parkable, admitted, degraded;
  int then_wait = ret == RET_WAIT;
  luaL_checkany(L, 2);
  self = parse_task(L, what, &o);
  task = self + 1;
  nargs = lua_gettop(L) - task;
  if ((admitted = wpl_policy_admit(L, u->p, &o, task)) < 0) {
    if (then_wait) return lua_error(L); /* submit_wait raises the reason */
    return 2;                           /* submit: nil, the reason */
  }
  degraded = admitted == 2; /* the fallback handler replaced the task */
  if (degraded) admitted = 0;
  /* A degraded submit waits for room in its thread: submit_k would parse
   * the descriptor again and lose the fallback. */
  parkable = !degraded && wp_pool_blocks_when_full(u->p, &submit_timeout) &&
             lua_isyieldable(L);
  if (ret == RET_TRUE && !admitted && !degraded && !parkable) {
    /* Nothing will ever look at the future: none is made for Lua. */
    o.nowait = 0;
    r = wp_submit_lua_opts(u->p, L, task, nargs, what, &o, NULL);
    if (r) return wpl_pusherr(L, r);
    lua_pushboolean(L, 1);
    return 1;
  }
  fu = lua_newuserdatauv(L, sizeof *fu, 0);
  fu->cls = future_class;
  fu->f = NULL;
  lua_pushvalue(L, FUTURE_MT);
  lua_setmetatable(L, -2);
  if (degraded) {
    wpl_policy_mark_degraded(L, -1, -2);
    lua_remove(L, -2); /* the reason */
  }
  o.nowait = parkable;
  r = submit_guarded(L, u->p, task, nargs, what, &o, &fu->f,
                     admitted ? lua_gettop(L) - 1 : 0);
  if (r == WP_EFULL && parkable) {
    lua_pushnumber(L,
                   submit_timeout < 0 ? HUGE_VAL : wp_now() + submit_timeout);
    if (wpl_host_park_sleep(L, FULL_RETRY))
      return lua_yieldk(L, 0, ret | admitted << 1, submit_k);
    lua_pop(L, 1);
    o.nowait = 0; /* not a host coroutine after all: block here */
    r = submit_guarded(L, u->p, task, nargs, what, &o, &fu->f,
                       admitted ? lua_gettop(L) - 1 : 0);
  }
  return submitted(L, u->p, r, admitted, ret);
}

static int submit_wait_from(lua_State *L, wpl_future *fu);

/* Continues a submit that waits for room: the stack holds the call, the
 * future and the deadline. */
static int submit_k(lua_State *L, int status, lua_KContext ctx) {
  wpl_pool *u;
  wp_task_opts o;
  wpl_future *fu = luaL_checkudata(L, -2, WPL_FUTURE_MT);
  double deadline = lua_tonumber(L, -1);
  int self = lua_type(L, 1) == LUA_TTABLE ? 2 : 1, r;
  int ret = (int)(ctx & (RET_WAIT | RET_TRUE)), admitted = (int)(ctx >> 1 & 1);
  const char *what = ret == RET_WAIT   ? "submit_wait"
                     : ret == RET_TRUE ? "post"
                                       : "submit";
  (void)status;
  u = luaL_checkudata(L, self, WPL_POOL_MT);
  lua_pop(L, 1);
  if (self == 2) {
    lua_pushvalue(L, 1); /* parse the descriptor again for its options */
    lua_replace(L, 3);
    lua_remove(L, 1);
    parse_task(L, what, &o);
  } else {
    memset(&o, 0, sizeof o);
  }
  o.nowait = 1;
  r = wp_submit_lua_opts(u->p, L, self + 1, lua_gettop(L) - self - 2 - admitted,
                         what, &o, &fu->f);
  if (r == WP_EFULL && wp_now() < deadline) {
    lua_pushnumber(L, deadline);
    wpl_host_park_sleep(L, FULL_RETRY);
    return lua_yieldk(L, 0, ctx, submit_k);
  }
  if (r == WP_EFULL) /* gave up */
    wp_pool_count_drop_tenant(u->p, WP_DROP_FULL, o.tenant);
  if (submitted(L, u->p, r, admitted, ret) != 1) return 3;
  return ret == RET_WAIT ? submit_wait_from(L, fu) : 1;
}

/* pool:submit(task, ...) -> future | nil, "stopped" | nil, "full"
 * [-0, +1|3, e] */
static int pool_submit(lua_State *L) {
  return submit(L, "submit", RET_FUTURE);
}

/* pool:post(task, ...) -> true | nil, "stopped" | nil, "full"
 * [-0, +1|3, e] submit without a future: nobody waits for the task, and an
 * error it raises is logged as a task_error event. */
static int pool_post(lua_State *L) {
  return submit(L, "post", RET_TRUE);
}

/* [-0, +n, e] Pushes the results of an ended future; raises its error. */
static int finish_wait(lua_State *L, wp_future *f, const char *pool) {
  int n;
  switch (wp_future_status(f)) {
  case WP_OK:
    return wp_future_push(f, L);
  case WP_ERROR:
    n = wp_future_push(f, L);
    if (n < 1) lua_pushliteral(L, "task failed");
    return lua_error(L);
  case WP_DISCARDED:
    return luaL_error(L, "task discarded: pool '%s' was stopped", pool);
  case WP_TIMEOUT:
    return luaL_error(L, "timeout");
  default:
    return luaL_error(L, "task cancelled");
  }
}

/* Continues submit_wait in a host coroutine once the task ended. */
static int submit_wait_k(lua_State *L, int status, lua_KContext ctx) {
  wpl_future *fu = lua_touserdata(L, 1);
  (void)status;
  lua_settop(L, 1);
  return finish_wait(L, fu->f, (const char *)ctx);
}

/* [-0, +n, e] The waiting half of submit_wait, for the future fu at the
 * top of the stack. */
static int submit_wait_from(lua_State *L, wpl_future *fu) {
  const char *pname = wp_future_pool_name(fu->f); /* kept alive by fu */
  lua_replace(L, 1); /* keep the future anchored while results decode */
  lua_settop(L, 1);
  if (wp_future_status(fu->f) == WP_PENDING &&
      wpl_host_park_future(L, fu->f, -1))
    return lua_yieldk(L, 0, (lua_KContext)pname, submit_wait_k);
  wp_future_wait(fu->f, -1);
  wpl_policy_finish(L, fu->f);
  return finish_wait(L, fu->f, pname);
}

/* Continues pool:map after its Lua half returned: every value on the
 * stack above the pool's own arguments is a result. */
static int pool_map_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  (void)ctx;
  return lua_gettop(L);
}

/* pool:map(task, list [, opts]) -> results | nil, err, code
 * [-0, +1|3, e] Written in Lua (lua/workerpool/map.lua); called with
 * lua_callk so that its waits can suspend a host coroutine. */
static int pool_map(lua_State *L) {
  wpl_pool *u = checkpool(L);
  int nargs;
  if (wp_state_pool(L) == u->p)
    return luaL_error(L,
                      "map from a task of pool '%s' would deadlock (the "
                      "task would wait for workers of its own pool); use "
                      "another pool",
                      wp_pool_name(u->p));
  nargs = lua_gettop(L);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "workerpool.map");
  lua_call(L, 1, 1);
  if (lua_getfield(L, -1, "map") != LUA_TFUNCTION)
    return luaL_error(L, "workerpool.map has no map function");
  lua_replace(L, -2);
  lua_insert(L, 1);
  lua_callk(L, nargs, LUA_MULTRET, 0, pool_map_k);
  return pool_map_k(L, LUA_OK, 0);
}

/* pool:submit_wait(task, ...) -> results... | nil, "stopped" | nil, "full"
 * [-0, +n, e] Raises the task's error, with its worker-side traceback. */
static int pool_submit_wait(lua_State *L) {
  wpl_pool *u = checkpool(L);
  int n;
  if (wp_state_pool(L) == u->p)
    return luaL_error(L,
                      "submit_wait from a task of pool '%s' would deadlock "
                      "(the task would wait for a worker of its own pool); "
                      "use submit, or another pool",
                      wp_pool_name(u->p));
  n = submit(L, "submit_wait", RET_WAIT);
  if (n != 1) return n;
  return submit_wait_from(L, lua_touserdata(L, -1));
}

static void check_deadlock(lua_State *L, wpl_pool *u, int r, const char *m) {
  if (r == WP_EDEADLOCK)
    luaL_error(L, "%s from a task of pool '%s' would deadlock", m,
               wp_pool_name(u->p));
}

/* A blocking pool call, run on a helper thread under a host loop. */
typedef struct pool_op {
  wp_pool *p;      /* borrowed from the handle at stack index 1 */
  int which;       /* OP_* */
  double timeout;  /* for OP_STOP_WAIT; < 0: none */
  int interrupted; /* OP_STOP_WAIT's second result */
} pool_op;

enum { OP_PAUSE, OP_STOP, OP_STOP_WAIT };

static const char *const op_names[] = {"pause", "stop", "stop_wait"};

static int run_pool_op(void *ud) {
  pool_op *o = ud;
  switch (o->which) {
  case OP_PAUSE:
    return wp_pool_pause(o->p);
  case OP_STOP:
    return wp_pool_stop(o->p);
  default:
    return wp_pool_stop_deadline(o->p, o->timeout, &o->interrupted);
  }
}

/* [-0, +0|1|2, e] Pushes the op's results (pause: none; stop_wait: two). */
static int pool_op_done(lua_State *L, pool_op *o, int r) {
  check_deadlock(L, luaL_checkudata(L, 1, WPL_POOL_MT), r, op_names[o->which]);
  if (o->which == OP_PAUSE) return 0;
  lua_pushinteger(L, r);
  if (o->which == OP_STOP) return 1;
  lua_pushinteger(L, o->interrupted);
  return 2;
}

static int pool_op_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  return pool_op_done(L, (pool_op *)ctx, (int)lua_tointeger(L, -1));
}

/* [-0, +1|0, e] Runs a pool op: parked in a host coroutine, else here. */
static int pool_op_call(lua_State *L, int which, double timeout) {
  wpl_pool *u = checkpool(L);
  pool_op *o = lua_newuserdatauv(L, sizeof *o, 0); /* anchored on stack */
  o->p = u->p;
  o->which = which;
  o->timeout = timeout;
  o->interrupted = 0;
  if (wpl_host_park_call(L, o->p, run_pool_op, o))
    return lua_yieldk(L, 0, (lua_KContext)o, pool_op_k);
  return pool_op_done(L, o, run_pool_op(o));
}

/* pool:pause()   [-0, +0, e] */
static int pool_pause(lua_State *L) {
  return pool_op_call(L, OP_PAUSE, -1);
}

/* pool:resume()   [-0, +0, e] */
static int pool_resume(lua_State *L) {
  wp_pool_resume(checkpool(L)->p);
  return 0;
}

/* pool:stop() -> discarded   [-0, +1, e] */
static int pool_stop(lua_State *L) {
  return pool_op_call(L, OP_STOP, -1);
}

/* pool:stop_wait([deadline_s]) -> discarded, interrupted   [-0, +2, e]
 * Drains; past the deadline what is still queued is discarded and running
 * tasks are interrupted (or abandoned after stuck_grace). */
static int pool_stop_wait(lua_State *L) {
  double t = -1;
  if (!lua_isnoneornil(L, 2)) {
    t = (double)luaL_checknumber(L, 2);
    luaL_argcheck(L, t >= 0, 2, "deadline must be a non-negative number");
  }
  lua_settop(L, 1);
  return pool_op_call(L, OP_STOP_WAIT, t);
}

/* [-0, +1, e] */
static int pool_count(lua_State *L, int which) {
  wp_pool_counts c;
  wp_pool_get_counts(checkpool(L)->p, &c);
  switch (which) {
  case 0:
    lua_pushboolean(L, c.stopped);
    break;
  case 1:
    lua_pushinteger(L, (lua_Integer)c.waiting);
    break;
  case 2:
    lua_pushinteger(L, c.running);
    break;
  case 3:
    lua_pushinteger(L, c.workers);
    break;
  default:
    lua_pushinteger(L, c.max_workers);
  }
  return 1;
}

/* pool:stopped(), :waiting(), :running(), :workers(), :size()
 * [-0, +1, e] */
static int pool_stopped(lua_State *L) {
  return pool_count(L, 0);
}
static int pool_waiting(lua_State *L) {
  return pool_count(L, 1);
}
static int pool_running(lua_State *L) {
  return pool_count(L, 2);
}
static int pool_workers(lua_State *L) {
  return pool_count(L, 3);
}
static int pool_size(lua_State *L) {
  return pool_count(L, 4);
}

/* pool:stats() -> table   [-0, +1, e] See docs/guards.md. */
static int pool_stats(lua_State *L) {
  wpl_policy_poll(L);
  return wpl_push_stats(L, checkpool(L)->p);
}

/* pool:use(policy) / pool:use("module", opts) -> pool   [-0, +1, e]
 * Attaches to the pool for every submitting state; see docs/policies.md. */
static int pool_use(lua_State *L) {
  return wpl_policy_use(L, checkpool(L)->p);
}

/* pool:inspect() -> {workers = {{id =, state =, task =, tenant =,
 * running_s =, overdue =, tasks_done =, memory =}, ...}, queued =,
 * oldest_queued_s =, wedged =}   [-0, +1, e] */
static int pool_inspect(lua_State *L) {
  return wpl_push_inspect(L, checkpool(L)->p);
}

/* pool:policies() -> {{name =, module =, fn =, local =}, ...}
 * [-0, +1, e] */
static int pool_policies(lua_State *L) {
  return wpl_policy_list(L, checkpool(L)->p);
}

/* workerpool.poll()   [-0, +0, e] Runs the done hooks of policies for
 * tasks that ended (outside a host loop they otherwise run at the next
 * submit or wait). */
static int wpl_poll(lua_State *L) {
  wpl_policy_poll(L);
  return 0;
}

void wpl_push_borrowed(lua_State *L, wp_pool *p) {
  wpl_pool *u = lua_newuserdatauv(L, sizeof *u, 0);
  u->cls = pool_class;
  u->p = NULL;
  u->owner = 0;
  luaL_setmetatable(L, WPL_POOL_MT);
  wp_pool_retain(p);
  u->p = p;
}

/* pool:resize(n)   [-0, +0, e] Changes max_workers while running. */
static int pool_resize(lua_State *L) {
  wpl_pool *u = checkpool(L);
  lua_Integer n = luaL_checkinteger(L, 2);
  wp_pool_counts c;
  int r;
  luaL_argcheck(L, n >= 1 && n <= WPL_MAX_WORKERS, 2,
                "max_workers must be a positive integer (at most 10000)");
  r = wp_pool_resize(u->p, (int)n);
  if (r == WP_EINVAL) {
    wp_pool_get_counts(u->p, &c);
    return luaL_argerror(L, 2, "must not be below min_workers");
  }
  if (r) return wpl_pusherr(L, r);
  lua_pushboolean(L, 1);
  return 1;
}

/* workerpool.metrics() -> text   [-0, +1, m] Prometheus exposition format
 * for every live pool. */
static int wpl_metrics(lua_State *L) {
  return wpl_push_metrics(L);
}

/* pool:name() -> string   [-0, +1, e] */
static int pool_name(lua_State *L) {
  lua_pushstring(L, wp_pool_name(checkpool(L)->p));
  return 1;
}

/* __close: drains and stops the pool, suspending only the calling host
 * coroutine under a host loop, as stop_wait does.   [-0, +0|1, e] */
static int pool_close(lua_State *L) {
  wpl_pool *u = topool(L, 1);
  if (u->p == NULL) return 0;
  if (wp_state_pool(L) == u->p)
    check_deadlock(L, u, WP_EDEADLOCK, "closing a pool");
  lua_settop(L, 1);
  return pool_op_call(L, OP_STOP_WAIT, -1);
}

/* __gc: an owner handle drains and stops its pool; under a host loop the
 * host finishes that in the background.   [-0, +0, -] */
static int pool_gc(lua_State *L) {
  wpl_pool *u = topool(L, 1);
  wp_pool *p = u->p;
  u->p = NULL;
  if (p == NULL || (u->owner && wpl_host_adopt(L, p))) return 0;
  if (u->owner) wp_pool_stop_wait(p);
  wp_pool_release(p);
  return 0;
}

/* [-0, +1, m] */
static int pool_tostring(lua_State *L) {
  wpl_pool *u = topool(L, 1);
  if (u->p)
    lua_pushfstring(L, "workerpool.pool (%s)", wp_pool_name(u->p));
  else
    lua_pushliteral(L, "workerpool.pool (collected)");
  return 1;
}

/* ---- futures --------------------------------------------------------- */

static int future_outcome(lua_State *L, wpl_future *u);

static int push_timeout(lua_State *L) {
  lua_pushnil(L);
  lua_pushliteral(L, "timeout");
  return 2;
}

/* Continues f:wait in a host coroutine: resumed with true when the task
 * ended, false on timeout. */
static int future_wait_k(lua_State *L, int status, lua_KContext ctx) {
  (void)status;
  (void)ctx;
  if (!lua_toboolean(L, -1)) return push_timeout(L);
  lua_settop(L, 1);
  return future_outcome(L, lua_touserdata(L, 1));
}

/* f:wait([timeout]) -> true, results... | false, err | nil, "timeout"
 * [-0, +n, e] */
static int future_wait(lua_State *L) {
  wpl_future *u = checkfuture(L);
  double t = -1;
  if (!lua_isnoneornil(L, 2)) {
    t = (double)luaL_checknumber(L, 2);
    luaL_argcheck(L, t >= 0, 2, "timeout must be a non-negative number");
  }
  lua_settop(L, 1);
  if (wp_future_status(u->f) == WP_PENDING && wpl_host_park_future(L, u->f, t))
    return lua_yieldk(L, 0, 0, future_wait_k);
  if (wp_future_wait(u->f, t) == WP_ETIMEDOUT) return push_timeout(L);
  wpl_policy_finish(L, u->f);
  wpl_policy_poll(L);
  return future_outcome(L, u);
}

/* [-0, +n, e] true, results... | false, err for an ended future. */
static int future_outcome(lua_State *L, wpl_future *u) {
  switch (wp_future_status(u->f)) {
  case WP_OK:
    lua_pushboolean(L, 1);
    return 1 + wp_future_push(u->f, L);
  case WP_ERROR:
    lua_pushboolean(L, 0);
    if (wp_future_push(u->f, L) < 1) lua_pushliteral(L, "task failed");
    return 2;
  case WP_DISCARDED:
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "discarded");
    return 2;
  case WP_TIMEOUT:
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "timeout");
    return 2;
  default:
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "cancelled");
    return 2;
  }
}

/* f:done() -> boolean   [-0, +1, e] */
static int future_done(lua_State *L) {
  lua_pushboolean(L, wp_future_status(checkfuture(L)->f) != WP_PENDING);
  return 1;
}

/* f:cancel() -> boolean   [-0, +1, e] */
static int future_cancel(lua_State *L) {
  lua_pushboolean(L, wp_future_cancel(checkfuture(L)->f));
  return 1;
}

/* f:on_done(cb): cb(ok, ...) runs in a new host coroutine once the task
 * ended.   [-0, +0, e] Needs a host loop. */
static int future_on_done(lua_State *L) {
  return wpl_host_on_done(L, checkfuture(L)->f);
}

/* f:status() -> "pending" | "ok" | "error" | "discarded" | "cancelled"
 * [-0, +1, e] */
static int future_status(lua_State *L) {
  static const char *const names[] = {"pending",   "ok",        "error",
                                      "discarded", "cancelled", "timeout"};
  lua_pushstring(L, names[wp_future_status(checkfuture(L)->f)]);
  return 1;
}

/* f:degraded() -> reason | false   [-0, +1, e] The refusal (e.g. "open")
 * for which a policy's fallback handler ran instead of the task. */
static int future_degraded(lua_State *L) {
  checkfuture(L);
  return wpl_policy_degraded(L, 1);
}

/* [-0, +0, -] */
static int future_gc(lua_State *L) {
  wpl_future *u = tofuture(L, 1);
  wp_future_release(u->f);
  u->f = NULL;
  return 0;
}

/* ---- functions for every state --------------------------------------- */

/* workerpool.worker_id() -> integer | nil   [-0, +1, -] */
static int wpl_worker_id(lua_State *L) {
  int id = wp_state_worker_id(L);
  if (id)
    lua_pushinteger(L, id);
  else
    lua_pushnil(L);
  return 1;
}

/* workerpool.pool_name() -> string | nil   [-0, +1, m] */
static int wpl_pool_name(lua_State *L) {
  wp_pool *p = wp_state_pool(L);
  if (p)
    lua_pushstring(L, wp_pool_name(p));
  else
    lua_pushnil(L);
  return 1;
}

static int sleep_k(lua_State *L, int status, lua_KContext ctx) {
  (void)L;
  (void)status;
  (void)ctx;
  return 0;
}

/* workerpool.sleep(seconds)   [-0, +0, e] Suspends the calling host
 * coroutine; elsewhere blocks the calling thread. */
static int wpl_sleep(lua_State *L) {
  double s = (double)luaL_checknumber(L, 1);
  struct timespec ts;
  luaL_argcheck(L, s >= 0, 1, "seconds must be a non-negative number");
  if (wpl_host_park_sleep(L, s)) return lua_yieldk(L, 0, 0, sleep_k);
  if (wp_interrupted()) return 0; /* the task is being stopped */
  if (s > 1e9) s = 1e9;
  ts.tv_sec = (time_t)s;
  ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
  /* A worker's sleep ends early when its task is interrupted. */
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR && !wp_interrupted())
    ;
  return 0;
}

/* workerpool.now() -> seconds of a monotonic clock   [-0, +1, -] */
static int wpl_now(lua_State *L) {
  lua_pushnumber(L, wp_now());
  return 1;
}

static const luaL_Reg module_funcs[] = {
    {"new", wpl_new},
    {"get", wpl_get},
    {"shared", wpl_shared_open},
    {"worker_id", wpl_worker_id},
    {"pool_name", wpl_pool_name},
    {"sleep", wpl_sleep},
    {"now", wpl_now},
    {"metrics", wpl_metrics},
    {"metrics_collector", wpl_metrics_collector},
    {"poll", wpl_poll},
    {"spawn", wpl_spawn},
    {"after", wpl_after},
    {"every", wpl_every},
    {"await", wpl_await},
    {"on_shutdown", wpl_on_shutdown},
    {"log", wpl_lua_log},
    {"set_log_level", wpl_lua_set_log_level},
    {NULL, NULL}};

static const luaL_Reg pool_methods[] = {
    {"submit", pool_submit},   {"submit_wait", pool_submit_wait},
    {"post", pool_post},       {"map", pool_map},
    {"pause", pool_pause},     {"resume", pool_resume},
    {"stop", pool_stop},       {"stop_wait", pool_stop_wait},
    {"stopped", pool_stopped}, {"waiting", pool_waiting},
    {"running", pool_running}, {"workers", pool_workers},
    {"size", pool_size},       {"stats", pool_stats},
    {"use", pool_use},         {"resize", pool_resize},
    {"name", pool_name},       {"policies", pool_policies},
    {"inspect", pool_inspect}, {NULL, NULL}};

static const luaL_Reg pool_meta[] = {{"__gc", pool_gc},
                                     {"__close", pool_close},
                                     {"__tostring", pool_tostring},
                                     {NULL, NULL}};

static const luaL_Reg future_meta[] = {{"__gc", future_gc}, {NULL, NULL}};

static const luaL_Reg future_methods[] = {{"wait", future_wait},
                                          {"done", future_done},
                                          {"cancel", future_cancel},
                                          {"status", future_status},
                                          {"on_done", future_on_done},
                                          {"degraded", future_degraded},
                                          {NULL, NULL}};

/* [-0, +0, m] Fills the metatable at mt: `methods` in __index, then the
 * metamethods; each function gets both metatables as upvalues. */
static void fill_class(lua_State *L, int mt, const luaL_Reg *methods,
                       const luaL_Reg *meta) {
  lua_newtable(L);
  luaL_getmetatable(L, WPL_POOL_MT);
  luaL_getmetatable(L, WPL_FUTURE_MT);
  luaL_setfuncs(L, methods, 2);
  lua_setfield(L, mt, "__index");
  lua_pushvalue(L, mt);
  luaL_getmetatable(L, WPL_POOL_MT);
  luaL_getmetatable(L, WPL_FUTURE_MT);
  luaL_setfuncs(L, meta, 2);
  lua_pop(L, 1);
}

/* Keeps this module mapped for the life of the process: its pools,
 * dictionaries and registries are process-wide and outlive the state that
 * loaded it. */
static void pin_module(void) {
  Dl_info info;
  if (dladdr((void *)pin_module, &info) && info.dli_fname)
    dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
}

/* The Lua modules of lua/workerpool/, embedded by the build. */
extern const struct wpl_lua_module {
  const char *name;
  const char *src;
  size_t len;
} wpl_lua_modules[];

/* package.preload loader of an embedded module: upvalue 1 is its index.
 * [-0, +1, e] */
static int load_embedded(lua_State *L) {
  const struct wpl_lua_module *m =
      &wpl_lua_modules[lua_tointeger(L, lua_upvalueindex(1))];
  char chunk[96];
  snprintf(chunk, sizeof chunk, "@lua/workerpool/%s.lua", m->name);
  if (luaL_loadbufferx(L, m->src, m->len, chunk, "t") != LUA_OK)
    return lua_error(L);
  lua_pushvalue(L, 1); /* the module name, as require passes it */
  lua_call(L, 1, 1);
  return 1;
}

/* __index of the module table: workerpool.tenant requires
 * "workerpool.tenant" on first use.   [-0, +1, e] */
static int module_index(lua_State *L) {
  const struct wpl_lua_module *m;
  const char *k = lua_tostring(L, 2);
  if (lua_type(L, 2) != LUA_TSTRING) return 0;
  for (m = wpl_lua_modules; m->name; m++)
    if (strcmp(m->name, k) == 0) {
      lua_getglobal(L, "require");
      lua_pushfstring(L, "workerpool.%s", k);
      lua_call(L, 1, 1);
      lua_pushvalue(L, 2);
      lua_pushvalue(L, -2);
      lua_rawset(L, 1);
      return 1;
    }
  return 0;
}

/* [-0, +0, e] Adds every embedded module to package.preload. */
static void preload_embedded(lua_State *L) {
  int i;
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  for (i = 0; wpl_lua_modules[i].name; i++) {
    lua_pushfstring(L, "workerpool.%s", wpl_lua_modules[i].name);
    if (lua_rawget(L, -2) == LUA_TNIL) {
      lua_pushfstring(L, "workerpool.%s", wpl_lua_modules[i].name);
      lua_pushinteger(L, i);
      lua_pushcclosure(L, load_embedded, 1);
      lua_rawset(L, -4);
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

/* require "workerpool"   [-0, +1, e] */
WP_API int luaopen_workerpool(lua_State *L) {
  static uv_once_t pinned = UV_ONCE_INIT;
  const luaL_Reg *f;
  char name[64];
  uv_once(&pinned, pin_module);
  wp_set_event_handler(wpl_log_event);
  for (f = module_funcs; f->name; f++) {
    snprintf(name, sizeof name, "workerpool.%s", f->name);
    wp_register_cfunction(name, f->func);
  }
  luaL_newmetatable(L, WPL_POOL_MT);
  luaL_newmetatable(L, WPL_FUTURE_MT);
  fill_class(L, lua_absindex(L, -2), pool_methods, pool_meta);
  fill_class(L, lua_absindex(L, -1), future_methods, future_meta);
  lua_pop(L, 2);
  wpl_shared_init(L);
  wpl_host_init(L);
  wpl_metrics_init(L);
  wpl_policy_init(L);
  preload_embedded(L);
  luaL_newlib(L, module_funcs);
  wpl_json_open(L);
  wpl_redis_open(L);
  lua_pushliteral(L, WP_VERSION);
  lua_setfield(L, -2, "_VERSION");
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, module_index);
  lua_setfield(L, -2, "__index");
  lua_setmetatable(L, -2);
  return 1;
}
