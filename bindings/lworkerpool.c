/*
 * lworkerpool.c: the `workerpool` Lua module: pools, futures and the
 * functions every state gets (worker_id, pool_name, sleep, now, get).
 * Submitting lives in lsubmit.c.
 *
 * A pool handle is a userdata holding a reference to a core pool.  The
 * handle made by workerpool.new owns the pool: collecting it drains and
 * stops the pool.  Handles from workerpool.get borrow it: collecting one
 * changes nothing.  Closing any handle (a <close> variable) is an explicit
 * stop_wait.
 * A future userdata holds a reference to its core future until a wait saw
 * the task end ok with at most one small result: it then keeps that result
 * itself and drops the core future (wpl_future_detach), so that collecting
 * it, or closing the state, calls no finalizer.
 * Misuse raises; runtime failures return nil, message, NAME (lbind.h).
 */
#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "http.h" /* wpl_http_atfork */
#include "lbind.h"
#include "lpipeline.h"
#include "options.h"
#include "wpool_host.h"
#include "wp_internal.h" /* wp__future_scalar, wp__fork_watch */

const char wpl_pool_class[] = WPL_POOL_MT;
const char wpl_future_class[] = WPL_FUTURE_MT;

void wpl_gc_metatable(lua_State *L, const char *name, lua_CFunction gc) {
  luaL_newmetatable(L, name);
  lua_pushcfunction(L, gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
}

int wpl_pusherr(lua_State *L, int err) {
  lua_pushnil(L);
  lua_pushstring(L, wp_strerror(err));
  lua_pushstring(L, wp_err_name(err));
  return 3;
}

const char *wpl_refusal_name(wp_drop_reason why) {
  switch (why) {
#define WPL__NAME(name, str)                                                   \
  case WP_DROP_##name:                                                         \
    return "E" #name;
    WP_DROP_MAP(WPL__NAME)
#undef WPL__NAME
  }
  return "EPOLICY";
}

/* [-0, +0, v] The future userdata at idx, or raises. */
static wpl_future *tofuture(lua_State *L, int idx) {
  /* A light userdata has a pointer but a raw length of 0: it fails the
   * size check before its pointer is read. */
  wpl_future *u = lua_touserdata(L, idx);
  if (u == NULL || lua_rawlen(L, idx) != sizeof *u ||
      u->cls != wpl_future_class)
    luaL_typeerror(L, idx, WPL_FUTURE_MT);
  return u;
}

static wpl_future *checkfuture(lua_State *L) {
  wpl_future *u = tofuture(L, 1);
  if (u->kind == WPL_LIVE && u->f == NULL)
    luaL_error(L, "attempt to use an empty future");
  return u;
}

/* ---- workerpool.new -------------------------------------------------- */

/* What workerpool.new reads from its options (the rows of
 * core/options.c): a wp_options and the options the bindings keep. */
typedef struct new_args {
  wp_options o;
  const char *init_file;
  int tenant_label_limit;
  /* By row: 0 when the key was absent; else 1, or for a string the
   * stack index where it stays anchored. */
  int given[WP__OPT_MAX];
} new_args;

/* The length of string option k, given. */
static size_t given_len(lua_State *L, const new_args *a, const char *k) {
  return lua_rawlen(L, a->given[wp__option_find(k) - wp__options]);
}

/* Where the value of row d goes.  Of the rows the bindings keep,
 * init_file is the string and tenant_label_limit the number. */
static void *slot_of(new_args *a, const wp__option *d) {
  if (d->offset != WP__OPT_NOFIELD) return (char *)&a->o + d->offset;
  if (d->type == WP__OPT_STRING) return &a->init_file;
  return &a->tenant_label_limit;
}

/* [-0, +0, e] Raises on a key of opts that is not an option. */
static void check_option_names(lua_State *L) {
  lua_pushnil(L);
  while (lua_next(L, 1)) {
    lua_pop(L, 1);
    if (lua_type(L, -1) != LUA_TSTRING ||
        wp__option_find(lua_tostring(L, -1)) == NULL)
      luaL_error(L, "workerpool.new: unknown option '%s'",
                 luaL_tolstring(L, -1, NULL));
  }
}

/* [-0, +0, e] Raises "workerpool.new: NAME must ..." for row d. */
static int option_error(lua_State *L, const wp__option *d) {
  return luaL_error(L, "workerpool.new: %s %s", d->name, d->must);
}

/* [-0, +0|1, e] Reads row d of the options at 1 into a, or raises.  A
 * string stays on the stack (anchored there); other values are popped. */
static void read_option(lua_State *L, new_args *a, const wp__option *d) {
  void *at = slot_of(a, d);
  int t = lua_getfield(L, 1, d->name), ok;
  double v;
  lua_Integer i;
  a->given[d - wp__options] = t != LUA_TNIL;
  if (d->type == WP__OPT_STRING) {
    if (t != LUA_TNIL && t != LUA_TSTRING) option_error(L, d);
    *(const char **)at = lua_tostring(L, -1); /* NULL when absent */
    if (t != LUA_TNIL) a->given[d - wp__options] = lua_gettop(L);
    return;
  }
  if (t == LUA_TNIL) {
    if (d->flags & WP__OPT_REQUIRED) option_error(L, d);
    lua_pop(L, 1);
    v = d->def;
  } else if (d->type == WP__OPT_CHOICE) {
    const char *w = lua_tostring(L, -1);
    for (i = 0; t == LUA_TSTRING && d->choices[i]; i++)
      if (strcmp(w, d->choices[i]) == 0) break;
    if (t != LUA_TSTRING || d->choices[i] == NULL) option_error(L, d);
    lua_pop(L, 1);
    v = (double)i;
  } else if (d->type == WP__OPT_SECONDS) {
    v = t == LUA_TNUMBER ? (double)lua_tonumber(L, -1) : NAN;
    if (!wp__option_in_range(d, v)) option_error(L, d);
    lua_pop(L, 1);
  } else { /* an integer */
    i = lua_tointegerx(L, -1, &ok);
    v = (double)i;
    if (t != LUA_TNUMBER || !ok || v < d->min) option_error(L, d);
    if (v > d->max)
      luaL_error(L, "workerpool.new: %s %s (at most %I)", d->name, d->must,
                 (LUAI_UACINT)d->max);
    lua_pop(L, 1);
  }
  if (d->type == WP__OPT_SECONDS)
    *(double *)at = v;
  else if (d->type == WP__OPT_SIZE)
    *(size_t *)at = (size_t)v;
  else
    *(int *)at = (int)v;
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
  new_args a;
  wp_options o;
  const wp__option *d;
  wpl_pool *u;
  char err[4096], *file = NULL, initname[512];
  const char *init_file;
  size_t len = 0, name_len = 0;
  int r, saved, label_limit, pkg;
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  check_option_names(L);
  memset(&a, 0, sizeof a);
  wp_options_init(&a.o);
  for (d = wp__options; d->name; d++) {
    read_option(L, &a, d);
    if (d->offset == offsetof(wp_options, min_workers) &&
        a.o.min_workers > a.o.max_workers)
      luaL_error(L, "workerpool.new: %s %s (at most %d)", d->name, d->must,
                 a.o.max_workers);
    if (d->offset == offsetof(wp_options, block_when_full) &&
        a.given[d - wp__options] && a.o.queue_cap == 0)
      luaL_error(L, "workerpool.new: on_full needs a queue_cap");
  }
  o = a.o;
  init_file = a.init_file;
  label_limit = a.tenant_label_limit;
  if (o.name) name_len = given_len(L, &a, "name");
  /* A name shows in logs and metric labels, which hold only UTF-8. */
  if (o.name && strlen(o.name) != name_len)
    luaL_argerror(L, 1, "name must not contain '\\0'");
  if (o.name && !wpl_utf8_valid(o.name, name_len))
    luaL_argerror(L, 1, "name must be valid UTF-8");
  if (init_file && strlen(init_file) != given_len(L, &a, "init_file"))
    luaL_argerror(L, 1, "init_file must not contain '\\0'");
  if (o.init && init_file)
    luaL_error(L, "workerpool.new: init and init_file are mutually "
                  "exclusive");
  if (o.init) {
    o.init_len = given_len(L, &a, "init");
    o.init_name = "=init";
  }
  if (init_file) snprintf(initname, sizeof initname, "@%s", init_file);
  pkg = lua_gettop(L) + 1;
  if (lua_getglobal(L, "package") == LUA_TTABLE) {
    o.package_path = str_option(L, pkg, "path");
    o.package_cpath = str_option(L, pkg, "cpath");
  }
  o.open_state = open_worker;
  u = lua_newuserdatauv(L, sizeof *u, 0);
  u->cls = wpl_pool_class;
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
  u->cls = wpl_pool_class;
  u->p = NULL;
  u->owner = 0;
  luaL_setmetatable(L, WPL_POOL_MT);
  /* No pool name holds '\0': "a\0b" is not pool "a". */
  if (strlen(name) != len || (u->p = wp_pool_find(name)) == NULL)
    lua_pushnil(L);
  return 1;
}

/* ---- pool methods ---------------------------------------------------- */

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
  wpl_pool *u = wpl_checkpool(L);
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
  wp_pool_resume(wpl_checkpool(L)->p);
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
  wp_pool_get_counts(wpl_checkpool(L)->p, &c);
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
  return wpl_push_stats(L, wpl_checkpool(L)->p);
}

/* pool:use(policy) / pool:use("module", opts) -> pool   [-0, +1, e]
 * Attaches to the pool for every submitting state; see docs/policies.md. */
static int pool_use(lua_State *L) {
  return wpl_policy_use(L, wpl_checkpool(L)->p);
}

/* pool:inspect() -> {workers = {{id =, state =, task =, tenant =,
 * running_s =, overdue =, tasks_done =, memory =}, ...}, queued =,
 * oldest_queued_s =, wedged =}   [-0, +1, e] */
static int pool_inspect(lua_State *L) {
  return wpl_push_inspect(L, wpl_checkpool(L)->p);
}

/* pool:policies() -> {{name =, module =, fn =, local =}, ...}
 * [-0, +1, e] */
static int pool_policies(lua_State *L) {
  return wpl_policy_list(L, wpl_checkpool(L)->p);
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
  u->cls = wpl_pool_class;
  u->p = NULL;
  u->owner = 0;
  luaL_setmetatable(L, WPL_POOL_MT);
  wp_pool_retain(p);
  u->p = p;
}

/* pool:resize(n)   [-0, +0, e] Changes max_workers while running. */
static int pool_resize(lua_State *L) {
  wpl_pool *u = wpl_checkpool(L);
  lua_Integer n = luaL_checkinteger(L, 2);
  const wp__option *d = wp__option_find("max_workers");
  int r;
  if (!wp__option_in_range(d, (double)n))
    return luaL_argerror(L, 2,
                         lua_pushfstring(L, "%s %s (at most %I)", d->name,
                                         d->must, (LUAI_UACINT)d->max));
  r = wp_pool_resize(u->p, (int)n);
  if (r == WP_EINVAL)
    return luaL_argerror(L, 2, "must not be below min_workers");
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
  lua_pushstring(L, wp_pool_name(wpl_checkpool(L)->p));
  return 1;
}

/* __close: drains and stops the pool, suspending only the calling host
 * coroutine under a host loop, as stop_wait does.   [-0, +0|1, e] */
static int pool_close(lua_State *L) {
  wpl_pool *u = wpl_topool(L, 1);
  if (u->p == NULL) return 0;
  if (wp_state_pool(L) == u->p)
    check_deadlock(L, u, WP_EDEADLOCK, "closing a pool");
  lua_settop(L, 1);
  return pool_op_call(L, OP_STOP_WAIT, -1);
}

/* __gc: an owner handle drains and stops its pool; under a host loop the
 * host finishes that in the background.   [-0, +0, -] */
static int pool_gc(lua_State *L) {
  wpl_pool *u = wpl_topool(L, 1);
  wp_pool *p = u->p;
  u->p = NULL;
  if (p == NULL || (u->owner && wpl_host_adopt(L, p))) return 0;
  if (u->owner) wp_pool_stop_wait(p);
  wp_pool_release(p);
  return 0;
}

/* [-0, +1, m] */
static int pool_tostring(lua_State *L) {
  wpl_pool *u = wpl_topool(L, 1);
  if (u->p)
    lua_pushfstring(L, "workerpool.pool (%s)", wp_pool_name(u->p));
  else
    lua_pushliteral(L, "workerpool.pool (collected)");
  return 1;
}

/* ---- futures --------------------------------------------------------- */

int wpl_future_results(lua_State *L, const wpl_future *u) {
  switch (u->kind) {
  case WPL_ENDED_NONE:
    return 0;
  case WPL_ENDED_NIL:
    lua_pushnil(L);
    break;
  case WPL_ENDED_FALSE:
  case WPL_ENDED_TRUE:
    lua_pushboolean(L, u->kind == WPL_ENDED_TRUE);
    break;
  case WPL_ENDED_INT:
    lua_pushinteger(L, u->i);
    break;
  default:
    lua_pushnumber(L, u->n);
    break;
  }
  return 1;
}

/* [-0, +n, -] What waiting for the detached future u gives: true and its
 * result, if any.  Returns n. */
static int push_ended(lua_State *L, const wpl_future *u) {
  lua_pushboolean(L, 1);
  return 1 + wpl_future_results(L, u);
}

int wpl_future_detach(lua_State *L, int idx) {
  wpl_future *u = lua_touserdata(L, idx);
  wp_value v;
  int n, kind;
  if (u->kind != WPL_LIVE || u->tracked) return 0;
  n = wp__future_scalar(u->f, &v);
  if (n == 0) {
    kind = WPL_ENDED_NONE;
  } else if (n != 1) {
    return 0;
  } else {
    switch (v.type) {
    case WP_TNIL:
      kind = WPL_ENDED_NIL;
      break;
    case WP_TBOOLEAN:
      kind = v.u.b ? WPL_ENDED_TRUE : WPL_ENDED_FALSE;
      break;
    case WP_TINTEGER:
      kind = WPL_ENDED_INT;
      break;
    case WP_TNUMBER:
      kind = WPL_ENDED_FLOAT;
      break;
    default:
      return 0;
    }
  }
  wp_future_release(u->f);
  if (kind == WPL_ENDED_INT)
    u->i = (lua_Integer)v.u.i;
  else if (kind == WPL_ENDED_FLOAT)
    u->n = (lua_Number)v.u.n;
  else
    u->f = NULL;
  u->kind = (unsigned char)kind;
  lua_pushvalue(L, WPL_ENDED_MT_UPVALUE);
  lua_setmetatable(L, idx < 0 ? idx - 1 : idx);
  return 1;
}

/* [-0, +3, m] f:wait's own wait ran out: nil, "timeout", "ETIMEDOUT". */
static int push_timeout(lua_State *L) {
  return wpl_pusherr(L, WP_ETIMEDOUT);
}

/* Continues f:wait in a host coroutine: resumed with true when the task
 * ended, false on timeout. */
static int future_wait_k(lua_State *L, int status, lua_KContext ctx) {
  wpl_future *u = lua_touserdata(L, 1);
  (void)status;
  (void)ctx;
  if (!lua_toboolean(L, -1)) return push_timeout(L);
  lua_settop(L, 1);
  if (u->kind != WPL_LIVE || wpl_future_detach(L, 1)) return push_ended(L, u);
  return wpl_push_outcome(L, u->f);
}

/* f:wait([timeout]) -> true, results... | false, err |
 * nil, "timeout", "ETIMEDOUT"   [-0, +n, e] */
static int future_wait(lua_State *L) {
  wpl_future *u = checkfuture(L);
  double t = -1;
  if (!lua_isnoneornil(L, 2)) {
    t = (double)luaL_checknumber(L, 2);
    luaL_argcheck(L, t >= 0, 2, "timeout must be a non-negative number");
  }
  lua_settop(L, 1);
  if (u->kind != WPL_LIVE) return push_ended(L, u);
  if (wp_future_status(u->f) == WP_PENDING) {
    if (t == 0) return push_timeout(L); /* a poll: never parks or watches */
    if (wpl_host_park_future(L, u->f, t))
      return lua_yieldk(L, 0, 0, future_wait_k);
  }
  if (wp_future_wait(u->f, t) == WP_ETIMEDOUT) return push_timeout(L);
  wpl_policy_finish(L, u->f);
  wpl_policy_poll(L);
  if (wpl_future_detach(L, 1)) return push_ended(L, u);
  return wpl_push_outcome(L, u->f);
}

int wpl_push_outcome(lua_State *L, wp_future *f) {
  wp_status st = wp_future_status(f);
  int n;
  lua_pushboolean(L, st == WP_OK);
  if (st == WP_OK) return 1 + wp_future_push(f, L);
  if (st == WP_ERROR) {
    if ((n = wp_future_push(f, L)) < 1) {
      lua_pushliteral(L, "task failed");
      n = 1;
    }
    return 1 + n;
  }
  lua_pushstring(L, wp_status_name(st));
  return 2;
}

/* f:done() -> boolean   [-0, +1, e] */
static int future_done(lua_State *L) {
  wpl_future *u = checkfuture(L);
  lua_pushboolean(L,
                  u->kind != WPL_LIVE || wp_future_status(u->f) != WP_PENDING);
  return 1;
}

/* f:cancel() -> boolean   [-0, +1, e] */
static int future_cancel(lua_State *L) {
  wpl_future *u = checkfuture(L);
  lua_pushboolean(L, u->kind == WPL_LIVE && wp_future_cancel(u->f));
  return 1;
}

/* f:on_done(cb): cb(ok, ...) runs in a new host coroutine once the task
 * ended.   [-0, +0, e] Needs a host loop. */
static int future_on_done(lua_State *L) {
  wpl_future *u = checkfuture(L);
  int n;
  if (u->kind == WPL_LIVE) return wpl_host_on_done(L, u->f);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_settop(L, 2);
  n = push_ended(L, u);
  return wpl_host_on_done_ended(L, n);
}

/* f:status() -> "pending" | "ok" | "error" | "discarded" | "cancelled" |
 * "timeout"   [-0, +1, e] */
static int future_status(lua_State *L) {
  wpl_future *u = checkfuture(L);
  lua_pushstring(
      L, wp_status_name(u->kind == WPL_LIVE ? wp_future_status(u->f) : WP_OK));
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
  if (u->kind != WPL_LIVE) return 0;
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

int wpl_k_none(lua_State *L, int status, lua_KContext ctx) {
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
  if (wpl_host_park_sleep(L, s)) return lua_yieldk(L, 0, 0, wpl_k_none);
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
    {"in_host", wpl_in_host},
    {"spawn", wpl_spawn},
    {"after", wpl_after},
    {"every", wpl_every},
    {"await", wpl_await},
    {"on_shutdown", wpl_on_shutdown},
    {"log", wpl_lua_log},
    {"set_log_level", wpl_lua_set_log_level},
    {NULL, NULL}};

static const luaL_Reg pool_methods[] = {
    {"submit", wpl_pool_submit}, {"submit_wait", wpl_pool_submit_wait},
    {"post", wpl_pool_post},     {"map", wpl_pool_map},
    {"pause", pool_pause},       {"resume", pool_resume},
    {"stop", pool_stop},         {"stop_wait", pool_stop_wait},
    {"stopped", pool_stopped},   {"waiting", pool_waiting},
    {"running", pool_running},   {"workers", pool_workers},
    {"size", pool_size},         {"stats", pool_stats},
    {"use", pool_use},           {"resize", pool_resize},
    {"name", pool_name},         {"policies", pool_policies},
    {"inspect", pool_inspect},   {NULL, NULL}};

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

/* [-0, +3, m] The upvalues of every method: the three metatables. */
static void push_metatables(lua_State *L) {
  luaL_getmetatable(L, WPL_POOL_MT);
  luaL_getmetatable(L, WPL_FUTURE_MT);
  luaL_getmetatable(L, WPL_ENDED_MT);
}

/* [-0, +0, m] Fills the metatable at mt: `methods` in __index, then the
 * metamethods; each function gets the metatables as upvalues, and the
 * methods of a pool (fncache) the state's function cache (lsubmit.c) as
 * a fourth. */
static void fill_class(lua_State *L, int mt, const luaL_Reg *methods,
                       const luaL_Reg *meta, int fncache) {
  lua_newtable(L);
  push_metatables(L);
  if (fncache) wpl_push_fncache(L);
  luaL_setfuncs(L, methods, fncache ? 4 : 3);
  lua_setfield(L, mt, "__index");
  lua_pushvalue(L, mt);
  push_metatables(L);
  luaL_setfuncs(L, meta, 3);
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

/* ---- fork ------------------------------------------------------------ */

/* The bindings' process-wide locks around a fork (core/fork.c says why).
 * Installed after the core's, so they are taken before its: metrics' and
 * the policies' registries, held while a pool's lock is taken, first; the
 * rest are leaves. */
static void fork_prepare(void) {
  wpl_metrics_atfork(WP__FORK_PREPARE);
  wpl_policy_atfork(WP__FORK_PREPARE);
  wpl_redis_atfork(WP__FORK_PREPARE);
  wpl_http_atfork(WP__FORK_PREPARE);
  wpl_log_atfork(WP__FORK_PREPARE);
}

static void fork_after(int phase) {
  wpl_log_atfork(phase);
  wpl_http_atfork(phase);
  wpl_redis_atfork(phase);
  wpl_policy_atfork(phase);
  wpl_metrics_atfork(phase);
}

static void fork_parent(void) {
  fork_after(WP__FORK_PARENT);
}

static void fork_child(void) {
  fork_after(WP__FORK_CHILD);
}

static void fork_watch(void) {
  wp__fork_watch();
  (void)pthread_atfork(fork_prepare, fork_parent, fork_child);
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
  static uv_once_t pinned = UV_ONCE_INIT, forks = UV_ONCE_INIT;
  const luaL_Reg *f;
  char name[64];
  uv_once(&pinned, pin_module);
  uv_once(&forks, fork_watch);
  wpl_log_default_sink(); /* an embedder's sink stays */
  for (f = module_funcs; f->name; f++) {
    snprintf(name, sizeof name, "workerpool.%s", f->name);
    wp_register_cfunction(name, f->func);
  }
  luaL_newmetatable(L, WPL_POOL_MT);
  luaL_newmetatable(L, WPL_FUTURE_MT);
  if (luaL_newmetatable(L, WPL_ENDED_MT)) {
    lua_pushliteral(L, WPL_FUTURE_MT); /* what error messages show */
    lua_setfield(L, -2, "__name");
  }
  fill_class(L, lua_absindex(L, -3), pool_methods, pool_meta, 1);
  fill_class(L, lua_absindex(L, -2), future_methods, future_meta, 0);
  lua_getfield(L, -2, "__index"); /* a detached future: the same methods */
  lua_setfield(L, -2, "__index");
  lua_pop(L, 3);
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
