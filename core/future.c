/*
 * future.c: the handle a submitter keeps for one task.
 *
 * A future is created by submit with two references (the submitter's and
 * the queue's), travels through the pool's queue to a worker, and ends
 * exactly once: with results, an error value, or as discarded/cancelled.
 * Waiters sleep on the future's own condition variable; a completion
 * callback lets an event loop hear about it instead (see wp_future_on_done).
 */
#include <stdlib.h>
#include <string.h>

#include "wp_internal.h"

wp_future *wp__future_new(wp_pool *p, char *msg, size_t len) {
  wp_future *f = calloc(1, sizeof *f);
  if (f == NULL) goto err;
  if (uv_mutex_init(&f->mu)) goto err;
  if (uv_cond_init(&f->cv)) {
    uv_mutex_destroy(&f->mu);
    goto err;
  }
  atomic_init(&f->refs, 2);
  atomic_init(&f->status, WP_PENDING);
  f->msg = msg;
  f->msg_len = len;
  f->pool = p;
  wp__pool_mretain(p);
  return f;
err:
  free(f);
  free(msg);
  return NULL;
}

const char *wp_future_pool_name(const wp_future *f) {
  return wp_pool_name(f->pool);
}

void wp_future_retain(wp_future *f) {
  atomic_fetch_add_explicit(&f->refs, 1, memory_order_relaxed);
}

void wp_future_release(wp_future *f) {
  if (f == NULL ||
      atomic_fetch_sub_explicit(&f->refs, 1, memory_order_acq_rel) != 1)
    return;
  uv_cond_destroy(&f->cv);
  uv_mutex_destroy(&f->mu);
  free(f->msg);
  free(f->result);
  free(f->name);
  free(f->tenant);
  while (f->done) { /* only if it never ended: a bug, but no leak */
    wp__done *d = f->done;
    f->done = d->next;
    free(d);
  }
  wp__pool_mrelease(f->pool);
  free(f);
}

wp_status wp_future_status(wp_future *f) {
  return (wp_status)atomic_load_explicit(&f->status, memory_order_acquire);
}

int wp__future_complete(wp_future *f, wp_status status, char *result,
                        size_t len) {
  wp__done *done;
  uv_mutex_lock(&f->mu);
  if (atomic_load_explicit(&f->status, memory_order_relaxed) != WP_PENDING) {
    uv_mutex_unlock(&f->mu); /* ended already (stuck, then returned) */
    free(result);
    return 0;
  }
  f->result = result;
  f->result_len = len;
  /* f->msg stays: a worker declared stuck may still be reading it.  The
   * worker frees it after running, release frees it otherwise. */
  f->t_end = uv_hrtime();
  atomic_store_explicit(&f->status, status, memory_order_release);
  if (f->nwaiters) uv_cond_broadcast(&f->cv);
  done = f->done;
  f->done = NULL;
  uv_mutex_unlock(&f->mu);
  while (done) { /* in registration order: the list is newest first */
    wp__done *d = done, *prev = NULL;
    while (d->next) {
      prev = d;
      d = d->next;
    }
    if (prev)
      prev->next = NULL;
    else
      done = NULL;
    d->cb(f, d->ud);
    free(d);
  }
  return 1;
}

int wp__future_fail(wp_future *f, wp_status status, const char *msg) {
  wp__buf b = {0};
  wp_value v;
  v.type = WP_TSTRING;
  v.u.s.ptr = msg;
  v.u.s.len = strlen(msg);
  if (wp__put_varint(&b, 1) || wp__put_cvalue(&b, &v)) wp__buf_free(&b);
  return wp__future_complete(f, status, b.data, b.len);
}

static int future_ended(void *f) {
  return wp_future_status(f) != WP_PENDING;
}

int wp_future_wait(wp_future *f, double timeout) {
  uint64_t deadline = 0;
  int r = 0;
  if (wp_future_status(f) != WP_PENDING) return 0;
  if (timeout != 0 && wp__spin(future_ended, f)) return 0;
  if (timeout >= 0) {
    if (timeout > 1e9) timeout = 1e9; /* about 31 years */
    deadline = uv_hrtime() + (uint64_t)(timeout * 1e9);
  }
  uv_mutex_lock(&f->mu);
  f->nwaiters++;
  while (atomic_load_explicit(&f->status, memory_order_relaxed) == WP_PENDING) {
    if (timeout < 0) {
      uv_cond_wait(&f->cv, &f->mu);
    } else {
      uint64_t now = uv_hrtime();
      if (now >= deadline) {
        r = WP_ETIMEDOUT;
        break;
      }
      uv_cond_timedwait(&f->cv, &f->mu, deadline - now);
    }
  }
  f->nwaiters--;
  uv_mutex_unlock(&f->mu);
  return r;
}

int wp_future_cancel(wp_future *f) {
  if (wp_future_status(f) != WP_PENDING) return 0;
  switch (wp__pool_cancel(f->pool, f)) {
  case 1: /* it never started */
    if (wp__future_fail(f, WP_CANCELLED, "cancelled"))
      wp__pool_count_end(f->pool, WP_CANCELLED, -1);
    wp_future_release(f); /* the queue's reference */
    return 1;
  case 2: /* its worker interrupts it */
    return 1;
  default:
    return 0;
  }
}

int wp_future_on_done(wp_future *f, wp_done_fn cb, void *ud) {
  wp__done *d = malloc(sizeof *d);
  int done;
  if (d == NULL) return WP_ENOMEM;
  d->cb = cb;
  d->ud = ud;
  uv_mutex_lock(&f->mu);
  done = atomic_load_explicit(&f->status, memory_order_relaxed) != WP_PENDING;
  if (!done) {
    d->next = f->done;
    f->done = d;
  }
  uv_mutex_unlock(&f->mu);
  if (done) {
    free(d);
    cb(f, ud);
  }
  return 0;
}

double wp_future_run_time(const wp_future *f) {
  if (f->t_start == 0 || f->t_end < f->t_start) return 0;
  return (double)(f->t_end - f->t_start) / 1e9;
}

int wp_future_values(wp_future *f, wp_value *out, int max) {
  wp__reader r;
  uint64_t n, i;
  wp_status st = wp_future_status(f);
  if (st == WP_PENDING) return WP_EINVAL;
  if (f->result == NULL) return 0;
  r.p = f->result;
  r.end = f->result + f->result_len;
  if (wp__get_varint(&r, &n) || n > INT32_MAX) return WP_EINVAL;
  for (i = 0; i < n && (int)i < max; i++)
    if (wp__get_cvalue(&r, &out[i])) return WP_EINVAL;
  return (int)n;
}

int wp_future_push(wp_future *f, lua_State *L) {
  wp__reader r;
  uint64_t n;
  if (wp_future_status(f) == WP_PENDING) return WP_EINVAL;
  if (f->result == NULL) return 0;
  r.p = f->result;
  r.end = f->result + f->result_len;
  if (wp__get_varint(&r, &n) || n > INT32_MAX) return WP_EINVAL;
  wp__decode(L, &r, (int)n, 0);
  return (int)n;
}
