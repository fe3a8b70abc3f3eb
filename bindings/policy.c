/*
 * policy.c: the hooks that policies written in Lua (lua/workerpool/)
 * plug into: admission before a task is queued, and completion after it
 * ended, both in the submitting state.
 *
 * pool:use(policy) attaches a table with admit(self, task) and, optionally,
 * undo(self, task) and done(self, task, outcome, duration_s).  Policies are
 * per state and pool: each state that submits to a pool attaches its own
 * (sharing their counters through workerpool.shared dictionaries).
 *
 * Completion must run on the submitter's thread, never in a worker.  In a
 * host state the host loop delivers it; elsewhere the core's callback puts
 * the future in a per-state mailbox that the state empties at its next
 * workerpool call (submit, wait, stats, stop, workerpool.poll).
 *
 * Registry (keys are addresses of statics below):
 *   uses_key    light userdata pool -> {handle = <borrowed pool>, ...}
 *   pending_key light userdata future -> {policies, task, future userdata}
 *   box_key     the state's mailbox (userdata with __gc)
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "lbind.h"

static const char uses_key = 'u', pending_key = 'p', box_key = 'b';

/* Whether any state ever attached a policy: until then, submits and waits
 * skip every lookup here. */
static atomic_int any_policy;

#define MAILBOX_MT "workerpool.mailbox"

/* Futures that ended, from worker threads to one state. */
typedef struct mailbox {
  atomic_int refs; /* the state's box and each pending callback */
  uv_mutex_t mu;
  int closed; /* the state is gone: callbacks just release */
  wp_future **v;
  size_t n, cap;
} mailbox;

static void mailbox_release(mailbox *mb) {
  size_t i;
  if (atomic_fetch_sub(&mb->refs, 1) != 1) return;
  for (i = 0; i < mb->n; i++)
    wp_future_release(mb->v[i]);
  uv_mutex_destroy(&mb->mu);
  free(mb->v);
  free(mb);
}

static void mailbox_cb(wp_future *f, void *ud) {
  mailbox *mb = ud;
  int kept = 0;
  uv_mutex_lock(&mb->mu);
  if (!mb->closed) {
    if (mb->n == mb->cap) {
      size_t cap = mb->cap ? mb->cap * 2 : 32;
      wp_future **v = realloc(mb->v, cap * sizeof *v);
      if (v) {
        mb->v = v;
        mb->cap = cap;
      }
    }
    if (mb->n < mb->cap) {
      mb->v[mb->n++] = f;
      kept = 1;
    }
  }
  uv_mutex_unlock(&mb->mu);
  if (!kept) wp_future_release(f); /* its done hooks are lost: no memory */
  mailbox_release(mb);
}

/* __gc of the state's mailbox box.   [-0, +0, -] */
static int box_gc(lua_State *L) {
  mailbox **box = luaL_checkudata(L, 1, MAILBOX_MT);
  if (*box) {
    uv_mutex_lock(&(*box)->mu);
    (*box)->closed = 1;
    uv_mutex_unlock(&(*box)->mu);
    mailbox_release(*box);
    *box = NULL;
  }
  return 0;
}

/* [-0, +0, m] The state's mailbox, created on first use (NULL: no
 * memory). */
static mailbox *state_mailbox(lua_State *L) {
  mailbox **box;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &box_key);
  box = lua_touserdata(L, -1);
  lua_pop(L, 1);
  if (box) return *box;
  box = lua_newuserdatauv(L, sizeof *box, 0);
  *box = NULL;
  luaL_setmetatable(L, MAILBOX_MT);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &box_key);
  if ((*box = calloc(1, sizeof **box)) == NULL) return NULL;
  if (uv_mutex_init(&(*box)->mu)) {
    free(*box);
    *box = NULL;
    return NULL;
  }
  atomic_init(&(*box)->refs, 1);
  return *box;
}

void wpl_policy_init(lua_State *L) {
  luaL_newmetatable(L, MAILBOX_MT);
  lua_pushcfunction(L, box_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
}

/* [-0, +1, m] Pushes this state's policy list for p, or nil. */
static int push_uses(lua_State *L, wp_pool *p) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &uses_key);
  if (lua_isnil(L, -1)) return LUA_TNIL;
  lua_rawgetp(L, -1, p);
  lua_remove(L, -2);
  return lua_type(L, -1);
}

int wpl_policy_use(lua_State *L, wp_pool *p) {
  luaL_checktype(L, 2, LUA_TTABLE);
  if (lua_getfield(L, 2, "admit") != LUA_TFUNCTION)
    luaL_argerror(L, 2, "a policy needs an admit function");
  if (lua_getfield(L, 2, "done") > LUA_TNIL && !lua_isfunction(L, -1))
    luaL_argerror(L, 2, "done must be a function");
  if (lua_getfield(L, 2, "undo") > LUA_TNIL && !lua_isfunction(L, -1))
    luaL_argerror(L, 2, "undo must be a function");
  lua_settop(L, 2);
  if (push_uses(L, p) == LUA_TNIL) {
    lua_pop(L, 1);
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &uses_key) == LUA_TNIL) {
      lua_pop(L, 1);
      lua_newtable(L);
      lua_pushvalue(L, -1);
      lua_rawsetp(L, LUA_REGISTRYINDEX, &uses_key);
    }
    lua_newtable(L);
    wpl_push_borrowed(L, p); /* keeps p's memory, so its address stays p's */
    lua_setfield(L, -2, "handle");
    lua_pushvalue(L, -1);
    lua_rawsetp(L, -3, p);
    lua_remove(L, -2);
  }
  lua_pushvalue(L, 2);
  lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
  lua_settop(L, 1);
  atomic_store(&any_policy, 1);
  return 1;
}

/* [-0, +0, e] Calls list[i]:undo(task) for i = n down to 1, where the list
 * is at idx and the task at task. */
static void undo_upto(lua_State *L, int list, int task, lua_Integer n) {
  lua_Integer i;
  for (i = n; i >= 1; i--) {
    lua_rawgeti(L, list, i);
    if (lua_getfield(L, -1, "undo") == LUA_TFUNCTION) {
      lua_insert(L, -2);
      lua_pushvalue(L, task);
      lua_call(L, 2, 0);
    } else {
      lua_pop(L, 2);
    }
  }
}

int wpl_policy_admit(lua_State *L, wp_pool *p, const wp_task_opts *o) {
  lua_Integer i, n;
  int list, task;
  if (!atomic_load_explicit(&any_policy, memory_order_relaxed)) return 0;
  wpl_policy_poll(L);
  if (push_uses(L, p) == LUA_TNIL) {
    lua_pop(L, 1);
    return 0;
  }
  list = lua_gettop(L);
  lua_createtable(L, 0, 4);
  task = lua_gettop(L);
  if (o->name) {
    lua_pushstring(L, o->name);
    lua_setfield(L, task, "name");
  }
  if (o->tenant) {
    lua_pushstring(L, o->tenant);
    lua_setfield(L, task, "tenant");
  }
  lua_pushstring(L, wp_pool_name(p));
  lua_setfield(L, task, "pool");
  n = (lua_Integer)lua_rawlen(L, list);
  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, list, i);
    lua_getfield(L, -1, "admit");
    lua_insert(L, -2);
    lua_pushvalue(L, task);
    if (lua_pcall(L, 2, 2, 0) != LUA_OK) { /* give back, then re-raise */
      undo_upto(L, list, task, i - 1);
      lua_error(L);
    }
    if (lua_toboolean(L, -2)) {
      lua_pop(L, 2);
      continue;
    }
    /* Refused: give back what the earlier ones took. */
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      lua_pushliteral(L, "policy");
    }
    undo_upto(L, list, task, i - 1);
    wp_pool_count_drop(p, WP_DROP_POLICY);
    lua_pushnil(L);
    lua_replace(L, list); /* list task ok reason -> nil reason */
    lua_replace(L, task);
    lua_pop(L, 1);
    return -1;
  }
  lua_remove(L, list);
  return 1;
}

/* The completion of one tracked task, as a C closure with upvalues: the
 * policy list, the task table and the future userdata.  Every done hook
 * runs, in order; one that raises is logged and does not stop the others.
 * [-0, +0, m] */
static int run_done(lua_State *L) {
  static const char *const outcomes[] = {"pending",   "ok",        "error",
                                         "discarded", "cancelled", "timeout"};
  wp_future **fu = lua_touserdata(L, lua_upvalueindex(3));
  wp_status st = wp_future_status(*fu);
  double duration = wp_future_run_time(*fu);
  lua_Integer i, n = (lua_Integer)lua_rawlen(L, lua_upvalueindex(1));
  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, lua_upvalueindex(1), i);
    if (lua_getfield(L, -1, "done") == LUA_TFUNCTION) {
      lua_insert(L, -2);
      lua_pushvalue(L, lua_upvalueindex(2));
      lua_pushstring(L, outcomes[st]);
      lua_pushnumber(L, duration);
      if (lua_pcall(L, 4, 0, 0) != LUA_OK) {
        wpl_log(WPL_ERROR, "policy.error",
                json_pack("{s:o}", "error", wpl_json_str(lua_tostring(L, -1))));
        lua_pop(L, 1);
      }
    } else {
      lua_pop(L, 2);
    }
  }
  return 0;
}

/* Host delivery: runs the tracked hooks of the future in upvalue 1 unless
 * a wait already did.   [-0, +0, m] */
static int finish_cb(lua_State *L) {
  wp_future **fu = lua_touserdata(L, lua_upvalueindex(1));
  wpl_policy_finish(L, *fu);
  return 0;
}

void wpl_policy_track(lua_State *L, wp_pool *p, int task, int fut) {
  wp_future **fu = lua_touserdata(L, fut);
  mailbox *mb;
  task = lua_absindex(L, task);
  fut = lua_absindex(L, fut);
  push_uses(L, p);
  lua_pushvalue(L, task);
  lua_pushvalue(L, fut);
  lua_pushcclosure(L, run_done, 3);
  /* Remembered until it runs: at the end (host loop or mailbox), or
   * earlier when the state waits for the task (wpl_policy_finish). */
  lua_rawgetp(L, LUA_REGISTRYINDEX, &pending_key);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &pending_key);
  }
  lua_insert(L, -2);
  lua_rawsetp(L, -2, *fu);
  lua_pop(L, 1);
  lua_pushvalue(L, fut);
  lua_pushcclosure(L, finish_cb, 1);
  if (wpl_host_watch(L, *fu)) return; /* the host loop runs finish_cb */
  lua_pop(L, 1);
  if ((mb = state_mailbox(L)) == NULL) luaL_error(L, "not enough memory");
  atomic_fetch_add(&mb->refs, 1);
  wp_future_retain(*fu);
  if (wp_future_on_done(*fu, mailbox_cb, mb) != 0) {
    wp_future_release(*fu);
    mailbox_release(mb);
    luaL_error(L, "not enough memory");
  }
}

void wpl_policy_undo(lua_State *L, wp_pool *p, int task) {
  task = lua_absindex(L, task);
  if (push_uses(L, p) == LUA_TTABLE)
    undo_upto(L, lua_gettop(L), task, (lua_Integer)lua_rawlen(L, -1));
  lua_pop(L, 1);
}

void wpl_policy_finish(lua_State *L, wp_future *f) {
  int top = lua_gettop(L);
  if (!atomic_load_explicit(&any_policy, memory_order_relaxed)) return;
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &pending_key) == LUA_TTABLE &&
      lua_rawgetp(L, -1, f) == LUA_TFUNCTION) {
    lua_pushnil(L);
    lua_rawsetp(L, -3, f); /* the mailbox will only release it */
    lua_call(L, 0, 0);
  }
  lua_settop(L, top);
}

void wpl_policy_poll(lua_State *L) {
  mailbox **box;
  wp_future **v;
  size_t n, i;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &box_key);
  box = lua_touserdata(L, -1);
  lua_pop(L, 1);
  if (box == NULL || *box == NULL) return;
  uv_mutex_lock(&(*box)->mu);
  v = (*box)->v;
  n = (*box)->n;
  (*box)->v = NULL;
  (*box)->n = (*box)->cap = 0;
  uv_mutex_unlock(&(*box)->mu);
  if (n == 0) {
    free(v);
    return;
  }
  /* From here until every future is released, errors must not unwind:
   * each hook runs under lua_pcall and its error is logged. */
  lua_rawgetp(L, LUA_REGISTRYINDEX, &pending_key);
  for (i = 0; i < n; i++) {
    if (lua_istable(L, -1)) {
      if (lua_rawgetp(L, -1, v[i]) == LUA_TFUNCTION) {
        lua_pushnil(L);
        lua_rawsetp(L, -3, v[i]);
        if (lua_pcall(L, 0, 0, 0) != LUA_OK) {
          wpl_log(
              WPL_ERROR, "policy.error",
              json_pack("{s:o}", "error", wpl_json_str(lua_tostring(L, -1))));
          lua_pop(L, 1);
        }
      } else {
        lua_pop(L, 1);
      }
    }
    wp_future_release(v[i]);
  }
  lua_pop(L, 1);
  free(v);
}
