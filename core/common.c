/*
 * common.c: the small services every other file of core/ uses: the names
 * of errors, statuses and drop reasons (from the X-macro lists of wpool.h),
 * growable byte buffers, the monotonic clock, and the table
 * of C functions that travel between states by name.
 *
 * The C-function table is filled once with every function of the standard
 * libraries (read from a scratch state) and then by wp_register_cfunction;
 * it is sorted by address so a lookup is a binary search under a mutex.
 */
#include <stdlib.h>
#include <string.h>

#include <lualib.h>

#include "wp_internal.h"

const char *wp_strerror(int err) {
  switch (err) {
#define WP__MSG(name, code, msg)                                               \
  case code:                                                                   \
    return msg;
    WP_ERRNO_MAP(WP__MSG)
#undef WP__MSG
  case 0:
    return "success";
  default:
    return "unknown error";
  }
}

const char *wp_err_name(int err) {
  switch (err) {
#define WP__NAME(name, code, msg)                                              \
  case code:                                                                   \
    return "E" #name;
    WP_ERRNO_MAP(WP__NAME)
#undef WP__NAME
  case 0:
    return "OK";
  default:
    return "EUNKNOWN";
  }
}

const char *wp_status_name(int status) {
  switch (status) {
#define WP__NAME(name, str)                                                    \
  case WP_##name:                                                              \
    return str;
    WP_STATUS_MAP(WP__NAME)
#undef WP__NAME
  default:
    return "unknown";
  }
}

const char *wp_drop_reason_name(int why) {
  switch (why) {
#define WP__NAME(name, str)                                                    \
  case WP_DROP_##name:                                                         \
    return str;
    WP_DROP_MAP(WP__NAME)
#undef WP__NAME
  default:
    return "unknown";
  }
}

double wp_now(void) {
  return (double)uv_hrtime() / 1e9;
}

static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

int wp__ncpus(void) {
  static atomic_int ncpus; /* 0: not known yet */
  int n = atomic_load_explicit(&ncpus, memory_order_relaxed);
  if (n == 0) {
    n = (int)uv_available_parallelism();
    atomic_store_explicit(&ncpus, n, memory_order_relaxed);
  }
  return n;
}

int wp__spin(int (*ready)(void *), void *arg) {
  uint64_t until;
  int i;
  if (wp__ncpus() < 2) return ready(arg);
  until = uv_hrtime() + WP__SPIN_NS;
  for (;;) {
    for (i = 0; i < 64; i++) {
      if (ready(arg)) return 1;
      cpu_relax();
    }
    if (uv_hrtime() >= until) return ready(arg);
  }
}

int wp__buf_grow(wp__buf *b, size_t n) {
  size_t cap;
  char *data;
  if (n <= b->cap - b->len) return 0;
  if (n > WP_MAX_MSG || b->len > WP_MAX_MSG - n) return WP_ETOOBIG;
  cap = b->cap ? b->cap : 64;
  while (cap - b->len < n)
    cap *= 2;
  if (b->borrowed) {
    if ((data = malloc(cap)) == NULL) return WP_ENOMEM;
    memcpy(data, b->data, b->len);
    b->borrowed = 0;
  } else if ((data = realloc(b->data, cap)) == NULL) {
    return WP_ENOMEM;
  }
  b->data = data;
  b->cap = cap;
  return 0;
}

void wp__buf_free(wp__buf *b) {
  if (!b->borrowed) free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
  b->borrowed = 0;
}

/* ---- C functions by name --------------------------------------------- */

typedef struct cfname {
  lua_CFunction fn;
  char *name; /* malloc'd "lib.fn", or "fn" for base functions */
} cfname;

static struct {
  uv_once_t once;
  uv_mutex_t mu;
  cfname *v; /* sorted by fn */
  size_t n, cap;
} cfreg = {UV_ONCE_INIT};

static int cf_cmp(lua_CFunction a, lua_CFunction b) {
  uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
  return x < y ? -1 : x > y;
}

/* Index of fn, or of where it would go.  Needs cfreg.mu. */
static size_t cf_find(lua_CFunction fn, int *found) {
  size_t lo = 0, hi = cfreg.n;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    int c = cf_cmp(cfreg.v[mid].fn, fn);
    if (c == 0) {
      *found = 1;
      return mid;
    }
    if (c < 0)
      lo = mid + 1;
    else
      hi = mid;
  }
  *found = 0;
  return lo;
}

/* Needs cfreg.mu.  An address already present keeps its first name. */
static int cf_add(const char *name, lua_CFunction fn) {
  int found;
  size_t i = cf_find(fn, &found);
  char *copy;
  if (found) return 0;
  if (cfreg.n == cfreg.cap) {
    size_t cap = cfreg.cap ? cfreg.cap * 2 : 256;
    cfname *v = realloc(cfreg.v, cap * sizeof *v);
    if (v == NULL) return WP_ENOMEM;
    cfreg.v = v;
    cfreg.cap = cap;
  }
  copy = strdup(name);
  if (copy == NULL) return WP_ENOMEM;
  memmove(cfreg.v + i + 1, cfreg.v + i, (cfreg.n - i) * sizeof *cfreg.v);
  cfreg.v[i].fn = fn;
  cfreg.v[i].name = copy;
  cfreg.n++;
  return 0;
}

/* [-0, +0, m] Adds every C function of the table at the top, named
 * prefix.key (or key when prefix is NULL). */
static void cf_add_lib(lua_State *L, const char *prefix) {
  char name[128];
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    if (lua_type(L, -2) == LUA_TSTRING && lua_iscfunction(L, -1)) {
      const char *k = lua_tostring(L, -2);
      if (prefix)
        snprintf(name, sizeof name, "%s.%s", prefix, k);
      else
        snprintf(name, sizeof name, "%s", k);
      cf_add(name, lua_tocfunction(L, -1));
    }
    lua_pop(L, 1);
  }
}

static void cf_init(void) {
  static const char *const libs[] = {"coroutine", "debug", "io",
                                     "math",      "os",    "package",
                                     "string",    "table", "utf8"};
  lua_State *L;
  size_t i;
  if (uv_mutex_init(&cfreg.mu) != 0) abort(); /* cannot fail on Linux */
  L = luaL_newstate();
  if (L == NULL) return; /* no memory: only registered functions travel */
  luaL_openlibs(L);
  lua_pushglobaltable(L);
  cf_add_lib(L, NULL);
  lua_pop(L, 1);
  for (i = 0; i < sizeof libs / sizeof *libs; i++) {
    if (lua_getglobal(L, libs[i]) == LUA_TTABLE) cf_add_lib(L, libs[i]);
    lua_pop(L, 1);
  }
  lua_close(L);
}

void wp__cfunction_atfork(int phase) {
  wp__atfork_lock(phase, &cfreg.once, cf_init, &cfreg.mu);
}

int wp_register_cfunction(const char *qualname, lua_CFunction fn) {
  int r;
  if (qualname == NULL || fn == NULL || strlen(qualname) >= 128)
    return WP_EINVAL;
  wp__fork_watch();
  uv_once(&cfreg.once, cf_init);
  uv_mutex_lock(&cfreg.mu);
  r = cf_add(qualname, fn);
  uv_mutex_unlock(&cfreg.mu);
  return r;
}

const char *wp__cfunction_name(lua_CFunction fn) {
  const char *name = NULL;
  int found;
  size_t i;
  uv_once(&cfreg.once, cf_init);
  uv_mutex_lock(&cfreg.mu);
  i = cf_find(fn, &found);
  if (found) name = cfreg.v[i].name; /* entries are never freed */
  uv_mutex_unlock(&cfreg.mu);
  return name;
}
