/*
 * test_stress.c: many tasks through pools that are cancelled, timed out,
 * paused, resized and stopped at random, through the public C API
 * (docs/testing.md).
 *
 * The work is split into rounds.  Each round makes a pool with 2-8
 * workers and random guards, and runs at once:
 *   - two submitter threads, each with its own Lua state, submitting
 *     named tasks (quick ones, CPU spins, errors, large results, and
 *     endless loops that only their deadline or a cancel ends) by
 *     wp_submit_values or by wp_submit_lua_opts with a random deadline;
 *   - a chaos thread that cancels random tasks, pauses and resumes the
 *     pool, and resizes it;
 *   - the main thread, which stops the pool at a random point (stop,
 *     stop_wait, stop_wait_for with a short deadline, or shutdown then
 *     stop_wait), often while the submitters and the chaos thread are
 *     still going.
 * Then it checks that every future resolved exactly once (its completion
 * callback ran once, with the status it kept), that every result is the
 * right one, that a cancel which said "will be cancelled" was (whatever
 * the task was doing: returning from C code, or racing its deadline), and
 * that the pool's stats add up: submitted = ok + error + timeout +
 * cancelled + discarded, each equal to what the futures say, refusals
 * counted as dropped_stopped, and nothing queued, running or alive.
 *
 * Environment: WPOOL_STRESS_TASKS, the number of tasks (default 500000,
 * the size CI runs; 10000000 is the long form); WPOOL_STRESS_SEED, the
 * random seed (printed; thread timing still varies); WPOOL_STRESS_VERBOSE,
 * a line per round.
 */
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lualib.h>
#include <uv.h>

#include "wpool.h"

#define ROUND_TASKS 20000 /* most tasks per round */
#define NSUBMITTERS 2
#define ROUND_LIMIT_S 240 /* a round taking longer hangs */

enum { K_INC, K_SPIN, K_FAIL, K_BIG, K_LOOP };

typedef struct rec {
  _Atomic(wp_future *) f; /* published once submitted */
  int kind;
  int64_t arg;
  atomic_int done;      /* completion callbacks run */
  atomic_int cb_status; /* the status the callback saw */
  atomic_int cancelled; /* a cancel returned 1 */
} rec;

typedef struct round {
  wp_pool *p;
  rec *recs;
  int ntasks;           /* records to fill */
  atomic_int next;      /* next record to claim */
  atomic_int nrefused;  /* submits refused as stopped */
  atomic_int submitted; /* submits accepted */
  atomic_int over;      /* the round is over: chaos ends */
  unsigned seed;
} round;

static const char init_src[] =
    "function inc(x) return x + 1 end\n"
    "function spin(n) local s = 0 for i = 1, n do s = s + i end return s end\n"
    "function fail(x) error('boom ' .. x) end\n"
    "function big(n) return string.rep('x', n) end\n"
    /* It allocates: under TSan a signal handler runs only when its
     * thread next calls a function TSan intercepts (malloc, ...). */
    "function loop() while true do local _ = {} end end\n";

static const char *const handlers[] = {"inc", "spin", "fail", "big", "loop"};

static char round_info[256]; /* printed when a round hangs */
static int verbose;          /* WPOOL_STRESS_VERBOSE: a line per round */

static void on_alarm(int sig) {
  (void)sig;
  (void)!write(2, round_info, strlen(round_info));
  (void)!write(2, ": round hangs\n", 14);
  abort();
}

static void fail(const char *fmt, ...) {
  va_list ap;
  fprintf(stderr, "test_stress: %s: ", round_info);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  abort();
}

static unsigned rnd(unsigned *s) { /* xorshift32 */
  unsigned x = *s;
  x ^= x << 13;
  x ^= x >> 17;
  x ^= x << 5;
  return *s = x;
}

static void nap_us(unsigned us) {
  struct timespec ts = {0, (long)us * 1000};
  nanosleep(&ts, NULL);
}

static void on_done(wp_future *f, void *ud) {
  rec *r = ud;
  atomic_store(&r->cb_status, (int)wp_future_status(f));
  atomic_fetch_add(&r->done, 1);
}

/* ---- submitters ------------------------------------------------------ */

static void submitter(void *arg) {
  round *rd = arg;
  lua_State *L = luaL_newstate();
  unsigned s = rd->seed ^ (unsigned)(uintptr_t)&s;
  int i, r;
  if (L == NULL) fail("no memory");
  while ((i = atomic_fetch_add(&rd->next, 1)) < rd->ntasks) {
    rec *c = &rd->recs[i];
    wp_future *f = NULL;
    unsigned k = rnd(&s) % 100;
    c->kind = k < 60 ? K_INC : k < 85 ? K_SPIN : k < 95 ? K_FAIL : K_BIG;
    if (k < 2) c->kind = K_LOOP; /* only a deadline or a cancel ends it */
    c->arg = c->kind == K_SPIN  ? (int64_t)(rnd(&s) % 20000)
             : c->kind == K_BIG ? (int64_t)(rnd(&s) % 2000)
                                : (int64_t)i;
    if (c->kind != K_LOOP && rnd(&s) % 2) {
      wp_value v;
      v.type = WP_TINTEGER;
      v.u.i = c->arg;
      r = wp_submit_values(rd->p, handlers[c->kind], &v, 1, &f);
    } else {
      wp_task_opts o;
      memset(&o, 0, sizeof o);
      o.name = "stress";
      /* No deadline, the pool's, or 0.1-2 ms. */
      k = rnd(&s) % 4;
      o.timeout = k == 0 ? -1 : k == 1 ? 0 : 1e-4 * (1 + rnd(&s) % 20);
      if (c->kind == K_LOOP) o.timeout = 1e-3 * (1 + rnd(&s) % 5);
      lua_settop(L, 0);
      lua_pushstring(L, handlers[c->kind]);
      lua_pushinteger(L, c->arg);
      r = wp_submit_lua_opts(rd->p, L, 1, 1, "submit", &o, &f);
    }
    if (r == WP_ESTOPPED) {
      atomic_fetch_add(&rd->nrefused, 1);
      continue; /* others may still be racing the stop: keep counting */
    }
    if (r != 0) fail("submit: %s", wp_strerror(r));
    atomic_fetch_add(&rd->submitted, 1);
    if (wp_future_on_done(f, on_done, c) != 0) fail("on_done");
    atomic_store(&c->f, f);
  }
  lua_close(L);
}

/* ---- chaos ----------------------------------------------------------- */

static void chaos(void *arg) {
  round *rd = arg;
  unsigned s = rd->seed * 7919u + 1;
  while (!atomic_load(&rd->over)) {
    unsigned k = rnd(&s) % 100;
    int n = atomic_load(&rd->next);
    nap_us(rnd(&s) % 500);
    if (k < 60 && n > 0) {
      rec *c = &rd->recs[rnd(&s) % (unsigned)(n < rd->ntasks ? n : rd->ntasks)];
      wp_future *f = atomic_load(&c->f);
      if (f && wp_future_cancel(f)) atomic_store(&c->cancelled, 1);
    } else if (k < 70) {
      wp_pool_pause(rd->p);
      nap_us(rnd(&s) % 300);
      wp_pool_resume(rd->p);
    } else if (k < 85) {
      int r = wp_pool_resize(rd->p, 2 + (int)(rnd(&s) % 7));
      if (r != 0 && r != WP_ESTOPPED) fail("resize: %s", wp_strerror(r));
    }
  }
}

/* ---- checking -------------------------------------------------------- */

/* Checks one resolved future against what its task should return. */
static void check_rec(rec *c, uint64_t *by_status) {
  wp_future *f = atomic_load(&c->f);
  wp_status st = wp_future_status(f);
  wp_value v;
  int n;
  if (st == WP_PENDING) fail("a future is pending after stop");
  if (atomic_load(&c->done) != 1)
    fail("on_done ran %d times", atomic_load(&c->done));
  if (atomic_load(&c->cb_status) != (int)st)
    fail("the callback saw %d, the future says %d", atomic_load(&c->cb_status),
         (int)st);
  /* A cancel that said yes wins, even over a task returning from C code
   * (big's string.rep is a tail call) or over the task's deadline. */
  if (atomic_load(&c->cancelled) && st != WP_CANCELLED)
    fail("cancel said yes, the future ended %d (kind %d)", (int)st, c->kind);
  by_status[st]++;
  n = wp_future_values(f, &v, 1);
  switch (st) {
  case WP_OK:
    if (c->kind == K_FAIL || c->kind == K_LOOP || n != 1)
      fail("%d results (kind %d)", n, c->kind);
    if (c->kind == K_INC && (v.type != WP_TINTEGER || v.u.i != c->arg + 1))
      fail("inc(%ld) gave a wrong result", (long)c->arg);
    if (c->kind == K_SPIN &&
        (v.type != WP_TINTEGER || v.u.i != c->arg * (c->arg + 1) / 2))
      fail("spin(%ld) gave a wrong result", (long)c->arg);
    if (c->kind == K_BIG &&
        (v.type != WP_TSTRING || v.u.s.len != (size_t)c->arg))
      fail("big(%ld) gave a wrong result", (long)c->arg);
    break;
  case WP_ERROR:
    if (c->kind != K_FAIL || n != 1 || v.type != WP_TSTRING ||
        !memmem(v.u.s.ptr, v.u.s.len, "boom", 4))
      fail("an unexpected error (kind %d)", c->kind);
    break;
  default:
    break; /* cancelled, discarded, timed out: any task */
  }
}

static void check_round(round *rd) {
  uint64_t by[WP_TIMEOUT + 1] = {0};
  wp_pool_stats s;
  wp_pool_counts pc;
  int i, n = atomic_load(&rd->next), nsub = 0;
  if (n > rd->ntasks) n = rd->ntasks;
  for (i = 0; i < n; i++) {
    if (atomic_load(&rd->recs[i].f) == NULL) continue; /* refused */
    nsub++;
    check_rec(&rd->recs[i], by);
  }
  if (nsub != atomic_load(&rd->submitted))
    fail("%d futures, %d accepted submits", nsub, atomic_load(&rd->submitted));
  wp_pool_get_stats(rd->p, &s);
  wp_pool_get_counts(rd->p, &pc);
#define SAME(what, a, b)                                                       \
  if ((uint64_t)(a) != (uint64_t)(b))                                          \
  fail("stats: " what ": %ld, expected %ld", (long)(a), (long)(b))
  SAME("submitted", s.submitted, nsub);
  SAME("ok", s.ok, by[WP_OK]);
  SAME("error", s.error, by[WP_ERROR]);
  SAME("timeout", s.timeout, by[WP_TIMEOUT]);
  SAME("cancelled", s.cancelled, by[WP_CANCELLED]);
  SAME("discarded", s.dropped_discarded, by[WP_DISCARDED]);
  SAME("the identity", s.submitted,
       s.ok + s.error + s.timeout + s.cancelled + s.dropped_discarded);
  SAME("dropped_stopped", s.dropped_stopped, atomic_load(&rd->nrefused));
  SAME("dropped_full", s.dropped_full, 0);
  SAME("stuck_total", s.stuck_total, 0); /* every interrupt arrived */
  SAME("queued", s.queued, 0);
  SAME("running", s.running, 0);
  SAME("workers", pc.workers, 0);
  SAME("waiting", pc.waiting, 0);
#undef SAME
  if (verbose)
    printf("%s: ok %lu error %lu timeout %lu cancelled %lu discarded %lu "
           "refused %d\n",
           round_info, (unsigned long)s.ok, (unsigned long)s.error,
           (unsigned long)s.timeout, (unsigned long)s.cancelled,
           (unsigned long)s.dropped_discarded, atomic_load(&rd->nrefused));
}

/* ---- rounds ---------------------------------------------------------- */

static void run_round(int ntasks, unsigned seed, int number) {
  round rd;
  wp_options o;
  uv_thread_t subs[NSUBMITTERS], dog;
  char err[256];
  unsigned s = seed;
  int i, r, stop_at, how;
  double wait_for = 0;
  memset(&rd, 0, sizeof rd);
  rd.seed = seed;
  rd.ntasks = ntasks;
  rd.recs = calloc((size_t)ntasks, sizeof *rd.recs);
  if (rd.recs == NULL) fail("no memory");
  wp_options_init(&o);
  o.max_workers = 2 + (int)(rnd(&s) % 7);
  o.min_workers = (int)(rnd(&s) % 3);
  o.idle_timeout = (double[]){-1, 0.001, 0.05}[rnd(&s) % 3];
  o.task_timeout = rnd(&s) % 2 ? 0 : 0.002;
  /* Tasks are finite: only a stall, never a task, can outlast this. */
  o.stuck_grace = 30;
  o.init = init_src;
  o.init_len = sizeof init_src - 1;
  /* Stop after a random share of the tasks: a third of rounds stop while
   * the submitters are still going. */
  stop_at = rnd(&s) % 3 ? ntasks : (int)(rnd(&s) % (unsigned)ntasks);
  how = (int)(rnd(&s) % 4);
  if (how == 2) wait_for = 1e-3 * (rnd(&s) % 20);
  snprintf(round_info, sizeof round_info,
           "round %d seed %u: %d tasks, workers %d-%d, idle %g, timeout %g, "
           "stop at %d by %d (%g)",
           number, seed, ntasks, o.min_workers, o.max_workers, o.idle_timeout,
           o.task_timeout, stop_at, how, wait_for);
  alarm(ROUND_LIMIT_S);
  if ((r = wp_pool_new(&o, &rd.p, err, sizeof err)) != 0) fail("new: %s", err);
  for (i = 0; i < NSUBMITTERS; i++)
    uv_thread_create(&subs[i], submitter, &rd);
  uv_thread_create(&dog, chaos, &rd);
  while (atomic_load(&rd.next) < stop_at)
    nap_us(200);
  /* Chaos goes on through the stop: cancels race the end of tasks and
   * workers that exit and are freed. */
  switch (how) {
  case 0:
    wp_pool_stop(rd.p);
    break;
  case 1:
    wp_pool_stop_wait(rd.p);
    break;
  case 2:
    wp_pool_stop_wait_for(rd.p, wait_for);
    break;
  default:
    wp_pool_shutdown(rd.p, (int)(rnd(&s) % 2));
    wp_pool_stop_wait(rd.p);
  }
  for (i = 0; i < NSUBMITTERS; i++)
    uv_thread_join(&subs[i]);
  atomic_store(&rd.over, 1);
  uv_thread_join(&dog);
  check_round(&rd);
  for (i = 0; i < ntasks; i++)
    if (rd.recs[i].f) wp_future_release(rd.recs[i].f);
  wp_pool_release(rd.p);
  free(rd.recs);
  alarm(0);
}

int main(void) {
  const char *e = getenv("WPOOL_STRESS_TASKS");
  long total = e ? atol(e) : 500000, done = 0;
  unsigned seed;
  int number = 0;
  verbose = getenv("WPOOL_STRESS_VERBOSE") != NULL;
  e = getenv("WPOOL_STRESS_SEED");
  seed = e ? (unsigned)atol(e) : (unsigned)time(NULL);
  if (seed == 0) seed = 1;
  printf("test_stress: %ld tasks, WPOOL_STRESS_SEED=%u\n", total, seed);
  fflush(stdout);
  signal(SIGALRM, on_alarm);
  while (done < total) {
    unsigned s = seed + (unsigned)number;
    long n = 1000 + (long)(rnd(&s) % ROUND_TASKS);
    if (n > total - done) n = total - done;
    run_round((int)n, s, ++number);
    done += n;
  }
  printf("test_stress: %d rounds, %ld tasks: every future resolved once\n",
         number, done);
  return 0;
}
