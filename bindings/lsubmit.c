/*
 * lsubmit.c: the submitting methods of a pool handle: pool:submit,
 * pool:post, pool:submit_wait and pool:map.
 *
 * A submit reads the task (a function, a handler name, or a descriptor
 * table with fn or handler, name, tenant and timeout), asks the pool's
 * policies (policy.c), queues the task through the core and pushes its
 * future.  With on_full = "block", a host coroutine waits for room without
 * blocking the loop (submit_k); any other caller blocks its thread in the
 * core.  submit_wait then waits for the future like f:wait, and raises the
 * task's error.  Misuse raises; runtime failures return nil, message, NAME.
 */
#include <math.h>
#include <string.h>

#include "lbind.h"
#include "wp_internal.h" /* wp__fn_record, wp__submit_lua_rec */

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

/* The last Lua function this state submitted, with its message record,
 * so that submitting it again copies the record instead of looking it up
 * and encoding it (see wpl_push_fncache).  One per state: the third
 * upvalue of the pool methods. */
typedef struct fncache {
  const void *fn;      /* anchored in the uservalue; NULL: none */
  const void *refused; /* the last function without a record: a hint only,
                          not anchored */
  int nenv;            /* its upvalues, each the global table when cached */
  size_t len;
  char rec[256];
} fncache;

#define FNCACHE_UPVALUE lua_upvalueindex(4)

int wpl_push_fncache(lua_State *L) {
  fncache *c = lua_newuserdatauv(L, sizeof *c, 1);
  c->fn = c->refused = NULL;
  c->nenv = 0;
  c->len = 0;
  return 1;
}

/* [-0, +0, e] wp_submit_lua_opts, through the state's function cache. */
static int submit_plain(lua_State *L, wp_pool *p, int task, int nargs,
                        const char *what, wp_task_opts *o, wp_future **out) {
  fncache *c;
  const void *fn;
  int r;
  if (lua_type(L, task) != LUA_TFUNCTION ||
      (c = lua_touserdata(L, FNCACHE_UPVALUE)) == NULL)
    return wp_submit_lua_opts(p, L, task, nargs, what, o, out);
  fn = lua_topointer(L, task);
  if (fn == c->fn && (c->nenv == 0 || wp__fn_env_only(L, task, c->nenv)))
    return wp__submit_lua_rec(p, L, task, nargs, what, o, out, c->rec, c->len);
  r = wp_submit_lua_opts(p, L, task, nargs, what, o, out);
  if (r == 0 && fn != c->refused) { /* sent now: keep its record */
    c->fn = NULL;
    if (wp__fn_record(L, task, c->rec, sizeof c->rec, &c->len, &c->nenv)) {
      lua_pushvalue(L, task);
      lua_setiuservalue(L, FNCACHE_UPVALUE, 1);
      c->fn = fn;
    } else {
      c->refused = fn;
    }
  }
  return r;
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
  if (!tt) return submit_plain(L, p, task, nargs, what, o, out);
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
  wpl_pool *u = wpl_checkpool(L);
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
    if (!then_wait) return 3; /* submit: nil, the reason, its NAME */
    lua_pop(L, 1);
    return lua_error(L); /* submit_wait raises the reason */
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
    r = submit_plain(L, u->p, task, nargs, what, &o, NULL);
    if (r) return wpl_pusherr(L, r);
    lua_pushboolean(L, 1);
    return 1;
  }
  fu = lua_newuserdatauv(L, sizeof *fu, 0);
  fu->cls = wpl_future_class;
  fu->f = NULL;
  fu->kind = WPL_LIVE;
  fu->tracked = 0;
  lua_pushvalue(L, WPL_FUTURE_MT_UPVALUE);
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
int wpl_pool_submit(lua_State *L) {
  return submit(L, "submit", RET_FUTURE);
}

/* pool:post(task, ...) -> true | nil, "stopped" | nil, "full"
 * [-0, +1|3, e] submit without a future: nobody waits for the task, and an
 * error it raises is logged as a task_error event. */
int wpl_pool_post(lua_State *L) {
  return submit(L, "post", RET_TRUE);
}

/* [-0, +n, e] Pushes the results of the ended future f of the userdata at
 * 1; raises its error, or for a task that did not run the outcome of
 * wpl_push_outcome with its context: "task discarded: pool 'x' was
 * stopped", "task cancelled", "timeout". */
static int finish_wait(lua_State *L, wp_future *f, const char *pool) {
  int n;
  wp_status st;
  if (wpl_future_detach(L, 1))
    return wpl_future_results(L, lua_touserdata(L, 1));
  n = wpl_push_outcome(L, f);
  if (lua_toboolean(L, -n)) return n - 1; /* true, results... */
  switch ((st = wp_future_status(f))) {
  case WP_DISCARDED:
    return luaL_error(L, "task %s: pool '%s' was stopped", wp_status_name(st),
                      pool);
  case WP_CANCELLED:
    return luaL_error(L, "task %s", wp_status_name(st));
  case WP_TIMEOUT:
    return luaL_error(L, "%s", wp_status_name(st));
  default: /* the task's error value */
    return lua_error(L);
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

/* [-0, +0, e] Raises when called from a task of the pool at 1: `what`
 * would wait for `whom` of its own pool; `advice` says what to use. */
static void refuse_own_pool(lua_State *L, const char *what, const char *whom,
                            const char *advice) {
  wpl_pool *u = wpl_checkpool(L);
  if (wp_state_pool(L) == u->p)
    luaL_error(L,
               "%s from a task of pool '%s' would deadlock (the task would "
               "wait for %s of its own pool); use %s",
               what, wp_pool_name(u->p), whom, advice);
}

/* pool:map(task, list [, opts]) -> results | nil, err, code
 * [-0, +1|3, e] Written in Lua (lua/workerpool/map.lua); called with
 * lua_callk so that its waits can suspend a host coroutine. */
int wpl_pool_map(lua_State *L) {
  int nargs;
  refuse_own_pool(L, "map", "workers", "another pool");
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
int wpl_pool_submit_wait(lua_State *L) {
  int n;
  refuse_own_pool(L, "submit_wait", "a worker", "submit, or another pool");
  n = submit(L, "submit_wait", RET_WAIT);
  if (n != 1) return n;
  return submit_wait_from(L, lua_touserdata(L, -1));
}
