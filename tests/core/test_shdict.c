/*
 * test_shdict.c: Criterion tests of the shared dictionaries' C API
 * (wp_shdict_* in core/shdict.c).
 *
 * Each test opens dictionaries under names of its own, since dictionaries
 * live until process exit and tests may share a process.  Expiry tests use
 * short ttls and poll with generous deadlines instead of fixed sleeps, and
 * only assert "still present" when the clock proves the ttl has not run out.
 */
#include <criterion/criterion.h>

#include <string.h>

#include <uv.h>

#include "wpool.h"

/* ------------------------------------------------------------------ */
/* Helpers                                                             */
/* ------------------------------------------------------------------ */

static wp_shdict *open_dict(const char *name, size_t capacity) {
  wp_shdict *d = NULL;
  cr_assert_eq(wp_shdict_open(name, capacity, &d), 0);
  cr_assert_not_null(d);
  return d;
}

static wp_shval vnil(void) {
  wp_shval v;
  v.type = WP_TNIL;
  return v;
}

static wp_shval vbool(int b) {
  wp_shval v;
  v.type = WP_TBOOLEAN;
  v.u.b = b;
  return v;
}

static wp_shval vint(int64_t i) {
  wp_shval v;
  v.type = WP_TINTEGER;
  v.u.i = i;
  return v;
}

static wp_shval vnum(double n) {
  wp_shval v;
  v.type = WP_TNUMBER;
  v.u.n = n;
  return v;
}

static wp_shval vstr(const char *s, size_t len) {
  wp_shval v;
  v.type = WP_TSTRING;
  v.u.s.ptr = (char *)s;
  v.u.s.len = len;
  return v;
}

/* Sets a NUL-terminated key. */
static int set(wp_shdict *d, const char *k, wp_shval v, double ttl) {
  return wp_shdict_set(d, k, strlen(k), &v, ttl);
}

static wp_shval get(wp_shdict *d, const char *k) {
  wp_shval v;
  cr_assert_eq(wp_shdict_get(d, k, strlen(k), &v), 0);
  return v;
}

static int64_t get_int(wp_shdict *d, const char *k) {
  wp_shval v = get(d, k);
  cr_assert_eq(v.type, WP_TINTEGER, "%s: type %d", k, (int)v.type);
  return v.u.i;
}

static void assert_absent(wp_shdict *d, const char *k) {
  wp_shval v = get(d, k);
  cr_assert_eq(v.type, WP_TNIL, "%s should be absent", k);
}

/* Asserts k holds the string want (len bytes) and frees the copy. */
static void assert_str(wp_shdict *d, const char *k, size_t klen,
                       const char *want, size_t len) {
  wp_shval v;
  cr_assert_eq(wp_shdict_get(d, k, klen, &v), 0);
  cr_assert_eq(v.type, WP_TSTRING);
  cr_assert_eq(v.u.s.len, len);
  cr_assert_eq(memcmp(v.u.s.ptr, want, len), 0);
  wp_shval_free(&v);
  cr_assert_eq(v.type, WP_TNIL);
}

static double now_s(void) {
  return (double)uv_hrtime() / 1e9;
}

/* ------------------------------------------------------------------ */
/* Opening                                                             */
/* ------------------------------------------------------------------ */

Test(shdict, open_same_name_same_dict) {
  wp_shdict *a = open_dict("open.a", 0), *b = open_dict("open.a", 123);
  wp_shdict *c = open_dict("open.c", 0);
  size_t used, cap;
  cr_assert_eq(a, b);
  cr_assert_neq(a, c);
  wp_shdict_usage(a, &used, &cap);
  cr_assert_eq(used, 0);
  cr_assert_eq(cap, WP_SHDICT_DEFAULT_CAPACITY, "a later open ignores it");
}

Test(shdict, open_capacity) {
  wp_shdict *d = open_dict("open.cap", 4096);
  size_t cap;
  wp_shdict_usage(d, NULL, &cap);
  cr_assert_eq(cap, 4096);
}

Test(shdict, open_bad_names) {
  wp_shdict *d = (wp_shdict *)1;
  cr_assert_eq(wp_shdict_open("", 0, &d), WP_EINVAL);
  cr_assert_null(d);
  cr_assert_eq(wp_shdict_open(NULL, 0, &d), WP_EINVAL);
  cr_assert_eq(wp_shdict_open("x", 0, NULL), WP_EINVAL);
}

/* ------------------------------------------------------------------ */
/* Values                                                              */
/* ------------------------------------------------------------------ */

Test(shdict, set_get_every_type) {
  wp_shdict *d = open_dict("types", 0);
  wp_shval v;

  assert_absent(d, "missing");

  cr_assert_eq(set(d, "t", vbool(1), 0), 0);
  cr_assert_eq(set(d, "f", vbool(0), 0), 0);
  cr_assert_eq(set(d, "i", vint(-42), 0), 0);
  cr_assert_eq(set(d, "big", vint(INT64_MIN), 0), 0);
  cr_assert_eq(set(d, "n", vnum(2.5), 0), 0);
  cr_assert_eq(set(d, "s", vstr("hello", 5), 0), 0);
  cr_assert_eq(set(d, "empty", vstr("", 0), 0), 0);

  v = get(d, "t");
  cr_assert(v.type == WP_TBOOLEAN && v.u.b == 1);
  v = get(d, "f");
  cr_assert(v.type == WP_TBOOLEAN && v.u.b == 0);
  cr_assert_eq(get_int(d, "i"), -42);
  cr_assert_eq(get_int(d, "big"), INT64_MIN);
  v = get(d, "n");
  cr_assert(v.type == WP_TNUMBER && v.u.n == 2.5);
  assert_str(d, "s", 1, "hello", 5);
  assert_str(d, "empty", 5, "", 0);

  /* Overwrite with another type, then nil deletes. */
  cr_assert_eq(set(d, "s", vint(7), 0), 0);
  cr_assert_eq(get_int(d, "s"), 7);
  cr_assert_eq(set(d, "s", vnil(), 0), 0);
  assert_absent(d, "s");
  cr_assert_eq(set(d, "never-there", vnil(), 0), 0);
}

Test(shdict, int_and_float_are_distinct) {
  wp_shdict *d = open_dict("intfloat", 0);
  wp_shval v;
  cr_assert_eq(set(d, "i", vint(1), 0), 0);
  cr_assert_eq(set(d, "n", vnum(1.0), 0), 0);
  v = get(d, "i");
  cr_assert_eq(v.type, WP_TINTEGER);
  v = get(d, "n");
  cr_assert_eq(v.type, WP_TNUMBER);
  cr_assert_eq(v.u.n, 1.0);
}

Test(shdict, binary_safe_keys_and_values) {
  wp_shdict *d = open_dict("binary", 0);
  const char k1[] = "a\0b", k2[] = "a\0c", val[] = "x\0y\0z";
  wp_shval v = vstr(val, sizeof val - 1), v2 = vint(2);

  cr_assert_eq(wp_shdict_set(d, k1, sizeof k1 - 1, &v, 0), 0);
  cr_assert_eq(wp_shdict_set(d, k2, sizeof k2 - 1, &v2, 0), 0);
  assert_str(d, k1, sizeof k1 - 1, val, sizeof val - 1);
  assert_absent(d, "a"); /* the prefix before the NUL is another key */
  cr_assert_eq(wp_shdict_get(d, k2, sizeof k2 - 1, &v), 0);
  cr_assert(v.type == WP_TINTEGER && v.u.i == 2);

  /* The empty key is a key like any other. */
  v = vbool(1);
  cr_assert_eq(wp_shdict_set(d, "", 0, &v, 0), 0);
  v = get(d, "");
  cr_assert_eq(v.type, WP_TBOOLEAN);
}

Test(shdict, bad_values) {
  wp_shdict *d = open_dict("badvals", 0);
  wp_shval v, out;
  v.type = WP_TOTHER;
  cr_assert_eq(wp_shdict_set(d, "k", 1, &v, 0), WP_EINVAL);
  v = vstr(NULL, 3);
  cr_assert_eq(wp_shdict_set(d, "k", 1, &v, 0), WP_EINVAL);
  v = vstr("s", 1);
  cr_assert_eq(wp_shdict_incr(d, "k", 1, &v, NULL, 0, &out), WP_EINVAL);
  cr_assert_eq(out.type, WP_TNIL);
  assert_absent(d, "k");
}

Test(shdict, add) {
  wp_shdict *d = open_dict("add", 0);
  wp_shval v = vint(1);
  cr_assert_eq(wp_shdict_add(d, "k", 1, &v, 0), 0);
  v = vint(2);
  cr_assert_eq(wp_shdict_add(d, "k", 1, &v, 0), WP_EEXISTS);
  cr_assert_eq(get_int(d, "k"), 1, "a failed add changes nothing");
  cr_assert_eq(wp_shdict_delete(d, "k", 1), 0);
  cr_assert_eq(wp_shdict_add(d, "k", 1, &v, 0), 0);
  cr_assert_eq(get_int(d, "k"), 2);
}

Test(shdict, delete_and_flush) {
  wp_shdict *d = open_dict("delflush", 0);
  size_t used;
  cr_assert_eq(set(d, "a", vint(1), 0), 0);
  cr_assert_eq(set(d, "b", vstr("bb", 2), 0), 0);
  cr_assert_eq(wp_shdict_delete(d, "a", 1), 0);
  assert_absent(d, "a");
  cr_assert_eq(wp_shdict_delete(d, "a", 1), 0, "deleting twice is fine");
  wp_shdict_usage(d, &used, NULL);
  cr_assert_eq(used, 64 + 1 + 2, "documented formula: 64 + key + string");
  wp_shdict_flush(d);
  assert_absent(d, "b");
  wp_shdict_usage(d, &used, NULL);
  cr_assert_eq(used, 0);
  cr_assert_eq(set(d, "c", vint(3), 0), 0, "usable after a flush");
  cr_assert_eq(get_int(d, "c"), 3);
}

/* ------------------------------------------------------------------ */
/* incr and cas                                                        */
/* ------------------------------------------------------------------ */

Test(shdict, incr) {
  wp_shdict *d = open_dict("incr", 0);
  wp_shval one = vint(1), half = vnum(0.5), init = vint(10), out;

  /* Absent without init. */
  cr_assert_eq(wp_shdict_incr(d, "k", 1, &one, NULL, 0, &out), WP_ENOTFOUND);
  assert_absent(d, "k");

  /* Absent with init: stores init + step. */
  cr_assert_eq(wp_shdict_incr(d, "k", 1, &one, &init, 0, &out), 0);
  cr_assert(out.type == WP_TINTEGER && out.u.i == 11);
  cr_assert_eq(get_int(d, "k"), 11);

  /* Present: init is ignored. */
  cr_assert_eq(wp_shdict_incr(d, "k", 1, &one, &init, 0, &out), 0);
  cr_assert(out.type == WP_TINTEGER && out.u.i == 12);

  /* A float step makes a float. */
  cr_assert_eq(wp_shdict_incr(d, "k", 1, &half, NULL, 0, &out), 0);
  cr_assert(out.type == WP_TNUMBER && out.u.n == 12.5);
  /* And a float value stays a float even with an integer step. */
  cr_assert_eq(wp_shdict_incr(d, "k", 1, &one, NULL, 0, &out), 0);
  cr_assert(out.type == WP_TNUMBER && out.u.n == 13.5);
  out = get(d, "k");
  cr_assert(out.type == WP_TNUMBER && out.u.n == 13.5);

  /* Float init. */
  init = vnum(1.0);
  cr_assert_eq(wp_shdict_incr(d, "f", 1, &one, &init, 0, &out), 0);
  cr_assert(out.type == WP_TNUMBER && out.u.n == 2.0);

  /* Non-numbers. */
  cr_assert_eq(set(d, "s", vstr("5", 1), 0), 0);
  cr_assert_eq(wp_shdict_incr(d, "s", 1, &one, NULL, 0, &out), WP_ENOTNUM);
  cr_assert_eq(out.type, WP_TNIL);
  cr_assert_eq(set(d, "b", vbool(1), 0), 0);
  cr_assert_eq(wp_shdict_incr(d, "b", 1, &one, &init, 0, &out), WP_ENOTNUM);
  assert_str(d, "s", 1, "5", 1);

  /* Integers wrap around. */
  cr_assert_eq(set(d, "max", vint(INT64_MAX), 0), 0);
  cr_assert_eq(wp_shdict_incr(d, "max", 3, &one, NULL, 0, &out), 0);
  cr_assert(out.type == WP_TINTEGER && out.u.i == INT64_MIN);
}

Test(shdict, incr_keeps_expiry) {
  wp_shdict *d = open_dict("incrttl", 0);
  wp_shval one = vint(1), zero = vint(0), out;
  double ttl;

  cr_assert_eq(wp_shdict_incr(d, "k", 1, &one, &zero, 100, &out), 0);
  cr_assert_eq(wp_shdict_ttl(d, "k", 1, &ttl), 0);
  cr_assert(ttl > 90 && ttl <= 100, "init sets the ttl: %f", ttl);
  cr_assert_eq(wp_shdict_incr(d, "k", 1, &one, &zero, 0, &out), 0);
  cr_assert_eq(wp_shdict_ttl(d, "k", 1, &ttl), 0);
  cr_assert(ttl > 90 && ttl <= 100, "incr keeps the ttl: %f", ttl);

  cr_assert_eq(set(d, "p", vint(1), 0), 0);
  cr_assert_eq(wp_shdict_incr(d, "p", 1, &one, &zero, 100, &out), 0);
  cr_assert_eq(wp_shdict_ttl(d, "p", 1, &ttl), 0);
  cr_assert_eq(ttl, 0, "ttl applies only when init creates the key");
}

Test(shdict, cas) {
  wp_shdict *d = open_dict("cas", 0);
  wp_shval nil = vnil(), i1 = vint(1), n1 = vnum(1.0), s = vstr("ab", 2);
  wp_shval s2 = vstr("ab\0", 3), t = vbool(1), f = vbool(0);
  double ttl;

  /* nil old: must be absent. */
  cr_assert_eq(wp_shdict_cas(d, "k", 1, &nil, &i1), 1);
  cr_assert_eq(wp_shdict_cas(d, "k", 1, &nil, &n1), 0);
  cr_assert_eq(get_int(d, "k"), 1);

  /* Integer 1 and float 1.0 differ. */
  cr_assert_eq(wp_shdict_cas(d, "k", 1, &n1, &s), 0);
  cr_assert_eq(get_int(d, "k"), 1);
  cr_assert_eq(wp_shdict_cas(d, "k", 1, &i1, &n1), 1);
  cr_assert_eq(wp_shdict_cas(d, "k", 1, &i1, &s), 0);
  cr_assert_eq(wp_shdict_cas(d, "k", 1, &n1, &s), 1);

  /* Strings compare bytewise, length included. */
  cr_assert_eq(wp_shdict_cas(d, "k", 1, &s2, &t), 0);
  cr_assert_eq(wp_shdict_cas(d, "k", 1, &s, &t), 1);
  cr_assert_eq(wp_shdict_cas(d, "k", 1, &f, &s), 0);
  cr_assert_eq(wp_shdict_cas(d, "k", 1, &t, &f), 1);
  cr_assert_eq(get(d, "k").u.b, 0);

  /* nil new deletes. */
  cr_assert_eq(wp_shdict_cas(d, "k", 1, &f, &nil), 1);
  assert_absent(d, "k");
  cr_assert_eq(wp_shdict_cas(d, "k", 1, &i1, &n1), 0, "absent != 1");

  /* A swap keeps the expiry. */
  cr_assert_eq(set(d, "e", vint(1), 100), 0);
  cr_assert_eq(wp_shdict_cas(d, "e", 1, &i1, &s), 1);
  cr_assert_eq(wp_shdict_ttl(d, "e", 1, &ttl), 0);
  cr_assert(ttl > 90 && ttl <= 100, "cas keeps the ttl: %f", ttl);
}

/* ------------------------------------------------------------------ */
/* Keys                                                                */
/* ------------------------------------------------------------------ */

typedef struct seen {
  int count;
  int mask; /* bit i: key "k<i>" seen */
} seen;

static void on_key(const char *k, size_t klen, void *ud) {
  seen *s = ud;
  s->count++;
  if (klen == 2 && k[0] == 'k' && k[1] >= '0' && k[1] <= '9')
    s->mask |= 1 << (k[1] - '0');
}

Test(shdict, keys) {
  wp_shdict *d = open_dict("keys", 0);
  seen s = {0, 0};
  char k[3] = "k0";

  cr_assert_eq(wp_shdict_keys(d, 0, on_key, &s), 0);
  for (int i = 0; i < 10; i++) {
    k[1] = (char)('0' + i);
    cr_assert_eq(set(d, k, vint(i), 0), 0);
  }
  cr_assert_eq(wp_shdict_keys(d, 0, on_key, &s), 10);
  cr_assert_eq(s.count, 10);
  cr_assert_eq(s.mask, 0x3ff);

  s.count = 0;
  cr_assert_eq(wp_shdict_keys(d, 4, on_key, &s), 4);
  cr_assert_eq(s.count, 4);

  s.count = 0;
  cr_assert_eq(wp_shdict_keys(d, 100, on_key, &s), 10);
  cr_assert_eq(s.count, 10);
}

Test(shdict, many_keys_grow_the_table) {
  wp_shdict *d = open_dict("many", 0);
  char k[32];
  for (int i = 0; i < 5000; i++) {
    snprintf(k, sizeof k, "key-%d", i);
    cr_assert_eq(set(d, k, vint(i), 0), 0);
  }
  for (int i = 0; i < 5000; i++) {
    snprintf(k, sizeof k, "key-%d", i);
    cr_assert_eq(get_int(d, k), i);
  }
}

/* ------------------------------------------------------------------ */
/* Expiry                                                              */
/* ------------------------------------------------------------------ */

Test(shdict, ttl_and_expiry) {
  wp_shdict *d = open_dict("ttl", 0);
  double ttl, t0, deadline;
  wp_shval v;
  seen s = {0, 0};

  cr_assert_eq(set(d, "forever", vint(1), 0), 0);
  cr_assert_eq(wp_shdict_ttl(d, "forever", 7, &ttl), 0);
  cr_assert_eq(ttl, 0);
  cr_assert_eq(wp_shdict_ttl(d, "missing", 7, &ttl), WP_ENOTFOUND);

  cr_assert_eq(set(d, "long", vint(1), 100), 0);
  cr_assert_eq(wp_shdict_ttl(d, "long", 4, &ttl), 0);
  cr_assert(ttl > 90 && ttl <= 100, "ttl %f", ttl);

  t0 = now_s();
  cr_assert_eq(set(d, "k0", vstr("short", 5), 0.05), 0);
  v = get(d, "k0");
  if (now_s() - t0 < 0.05)
    cr_assert_eq(v.type, WP_TSTRING, "present before its ttl ran out");
  wp_shval_free(&v);

  /* Poll until it expires: 10 s is far beyond 0.05 s. */
  deadline = now_s() + 10;
  for (;;) {
    v = get(d, "k0");
    if (v.type == WP_TNIL) break;
    wp_shval_free(&v);
    cr_assert(now_s() < deadline, "key never expired");
    uv_sleep(5);
  }
  cr_assert(now_s() - t0 >= 0.05, "expired early");
  cr_assert_eq(wp_shdict_ttl(d, "k0", 2, &ttl), WP_ENOTFOUND);
  cr_assert_eq(wp_shdict_incr(d, "k0", 2, &(wp_shval){WP_TINTEGER, {.i = 1}},
                              NULL, 0, &v),
               WP_ENOTFOUND);
  cr_assert_eq(wp_shdict_add(d, "k0", 2, &(wp_shval){WP_TBOOLEAN, {.b = 1}}, 0),
               0, "add succeeds on an expired key");

  /* An expired key is not listed. */
  cr_assert_eq(set(d, "k1", vint(1), 0.01), 0);
  deadline = now_s() + 10;
  while (wp_shdict_keys(d, 0, on_key, &s), s.mask & 2) {
    cr_assert(now_s() < deadline, "key never expired");
    s.mask = 0;
    uv_sleep(5);
  }
}

/* ------------------------------------------------------------------ */
/* Capacity                                                            */
/* ------------------------------------------------------------------ */

#define VAL100                                                                 \
  "0123456789012345678901234567890123456789012345678901234567890123456789"     \
  "012345678901234567890123456789"

Test(shdict, capacity_never_evicts) {
  wp_shdict *d = open_dict("cap.small", 4096);
  char k[16];
  int n;
  size_t used, cap, used_full;
  wp_shval v;

  for (n = 0;; n++) {
    int rc;
    snprintf(k, sizeof k, "k%d", n);
    rc = set(d, k, vstr(VAL100, 100), 0);
    if (rc == WP_ENOMEM) break;
    cr_assert_eq(rc, 0);
    cr_assert(n < 1000, "capacity is not enforced");
  }
  cr_assert_gt(n, 10);
  wp_shdict_usage(d, &used_full, &cap);
  cr_assert_eq(cap, 4096);
  cr_assert_leq(used_full, cap);

  /* Everything stored survived, and a failed set stored nothing. */
  for (int i = 0; i < n; i++) {
    snprintf(k, sizeof k, "k%d", i);
    assert_str(d, k, strlen(k), VAL100, 100);
  }
  snprintf(k, sizeof k, "k%d", n);
  assert_absent(d, k);

  /* Replacing a value by a bigger one that does not fit keeps the old. */
  {
    static char big[4096];
    memset(big, 'b', sizeof big);
    cr_assert_eq(set(d, "k0", vstr(big, sizeof big), 0), WP_ENOMEM);
    assert_str(d, "k0", 2, VAL100, 100);
  }
  wp_shdict_usage(d, &used, NULL);
  cr_assert_eq(used, used_full);

  /* Fill the last bytes with integers (65 bytes each: 64 + a 1-byte key),
   * then incr with init finds no room either. */
  for (char c = 'A'; set(d, (char[]){c, 0}, vint(1), 0) == 0; c++)
    cr_assert(c < 'Z');
  v = vint(1);
  cr_assert_eq(wp_shdict_incr(d, "zz", 2, &v, &v, 0, &v), WP_ENOMEM);
  cr_assert_eq(v.type, WP_TNIL);
  assert_absent(d, "zz");
  assert_str(d, "k1", 2, VAL100, 100);

  /* After deleting some, new sets fit again. */
  cr_assert_eq(wp_shdict_delete(d, "k0", 2), 0);
  cr_assert_eq(wp_shdict_delete(d, "k1", 2), 0);
  cr_assert_eq(set(d, "again", vstr(VAL100, 100), 0), 0);
  cr_assert_eq(set(d, "again2", vstr(VAL100, 100), 0), 0);
  assert_str(d, "again", 5, VAL100, 100);
}

Test(shdict, capacity_purges_expired) {
  wp_shdict *d = open_dict("cap.expiry", 2048);
  char k[16];
  int n;
  double deadline;

  for (n = 0; set(d, (snprintf(k, sizeof k, "e%d", n), k), vstr(VAL100, 100),
                  0.01) == 0;
       n++)
    cr_assert(n < 1000);
  cr_assert_gt(n, 5);

  /* Once they expire, their room is reused without any explicit delete. */
  deadline = now_s() + 10;
  while (set(d, "live", vstr(VAL100, 100), 0) == WP_ENOMEM) {
    cr_assert(now_s() < deadline, "expired entries were never purged");
    uv_sleep(5);
  }
  for (int i = 0; i < n - 1; i++) {
    snprintf(k, sizeof k, "l%d", i);
    cr_assert_eq(set(d, k, vstr(VAL100, 100), 0), 0, "%s", k);
  }
}

/* ------------------------------------------------------------------ */
/* Threads                                                             */
/* ------------------------------------------------------------------ */

#define NTHREADS 4
#define NINCR 20000

static void hammer(void *arg) {
  wp_shdict *d;
  wp_shval one = vint(1), zero = vint(0), out;
  (void)arg;
  /* Each thread opens by name, as separate Lua states do. */
  if (wp_shdict_open("contention", 0, &d) != 0) return;
  for (int i = 0; i < NINCR; i++)
    if (wp_shdict_incr(d, "hits", 4, &one, &zero, 0, &out) != 0) return;
}

Test(shdict, contention, .timeout = 60) {
  uv_thread_t t[NTHREADS];
  wp_shdict *d;
  for (int i = 0; i < NTHREADS; i++)
    cr_assert_eq(uv_thread_create(&t[i], hammer, NULL), 0);
  for (int i = 0; i < NTHREADS; i++)
    cr_assert_eq(uv_thread_join(&t[i]), 0);
  d = open_dict("contention", 0);
  cr_assert_eq(get_int(d, "hits"), NTHREADS * NINCR);
}
