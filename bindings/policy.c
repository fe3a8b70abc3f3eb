/*
 * policy.c: the hooks that policies written in Lua (lua/workerpool/)
 * plug into: admission before a task is queued, and completion after it
 * ended, both in the submitting state.
 *
 * pool:use(policy) attaches a table with admit(self, task) and, optionally,
 * undo(self, task) and done(self, task, outcome, duration_s) to the pool
 * itself.  The pool carries, process-wide, an encoded list of items (one
 * per policy: its module, constructor and options, or a mark that it is
 * local to the state that attached it) and a version; each submitting
 * state rebuilds its own copies when the version changes
 * (lua/workerpool/policy.lua), and the copies share their counters through
 * workerpool.shared dictionaries.
 *
 * Completion must run on the submitter's thread, never in a worker.  In a
 * host state the host loop delivers it; elsewhere the core's callback puts
 * the future in a per-state mailbox that the state empties at its next
 * workerpool call (submit, wait, stats, stop, workerpool.poll).
 *
 * Registry (keys are addresses of statics below):
 *   uses_key    light userdata pool -> {handle = <borrowed pool>, version =,
 *               list = {policies in order}, objs = {[item id] = policy}}
 *   prim_key    the C primitives policy.lua uses (read, store, encodable)
 *   degraded_key  weak table: future userdata -> the refusal it ran
 *               degraded for
 *   pending_key light userdata future -> {policies, task, future userdata}
 *   box_key     the state's mailbox (userdata with __gc)
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "lbind.h"
#include "mailbox.h"
#include "wp_internal.h" /* the codec: items travel as its bytes */

static const char uses_key = 'u', pending_key = 'p', box_key = 'b',
                  prim_key = 'r', degraded_key = 'd', list_key = 'l';

/* Whether any state ever attached a policy: until then, submits and waits
 * skip every lookup here. */
static atomic_int any_policy;

#define MAILBOX_MT "workerpool.mailbox"

/* __gc of the state's mailbox box.   [-0, +0, -] */
static int box_gc(lua_State *L) {
  wpl_mailbox **box = luaL_checkudata(L, 1, MAILBOX_MT);
  if (*box) {
    wpl_mailbox_close(*box); /* callbacks to come just release */
    wpl_mailbox_release(*box);
    *box = NULL;
  }
  return 0;
}

/* [-0, +0, m] The state's mailbox, created on first use (NULL: no
 * memory). */
static wpl_mailbox *state_mailbox(lua_State *L) {
  wpl_mailbox **box;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &box_key);
  box = lua_touserdata(L, -1);
  lua_pop(L, 1);
  if (box) return *box;
  box = lua_newuserdatauv(L, sizeof *box, 0);
  *box = NULL;
  luaL_setmetatable(L, MAILBOX_MT);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &box_key);
  return *box = wpl_mailbox_new(NULL);
}

/* ---- the pools' items, process-wide --------------------------------- */

/* One pool's encoded items.  The entry holds a reference to the pool, so
 * its address names no other pool while the entry lives; entries of
 * stopped pools are dropped at the next store. */
typedef struct spec_entry {
  struct spec_entry *next;
  wp_pool *p;
  uint64_t version; /* process-wide, never reused */
  char *blob;       /* malloc'd codec bytes of the item list */
  size_t len;
} spec_entry;

static uv_once_t reg_once = UV_ONCE_INIT;
static uv_mutex_t reg_mu; /* guards everything below; a leaf lock */
static spec_entry *reg_head;
static uint64_t reg_versions;
static atomic_int state_tokens; /* names states in item ids */

static void reg_init(void) {
  if (uv_mutex_init(&reg_mu)) abort();
}

void wpl_policy_atfork(int phase) {
  if (phase == WP__FORK_CHILD) reg_head = NULL; /* the parent's pools */
  wp__atfork_lock(phase, &reg_once, reg_init, &reg_mu);
}

static spec_entry *reg_find(wp_pool *p) {
  spec_entry *e;
  for (e = reg_head; e; e = e->next)
    if (e->p == p) return e;
  return NULL;
}

/* The version of p's items; 0 when it has none.  Any thread; no Lua. */
static uint64_t reg_version(wp_pool *p) {
  spec_entry *e;
  uint64_t v;
  uv_once(&reg_once, reg_init);
  uv_mutex_lock(&reg_mu);
  e = reg_find(p);
  v = e ? e->version : 0;
  uv_mutex_unlock(&reg_mu);
  return v;
}

/* [-0, +1, m] Pushes p's encoded items (a string) or nil; *version gets
 * their version (0: none).  The copy is made into Lua memory allocated
 * before the lock is taken. */
static void reg_push(lua_State *L, wp_pool *p, uint64_t *version) {
  for (;;) {
    spec_entry *e;
    size_t len;
    uint64_t v;
    char *dst;
    int same;
    uv_once(&reg_once, reg_init);
    uv_mutex_lock(&reg_mu);
    e = reg_find(p);
    v = e ? e->version : 0;
    len = e ? e->len : 0;
    uv_mutex_unlock(&reg_mu);
    *version = v;
    if (v == 0) {
      lua_pushnil(L);
      return;
    }
    dst = lua_newuserdatauv(L, len ? len : 1, 0);
    uv_mutex_lock(&reg_mu);
    e = reg_find(p);
    same = e && e->version == v;
    if (same) memcpy(dst, e->blob, len);
    uv_mutex_unlock(&reg_mu);
    if (same) {
      lua_pushlstring(L, dst, len);
      lua_remove(L, -2);
      return;
    }
    lua_pop(L, 1); /* changed meanwhile: again */
  }
}

/* Replaces p's items by blob (copied) when their version is still
 * `expected`: 1 stored, 0 changed meanwhile, or WP_ENOMEM.  Any thread;
 * no Lua. */
static int reg_store(wp_pool *p, uint64_t expected, const char *blob,
                     size_t len) {
  spec_entry *e, **pp, *dead = NULL, *fresh;
  char *copy = malloc(len ? len : 1);
  fresh = calloc(1, sizeof *fresh);
  if (copy == NULL || fresh == NULL) {
    free(copy);
    free(fresh);
    return WP_ENOMEM;
  }
  memcpy(copy, blob, len);
  uv_once(&reg_once, reg_init);
  uv_mutex_lock(&reg_mu);
  e = reg_find(p);
  if ((e ? e->version : 0) != expected) {
    uv_mutex_unlock(&reg_mu);
    free(copy);
    free(fresh);
    return 0;
  }
  if (e == NULL) {
    e = fresh;
    fresh = NULL;
    wp_pool_retain(p);
    e->p = p;
    e->next = reg_head;
    reg_head = e;
  }
  free(e->blob);
  e->blob = copy;
  e->len = len;
  e->version = ++reg_versions;
  for (pp = &reg_head; *pp;) { /* forget stopped pools */
    wp_pool_counts c;
    wp_pool_get_counts((*pp)->p, &c);
    if (c.stopped && *pp != e) {
      spec_entry *d = *pp;
      *pp = d->next;
      d->next = dead;
      dead = d;
    } else {
      pp = &(*pp)->next;
    }
  }
  uv_mutex_unlock(&reg_mu);
  free(fresh);
  while (dead) {
    e = dead;
    dead = e->next;
    wp_pool_release(e->p);
    free(e->blob);
    free(e);
  }
  return 1;
}

#define ENCBUF_MT "workerpool.policy.buf"

/* __gc of an encoding buffer: frees what a raising encode left.
 * [-0, +0, -] */
static int encbuf_gc(lua_State *L) {
  wp__buf_free(luaL_checkudata(L, 1, ENCBUF_MT));
  return 0;
}

/* [-0, +1, e] Pushes the codec bytes of the value at idx (raises on one
 * that cannot cross states). */
static void push_encoded(lua_State *L, int idx) {
  wp__buf *b;
  idx = lua_absindex(L, idx);
  b = lua_newuserdatauv(L, sizeof *b, 0);
  memset(b, 0, sizeof *b);
  luaL_setmetatable(L, ENCBUF_MT);
  wp__encode(L, b, idx, 1, "use", 2);
  lua_pushlstring(L, b->data, b->len);
  wp__buf_free(b);
  lua_remove(L, -2);
}

/* prim.read(p) -> version, items | 0, nil   [-0, +2, e] */
static int prim_read(lua_State *L) {
  wp_pool *p = lua_touserdata(L, 1);
  uint64_t v, n;
  wp__reader r;
  size_t len;
  const char *s;
  reg_push(L, p, &v);
  lua_pushinteger(L, (lua_Integer)v);
  if (v == 0) {
    lua_pushnil(L);
    return 2;
  }
  s = lua_tolstring(L, -2, &len);
  r.p = s;
  r.end = s + len;
  if (wp__get_varint(&r, &n) != 0 || n != 1)
    return luaL_error(L, "corrupt policy list");
  wp__decode(L, &r, 1, 0);
  return 2;
}

/* prim.store(p, version, items) -> stored   [-0, +1, e] */
static int prim_store(lua_State *L) {
  wp_pool *p = lua_touserdata(L, 1);
  uint64_t v = (uint64_t)luaL_checkinteger(L, 2);
  size_t len;
  const char *s;
  int r;
  push_encoded(L, 3);
  s = lua_tolstring(L, -1, &len);
  if ((r = reg_store(p, v, s, len)) < 0)
    return luaL_error(L, "%s", wp_strerror(r));
  lua_pushboolean(L, r);
  return 1;
}

/* [-0, +1, e] */
static int encode_only(lua_State *L) {
  push_encoded(L, 1);
  return 1;
}

/* prim.encodable(v) -> boolean   [-0, +1, m] */
static int prim_encodable(lua_State *L) {
  lua_settop(L, 1);
  lua_pushcfunction(L, encode_only);
  lua_insert(L, 1);
  lua_pushboolean(L, lua_pcall(L, 1, 1, 0) == LUA_OK);
  return 1;
}

void wpl_policy_init(lua_State *L) {
  static const luaL_Reg prims[] = {{"read", prim_read},
                                   {"store", prim_store},
                                   {"encodable", prim_encodable},
                                   {NULL, NULL}};
  wpl_gc_metatable(L, MAILBOX_MT, box_gc);
  wpl_gc_metatable(L, ENCBUF_MT, encbuf_gc);
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &prim_key) == LUA_TNIL) {
    lua_newtable(L);
    luaL_setfuncs(L, prims, 0);
    lua_pushfstring(L, "s%d", atomic_fetch_add(&state_tokens, 1) + 1);
    lua_setfield(L, -2, "token");
    lua_rawsetp(L, LUA_REGISTRYINDEX, &prim_key);
  }
  lua_pop(L, 1);
}

/* [-0, +1, e] Pushes the function `fn` of lua/workerpool/policy.lua. */
static void push_lua_half(lua_State *L, const char *fn) {
  lua_getglobal(L, "require");
  lua_pushliteral(L, "workerpool.policy");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, fn);
  lua_remove(L, -2);
}

/* [-0, +1, e] Pushes this state's table for p, made on first use. */
static void push_state(lua_State *L, wp_pool *p) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &uses_key) == LUA_TNIL) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &uses_key);
  }
  if (lua_rawgetp(L, -1, p) == LUA_TNIL) {
    lua_pop(L, 1);
    lua_createtable(L, 0, 5);
    wpl_push_borrowed(L, p); /* keeps p's memory, so its address stays p's */
    lua_setfield(L, -2, "handle");
    lua_newtable(L);
    lua_setfield(L, -2, "objs");
    lua_pushstring(L, wp_pool_name(p));
    lua_setfield(L, -2, "pool_name");
    lua_pushvalue(L, -1);
    lua_rawsetp(L, -3, p);
  }
  lua_remove(L, -2);
}

/* [-0, +1, e] Pushes the policy list this state applies to p, rebuilt
 * when p's items changed, or nil when p has none. */
static int push_uses(lua_State *L, wp_pool *p) {
  uint64_t v = reg_version(p);
  if (v == 0) {
    lua_pushnil(L);
    return LUA_TNIL;
  }
  push_state(L, p);
  if (lua_getfield(L, -1, "version") == LUA_TNUMBER &&
      (uint64_t)lua_tointeger(L, -1) == v) {
    lua_pop(L, 1);
    lua_getfield(L, -1, "list");
    lua_remove(L, -2);
    return LUA_TTABLE;
  }
  lua_pop(L, 1);
  push_lua_half(L, "refresh"); /* st refresh */
  lua_pushvalue(L, -2);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &prim_key);
  lua_getfield(L, -1, "read");
  lua_remove(L, -2);
  lua_pushlightuserdata(L, p);
  lua_call(L, 1, 2); /* st refresh st version items */
  v = (uint64_t)lua_tointeger(L, -2);
  lua_remove(L, -2);
  lua_call(L, 2, 1); /* st list */
  lua_pushinteger(L, (lua_Integer)v);
  lua_setfield(L, -3, "version");
  lua_remove(L, -2);
  return LUA_TTABLE;
}

int wpl_policy_use(lua_State *L, wp_pool *p) {
  if (lua_type(L, 2) != LUA_TSTRING) luaL_checktype(L, 2, LUA_TTABLE);
  lua_settop(L, 3);
  push_lua_half(L, "use");
  lua_pushlightuserdata(L, p);
  push_state(L, p);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &prim_key);
  lua_pushvalue(L, 2);
  lua_pushvalue(L, 3);
  /* Checked before it is stored, by the Lua half's callers' rules. */
  if (lua_type(L, 2) == LUA_TTABLE) {
    if (lua_getfield(L, 2, "admit") != LUA_TFUNCTION)
      luaL_argerror(L, 2, "a policy needs an admit function");
    if (lua_getfield(L, 2, "done") > LUA_TNIL && !lua_isfunction(L, -1))
      luaL_argerror(L, 2, "done must be a function");
    if (lua_getfield(L, 2, "undo") > LUA_TNIL && !lua_isfunction(L, -1))
      luaL_argerror(L, 2, "undo must be a function");
    lua_pop(L, 3);
  }
  lua_call(L, 5, 0);
  atomic_store(&any_policy, 1);
  lua_settop(L, 1);
  return 1;
}

int wpl_policy_list(lua_State *L, wp_pool *p) {
  push_lua_half(L, "list");
  lua_pushlightuserdata(L, p);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &prim_key);
  lua_call(L, 2, 1);
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

int wpl_policy_admit(lua_State *L, wp_pool *p, const wp_task_opts *o,
                     int tslot) {
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
  lua_pushvalue(L, list); /* undo and done use the list admit used */
  lua_rawsetp(L, task, &list_key);
  n = (lua_Integer)lua_rawlen(L, list);
  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, list, i);
    lua_getfield(L, -1, "admit");
    lua_insert(L, -2);
    lua_pushvalue(L, task);
    if (lua_pcall(L, 2, 3, 0) != LUA_OK) { /* give back, then re-raise */
      undo_upto(L, list, task, i - 1);
      lua_error(L);
    }
    if (lua_toboolean(L, -3)) {
      lua_pop(L, 3);
      continue;
    }
    /* Refused: give back what the earlier ones took. */
    if (lua_isnil(L, -2)) {
      lua_pushliteral(L, "policy");
      lua_replace(L, -3);
    }
    undo_upto(L, list, task, i - 1);
    if (lua_type(L, -1) == LUA_TSTRING) { /* degraded: run this handler */
      lua_replace(L, tslot);
      lua_replace(L, list); /* list task ok -> reason task ok */
      lua_settop(L, list);
      wpl_metrics_admission(p, o->tenant, 1, NULL);
      return 2;
    }
    lua_pop(L, 1);
    wpl_metrics_admission(p, o->tenant, 0, lua_tostring(L, -1));
    lua_pushnil(L);
    lua_replace(L, list); /* list task ok reason -> nil task ok reason */
    lua_replace(L, task); /* -> nil reason ok; ok becomes the NAME */
    lua_pushstring(L, wpl_refusal_name(wpl_refusal_class(lua_tostring(L, -2))));
    lua_replace(L, -2);
    return -1;
  }
  lua_remove(L, list);
  wpl_metrics_admission(p, o->tenant, 1, NULL);
  return 1;
}

/* [-0, +0, m] Remembers that the future at fut runs degraded, for the
 * refusal at why. */
void wpl_policy_mark_degraded(lua_State *L, int fut, int why) {
  fut = lua_absindex(L, fut);
  why = lua_absindex(L, why);
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &degraded_key) == LUA_TNIL) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "k");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &degraded_key);
  }
  lua_pushvalue(L, fut);
  lua_pushvalue(L, why);
  lua_rawset(L, -3);
  lua_pop(L, 1);
}

int wpl_policy_degraded(lua_State *L, int fut) {
  fut = lua_absindex(L, fut);
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &degraded_key) == LUA_TTABLE) {
    lua_pushvalue(L, fut);
    lua_rawget(L, -2);
    lua_remove(L, -2);
  }
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_pushboolean(L, 0);
  }
  return 1;
}

/* The completion of one tracked task, as a C closure with upvalues: the
 * policy list, the task table and the future userdata.  Every done hook
 * runs, in order; one that raises is logged and does not stop the others.
 * [-0, +0, m] */
static int run_done(lua_State *L) {
  wpl_future *fu = lua_touserdata(L, lua_upvalueindex(3));
  wp_status st = wp_future_status(fu->f); /* tracked: never detached */
  double duration = wp_future_run_time(fu->f);
  lua_Integer i, n = (lua_Integer)lua_rawlen(L, lua_upvalueindex(1));
  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, lua_upvalueindex(1), i);
    if (lua_getfield(L, -1, "done") == LUA_TFUNCTION) {
      lua_insert(L, -2);
      lua_pushvalue(L, lua_upvalueindex(2));
      lua_pushstring(L, wp_status_name(st));
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
  wpl_future *fu = lua_touserdata(L, lua_upvalueindex(1));
  wpl_policy_finish(L, fu->f);
  return 0;
}

void wpl_policy_track(lua_State *L, wp_pool *p, int task, int fut) {
  wpl_future *fu = lua_touserdata(L, fut);
  wpl_mailbox *mb;
  (void)p;
  fu->tracked = 1; /* its hooks may run after a wait: keep fu->f */
  task = lua_absindex(L, task);
  fut = lua_absindex(L, fut);
  lua_rawgetp(L, task, &list_key);
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
  lua_rawsetp(L, -2, fu->f);
  lua_pop(L, 1);
  lua_pushvalue(L, fut);
  lua_pushcclosure(L, finish_cb, 1);
  if (wpl_host_watch(L, fu->f)) return; /* the host loop runs finish_cb */
  lua_pop(L, 1);
  if ((mb = state_mailbox(L)) == NULL) luaL_error(L, "not enough memory");
  if (wpl_mailbox_watch(mb, fu->f) != 0) luaL_error(L, "not enough memory");
}

void wpl_policy_undo(lua_State *L, wp_pool *p, int task) {
  (void)p;
  task = lua_absindex(L, task);
  if (lua_rawgetp(L, task, &list_key) == LUA_TTABLE)
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
  wpl_mailbox **box;
  wpl_msg *v;
  size_t n, i;
  if (!atomic_load_explicit(&any_policy, memory_order_relaxed)) return;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &box_key);
  box = lua_touserdata(L, -1);
  lua_pop(L, 1);
  if (box == NULL || *box == NULL) return;
  v = wpl_mailbox_take(*box, &n);
  if (n == 0) {
    free(v);
    return;
  }
  /* From here until every future is released, errors must not unwind:
   * each hook runs under lua_pcall and its error is logged. */
  lua_rawgetp(L, LUA_REGISTRYINDEX, &pending_key);
  for (i = 0; i < n; i++) {
    if (lua_istable(L, -1)) {
      if (lua_rawgetp(L, -1, v[i].ptr) == LUA_TFUNCTION) {
        lua_pushnil(L);
        lua_rawsetp(L, -3, v[i].ptr);
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
    wp_future_release(v[i].ptr);
  }
  lua_pop(L, 1);
  free(v);
}
