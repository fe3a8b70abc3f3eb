/*
 * shdict.c: process-wide shared dictionaries (the wp_shdict_* functions).
 *
 * A shared dictionary is a named hash table that every thread of the process
 * (hence every Lua state: the host's and every worker's) can reach by name.
 * It maps binary-safe byte-string keys to nil-free scalar values: booleans,
 * integers, floats and strings, each with an optional expiry.  It exists so
 * that tasks running in separate Lua states can share counters, flags and
 * small caches without sending messages.
 *
 * Design:
 *   - A global registry (a list: there are few dictionaries) maps names to
 *     dictionaries.  It is guarded by one mutex created with uv_once.
 *     Dictionaries are never freed: the pointer wp_shdict_open returns stays
 *     valid for the life of the process, and the registry keeps every one
 *     reachable so leak checkers stay quiet.
 *   - Each dictionary is a chained hash table with a power-of-two number of
 *     buckets, doubled whenever the entries outnumber the buckets.  Each
 *     dictionary has its own mutex; every operation holds it briefly, never
 *     calls Lua and never calls back into user code (except the callback of
 *     wp_shdict_keys, which is documented as running under the lock).
 *   - Expiry deadlines are uv_hrtime() nanoseconds (monotonic).  They are
 *     checked lazily: an expired entry is removed when a lookup meets it, and
 *     all expired entries are purged when a store needs room.
 *   - Capacity is a budget, not an allocator: a store that would exceed it
 *     fails with WP_ENOMEM after purging expired entries, and nothing live is
 *     ever evicted.
 *
 * Deliberately left out: LRU eviction, per-dictionary statistics and any way
 * to destroy a dictionary.
 *
 * Lock order: the registry lock and a dictionary's lock are never held
 * together, and no two dictionary locks are ever held together.
 */
#include "wp_internal.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

/* Capacity accounting.  An entry costs
 *
 *     SHD_OVERHEAD + key length + (string value ? string length : 0)
 *
 * bytes, whatever the value's type.  SHD_OVERHEAD is a fixed 64 bytes
 * standing for the entry header, the allocator's own header and the bucket
 * slot, so that the figure does not change between platforms.  The bucket
 * array is not counted.  A dictionary's used bytes are the sum of the costs
 * of its entries (expired ones included until they are removed) and never
 * exceed its capacity. */
#define SHD_OVERHEAD ((size_t)64)
#define SHD_MIN_BUCKETS ((size_t)16)

typedef struct shd_entry shd_entry;

struct shd_entry {
  shd_entry *next; /* next entry of the same bucket */
  uint64_t hash;   /* full hash of the key */
  uint64_t expire; /* uv_hrtime() deadline in ns; 0: never expires */
  size_t klen;     /* bytes of key */
  wp_shval v;      /* never WP_TNIL; a string points into data after the key */
  char data[];     /* klen bytes of key, then the string value, then a NUL */
};

struct wp_shdict {
  wp_shdict *next_dict; /* next in the registry; guarded by shd_registry_lock */
  uv_mutex_t lock;      /* guards every field below */
  shd_entry **buckets;  /* nbuckets chains */
  size_t nbuckets;      /* a power of two */
  size_t count;         /* entries stored, expired or not */
  size_t nexpiring;     /* entries with an expiry: purges skip when 0 */
  size_t used;          /* sum of entry costs; <= capacity */
  size_t capacity;      /* budget in bytes */
  char name[];          /* NUL-terminated; immutable */
};

static uv_once_t shd_once = UV_ONCE_INIT;
static int shd_registry_err;         /* uv_mutex_init's result */
static uv_mutex_t shd_registry_lock; /* guards shd_registry */
static wp_shdict *shd_registry;      /* every dictionary ever opened */

static void shd_registry_init(void) {
  shd_registry_err = uv_mutex_init(&shd_registry_lock);
}

/* ------------------------------------------------------------------ */
/* Helpers; the caller holds d->lock for every one that takes a d      */
/* ------------------------------------------------------------------ */

/* FNV-1a folded through a 64-bit finaliser so that the low bits, which pick
 * the bucket, depend on every byte. */
static uint64_t shd_hash(const char *k, size_t klen) {
  uint64_t h = wp__fnv1a(k, klen);
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdu;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53u;
  h ^= h >> 33;
  return h;
}

static int shd_isnum(const wp_shval *v) {
  return v->type == WP_TINTEGER || v->type == WP_TNUMBER;
}

static double shd_tonum(const wp_shval *v) {
  return v->type == WP_TINTEGER ? (double)v->u.i : v->u.n;
}

/* A value that may be stored (WP_TNIL included), with a usable string. */
static int shd_valid(const wp_shval *v) {
  switch (v->type) {
  case WP_TNIL:
  case WP_TBOOLEAN:
  case WP_TINTEGER:
  case WP_TNUMBER:
    return 1;
  case WP_TSTRING:
    return v->u.s.ptr != NULL || v->u.s.len == 0;
  default:
    return 0;
  }
}

/* The cost of storing v under a klen-byte key, or 0 when it overflows. */
static size_t shd_cost(size_t klen, const wp_shval *v) {
  size_t slen = v->type == WP_TSTRING ? v->u.s.len : 0;
  size_t extra =
      sizeof(shd_entry) > SHD_OVERHEAD ? sizeof(shd_entry) : SHD_OVERHEAD;
  if (klen > SIZE_MAX - extra - 1 || slen > SIZE_MAX - extra - 1 - klen)
    return 0;
  return SHD_OVERHEAD + klen + slen;
}

static size_t shd_entry_cost(const shd_entry *e) {
  return shd_cost(e->klen, &e->v);
}

/* The deadline of a ttl given in seconds; 0 (never) unless ttl > 0, which
 * also maps NaN to "never".  Huge ttls saturate. */
static uint64_t shd_deadline(uint64_t now, double ttl) {
  double ns;
  if (!(ttl > 0)) return 0;
  ns = ttl * 1e9;
  if (ns >= (double)(UINT64_MAX - now)) return UINT64_MAX;
  return now + (uint64_t)ns;
}

static int shd_expired(const shd_entry *e, uint64_t now) {
  return e->expire != 0 && now >= e->expire;
}

/* Unlinks and frees the entry *pp. */
static void shd_remove(wp_shdict *d, shd_entry **pp) {
  shd_entry *e = *pp;
  assert(d->count > 0 && d->used >= shd_entry_cost(e));
  assert(e->expire == 0 || d->nexpiring > 0);
  *pp = e->next;
  d->count--;
  if (e->expire != 0) d->nexpiring--;
  d->used -= shd_entry_cost(e);
  free(e);
}

/* Returns the link that points to k's live entry, or NULL when k is absent.
 * An expired entry met on the way is removed. */
static shd_entry **shd_find(wp_shdict *d, const char *k, size_t klen,
                            uint64_t h, uint64_t now) {
  shd_entry **pp = &d->buckets[h & (d->nbuckets - 1)];
  for (; *pp != NULL; pp = &(*pp)->next) {
    shd_entry *e = *pp;
    if (e->hash == h && e->klen == klen &&
        (klen == 0 || memcmp(e->data, k, klen) == 0)) {
      if (!shd_expired(e, now)) return pp;
      shd_remove(d, pp);
      return NULL;
    }
  }
  return NULL;
}

/* Removes every expired entry. */
static void shd_purge(wp_shdict *d, uint64_t now) {
  if (d->nexpiring == 0) return;
  for (size_t b = 0; b < d->nbuckets; b++) {
    shd_entry **pp = &d->buckets[b];
    while (*pp != NULL) {
      if (shd_expired(*pp, now))
        shd_remove(d, pp);
      else
        pp = &(*pp)->next;
    }
  }
}

/* Doubles the bucket array.  Failing to allocate is harmless: chains just
 * grow longer, so the failure is ignored. */
static void shd_grow(wp_shdict *d) {
  size_t n = d->nbuckets * 2;
  shd_entry **nb;
  if (n < d->nbuckets || n > SIZE_MAX / sizeof *nb) return;
  nb = calloc(n, sizeof *nb);
  if (nb == NULL) return;
  for (size_t b = 0; b < d->nbuckets; b++) {
    shd_entry *e = d->buckets[b], *next;
    for (; e != NULL; e = next) {
      next = e->next;
      e->next = nb[e->hash & (n - 1)];
      nb[e->hash & (n - 1)] = e;
    }
  }
  free(d->buckets);
  d->buckets = nb;
  d->nbuckets = n;
}

/* Stores v (not WP_TNIL) at k with the given deadline, replacing the entry
 * *pp when pp is not NULL (pp must come from shd_find with the same key).
 * Returns 0, or WP_ENOMEM when the entry does not fit even after purging
 * expired entries or cannot be allocated; nothing live changes then. */
static int shd_put(wp_shdict *d, shd_entry **pp, const char *k, size_t klen,
                   uint64_t h, const wp_shval *v, uint64_t expire,
                   uint64_t now) {
  size_t need = shd_cost(klen, v);
  size_t slen = v->type == WP_TSTRING ? v->u.s.len : 0;
  shd_entry *e;

  if (need == 0) return WP_ENOMEM;
  /* used <= capacity always holds, so neither subtraction wraps. */
  if (need > d->capacity - (d->used - (pp ? shd_entry_cost(*pp) : 0))) {
    shd_purge(d, now);
    /* The purge may have freed the entry that holds the link *pp lives in;
     * the entry *pp itself is live at `now`, so finding it again is safe. */
    pp = shd_find(d, k, klen, h, now);
    if (need > d->capacity - (d->used - (pp ? shd_entry_cost(*pp) : 0)))
      return WP_ENOMEM;
  }

  e = malloc(sizeof *e + klen + slen + 1);
  if (e == NULL) return WP_ENOMEM;
  e->hash = h;
  e->expire = expire;
  e->klen = klen;
  e->v = *v;
  if (klen > 0) memcpy(e->data, k, klen);
  if (v->type == WP_TSTRING) {
    e->v.u.s.ptr = e->data + klen;
    if (slen > 0) memcpy(e->v.u.s.ptr, v->u.s.ptr, slen);
  } else if (v->type == WP_TBOOLEAN) {
    e->v.u.b = v->u.b != 0;
  }
  e->data[klen + slen] = '\0';

  if (pp != NULL) {
    e->next = (*pp)->next;
    shd_remove(d, pp); /* *pp now links to e->next */
    *pp = e;
  } else {
    shd_entry **head = &d->buckets[h & (d->nbuckets - 1)];
    e->next = *head;
    *head = e;
  }
  d->count++;
  d->used += need;
  assert(d->used <= d->capacity);
  if (expire != 0) d->nexpiring++;
  if (d->count > d->nbuckets) shd_grow(d);
  return 0;
}

/* a + b; integers wrap around modulo 2^64 (the sum is computed unsigned, as
 * Lua does), anything else is a float sum. */
static wp_shval shd_sum(const wp_shval *a, const wp_shval *b) {
  wp_shval r;
  if (a->type == WP_TINTEGER && b->type == WP_TINTEGER) {
    r.type = WP_TINTEGER;
    r.u.i = (int64_t)((uint64_t)a->u.i + (uint64_t)b->u.i);
  } else {
    r.type = WP_TNUMBER;
    r.u.n = shd_tonum(a) + shd_tonum(b);
  }
  return r;
}

/* Whether the current value (NULL: absent) equals want (WP_TNIL: absent).
 * Types must match: integer 1 differs from float 1.0. */
static int shd_equal(const wp_shval *cur, const wp_shval *want) {
  if (want->type == WP_TNIL) return cur == NULL;
  if (cur == NULL || cur->type != want->type) return 0;
  switch (cur->type) {
  case WP_TBOOLEAN:
    return cur->u.b == (want->u.b != 0);
  case WP_TINTEGER:
    return cur->u.i == want->u.i;
  case WP_TNUMBER:
    return cur->u.n == want->u.n;
  case WP_TSTRING:
    return cur->u.s.len == want->u.s.len &&
           (cur->u.s.len == 0 ||
            memcmp(cur->u.s.ptr, want->u.s.ptr, cur->u.s.len) == 0);
  default:
    return 0;
  }
}

/* Shared body of set and add. */
static int shd_store(wp_shdict *d, const char *k, size_t klen,
                     const wp_shval *v, double ttl, int only_new) {
  uint64_t now, h;
  shd_entry **pp;
  int rc = 0;

  if (d == NULL || (k == NULL && klen > 0) || v == NULL || !shd_valid(v))
    return WP_EINVAL;
  h = shd_hash(k, klen);
  uv_mutex_lock(&d->lock);
  now = uv_hrtime();
  pp = shd_find(d, k, klen, h, now);
  if (pp != NULL && only_new)
    rc = WP_EEXISTS;
  else if (v->type == WP_TNIL) {
    if (pp != NULL) shd_remove(d, pp);
  } else
    rc = shd_put(d, pp, k, klen, h, v, shd_deadline(now, ttl), now);
  uv_mutex_unlock(&d->lock);
  return rc;
}

/* ------------------------------------------------------------------ */
/* Public API                                                          */
/* ------------------------------------------------------------------ */

/* Opens or creates the dictionary `name`.  Thread-safe.  Besides the
 * documented WP_EINVAL (NULL or empty name, NULL out) and WP_ENOMEM, returns
 * WP_ESYS if a mutex cannot be created. */
int wp_shdict_open(const char *name, size_t capacity, wp_shdict **out) {
  wp_shdict *d;
  size_t nlen;
  int rc = 0;

  if (out == NULL) return WP_EINVAL;
  *out = NULL;
  if (name == NULL || name[0] == '\0') return WP_EINVAL;
  wp__fork_watch();
  uv_once(&shd_once, shd_registry_init);
  if (shd_registry_err != 0) return WP_ESYS;

  uv_mutex_lock(&shd_registry_lock);
  for (d = shd_registry; d != NULL; d = d->next_dict)
    if (strcmp(d->name, name) == 0) goto done;

  nlen = strlen(name);
  d = malloc(sizeof *d + nlen + 1);
  if (d == NULL) goto nomem;
  d->buckets = calloc(SHD_MIN_BUCKETS, sizeof *d->buckets);
  if (d->buckets == NULL) goto nomem;
  if (uv_mutex_init(&d->lock) != 0) {
    rc = WP_ESYS;
    goto err;
  }
  d->nbuckets = SHD_MIN_BUCKETS;
  d->count = 0;
  d->nexpiring = 0;
  d->used = 0;
  d->capacity = capacity != 0 ? capacity : WP_SHDICT_DEFAULT_CAPACITY;
  memcpy(d->name, name, nlen + 1);
  d->next_dict = shd_registry;
  shd_registry = d;
  goto done;

nomem:
  rc = WP_ENOMEM;
err:
  if (d != NULL) free(d->buckets);
  free(d);
  d = NULL;
done:
  uv_mutex_unlock(&shd_registry_lock);
  *out = d;
  return rc;
}

void wp__shdict_atfork(int phase) {
  wp_shdict *d;
  uv_once(&shd_once, shd_registry_init);
  if (shd_registry_err != 0) return;
  if (phase == WP__FORK_PREPARE) { /* the registry, then each dictionary */
    uv_mutex_lock(&shd_registry_lock);
    for (d = shd_registry; d != NULL; d = d->next_dict)
      uv_mutex_lock(&d->lock);
    return;
  }
  for (d = shd_registry; d != NULL; d = d->next_dict)
    uv_mutex_unlock(&d->lock);
  uv_mutex_unlock(&shd_registry_lock);
}

/* Copies k's value into *out; a string is copied into a malloc'd buffer
 * (NUL-terminated for convenience) that the caller releases with
 * wp_shval_free.  *out is WP_TNIL on failure.  Thread-safe. */
int wp_shdict_get(wp_shdict *d, const char *k, size_t klen, wp_shval *out) {
  const wp_shval *v;
  shd_entry **pp;
  uint64_t h;
  char *s;
  int rc = 0;

  if (out == NULL) return WP_EINVAL;
  out->type = WP_TNIL;
  if (d == NULL || (k == NULL && klen > 0)) return WP_EINVAL;
  h = shd_hash(k, klen);
  uv_mutex_lock(&d->lock);
  pp = shd_find(d, k, klen, h, uv_hrtime());
  if (pp == NULL) goto done;
  v = &(*pp)->v;
  if (v->type != WP_TSTRING) {
    *out = *v;
    goto done;
  }
  s = malloc(v->u.s.len + 1);
  if (s == NULL) {
    rc = WP_ENOMEM;
    goto done;
  }
  memcpy(s, v->u.s.ptr, v->u.s.len + 1);
  out->type = WP_TSTRING;
  out->u.s.ptr = s;
  out->u.s.len = v->u.s.len;
done:
  uv_mutex_unlock(&d->lock);
  return rc;
}

/* Stores v at k.  Strings are copied; v is borrowed.  WP_EINVAL for a value
 * of another type (WP_TOTHER).  Thread-safe. */
int wp_shdict_set(wp_shdict *d, const char *k, size_t klen, const wp_shval *v,
                  double ttl) {
  return shd_store(d, k, klen, v, ttl, 0);
}

/* Stores v only when k is absent (or expired).  Adding WP_TNIL to an absent
 * key succeeds and stores nothing.  Thread-safe. */
int wp_shdict_add(wp_shdict *d, const char *k, size_t klen, const wp_shval *v,
                  double ttl) {
  return shd_store(d, k, klen, v, ttl, 1);
}

/* Adds step to k's number.  step and init must be WP_TINTEGER or WP_TNUMBER
 * (else WP_EINVAL).  An existing key keeps its expiry (ttl is used only when
 * init creates the key), and its cost does not change, so incrementing an
 * existing number never fails for lack of room.  Integer sums wrap around
 * modulo 2^64.  On failure *out is WP_TNIL.  Thread-safe. */
int wp_shdict_incr(wp_shdict *d, const char *k, size_t klen,
                   const wp_shval *step, const wp_shval *init, double ttl,
                   wp_shval *out) {
  uint64_t now, h;
  shd_entry **pp;
  wp_shval st, in, sum;
  int rc = 0;

  if (out == NULL || d == NULL || (k == NULL && klen > 0) || step == NULL ||
      !shd_isnum(step) || (init != NULL && !shd_isnum(init))) {
    if (out != NULL) out->type = WP_TNIL;
    return WP_EINVAL;
  }
  /* Copies first, so that out may alias step or init. */
  st = *step;
  in = init != NULL ? *init : st;
  out->type = WP_TNIL;
  h = shd_hash(k, klen);
  uv_mutex_lock(&d->lock);
  now = uv_hrtime();
  pp = shd_find(d, k, klen, h, now);
  if (pp != NULL) {
    wp_shval *cur = &(*pp)->v;
    if (!shd_isnum(cur)) {
      rc = WP_ENOTNUM;
    } else {
      *cur = shd_sum(cur, &st);
      *out = *cur;
    }
  } else if (init == NULL) {
    rc = WP_ENOTFOUND;
  } else {
    sum = shd_sum(&in, &st);
    rc = shd_put(d, NULL, k, klen, h, &sum, shd_deadline(now, ttl), now);
    if (rc == 0) *out = sum;
  }
  uv_mutex_unlock(&d->lock);
  return rc;
}

/* Compares and swaps.  nv WP_TNIL deletes the key.  A key created by a
 * successful swap from WP_TNIL has no expiry.  WP_EINVAL for values of
 * another type.  Thread-safe. */
int wp_shdict_cas(wp_shdict *d, const char *k, size_t klen, const wp_shval *old,
                  const wp_shval *nv) {
  uint64_t now, h;
  shd_entry **pp;
  int rc;

  if (d == NULL || (k == NULL && klen > 0) || old == NULL || nv == NULL ||
      !shd_valid(old) || !shd_valid(nv))
    return WP_EINVAL;
  h = shd_hash(k, klen);
  uv_mutex_lock(&d->lock);
  now = uv_hrtime();
  pp = shd_find(d, k, klen, h, now);
  if (!shd_equal(pp != NULL ? &(*pp)->v : NULL, old)) {
    rc = 0;
  } else if (nv->type == WP_TNIL) {
    if (pp != NULL) shd_remove(d, pp);
    rc = 1;
  } else {
    uint64_t expire = pp != NULL ? (*pp)->expire : 0;
    rc = shd_put(d, pp, k, klen, h, nv, expire, now);
    if (rc == 0) rc = 1;
  }
  uv_mutex_unlock(&d->lock);
  return rc;
}

/* Removes k; deleting an absent key succeeds.  Returns 0, or WP_EINVAL for
 * bad arguments.  Thread-safe. */
int wp_shdict_delete(wp_shdict *d, const char *k, size_t klen) {
  wp_shval nil;
  nil.type = WP_TNIL;
  return shd_store(d, k, klen, &nil, 0, 0);
}

/* Remaining lifetime of k in seconds (0: no expiry; otherwise > 0).
 * Thread-safe. */
int wp_shdict_ttl(wp_shdict *d, const char *k, size_t klen, double *out) {
  uint64_t now, h;
  shd_entry **pp;
  int rc = 0;

  if (out == NULL) return WP_EINVAL;
  *out = 0;
  if (d == NULL || (k == NULL && klen > 0)) return WP_EINVAL;
  h = shd_hash(k, klen);
  uv_mutex_lock(&d->lock);
  now = uv_hrtime();
  pp = shd_find(d, k, klen, h, now);
  if (pp == NULL)
    rc = WP_ENOTFOUND;
  else if ((*pp)->expire != 0)
    *out = (double)((*pp)->expire - now) / 1e9;
  uv_mutex_unlock(&d->lock);
  return rc;
}

/* Lists live keys in no particular order; fn borrows each key for the call
 * only.  Returns the number listed (at most INT_MAX) or WP_EINVAL.  fn runs
 * with d's lock held, so it must not call into d (that would deadlock).
 * Thread-safe. */
int wp_shdict_keys(wp_shdict *d, size_t max, wp_shdict_key_fn fn, void *ud) {
  uint64_t now;
  size_t n = 0;

  if (d == NULL || fn == NULL) return WP_EINVAL;
  if (max == 0 || max > INT_MAX) max = INT_MAX;
  uv_mutex_lock(&d->lock);
  now = uv_hrtime();
  for (size_t b = 0; b < d->nbuckets && n < max; b++) {
    const shd_entry *e = d->buckets[b];
    for (; e != NULL && n < max; e = e->next) {
      if (shd_expired(e, now)) continue;
      fn(e->data, e->klen, ud);
      n++;
    }
  }
  uv_mutex_unlock(&d->lock);
  return (int)n;
}

/* Removes every key; the bucket array keeps its size.  Never fails.
 * Thread-safe. */
void wp_shdict_flush(wp_shdict *d) {
  uv_mutex_lock(&d->lock);
  for (size_t b = 0; b < d->nbuckets; b++) {
    shd_entry *e = d->buckets[b], *next;
    for (; e != NULL; e = next) {
      next = e->next;
      free(e);
    }
    d->buckets[b] = NULL;
  }
  d->count = 0;
  d->nexpiring = 0;
  d->used = 0;
  uv_mutex_unlock(&d->lock);
}

/* Used bytes (see the accounting formula above; expired entries not yet
 * removed still count) and capacity.  Either pointer may be NULL.  Never
 * fails.  Thread-safe. */
void wp_shdict_usage(wp_shdict *d, size_t *used, size_t *capacity) {
  uv_mutex_lock(&d->lock);
  if (used != NULL) *used = d->used;
  if (capacity != NULL) *capacity = d->capacity;
  uv_mutex_unlock(&d->lock);
}

/* Frees v's string, if any, and leaves v WP_TNIL; v may be NULL.  Safe on
 * values of every type.  Not thread-safe for one v. */
void wp_shval_free(wp_shval *v) {
  if (v == NULL) return;
  if (v->type == WP_TSTRING) free(v->u.s.ptr);
  v->type = WP_TNIL;
}
