/*
 * future.c: the handle a submitter keeps for one task.
 *
 * A future is created by submit with two references (the submitter's and
 * the queue's), travels through the pool's queue to a worker, and ends
 * exactly once: with results, an error value, or as discarded/cancelled.
 * A future is one allocation with its message inside when it is small, and
 * small results go into it too.  Waiting threads sleep on their pool's
 * done_cv; a completion callback lets an event loop hear about it instead
 * (see wp_future_on_done).
 */
#include <stdlib.h>
#include <string.h>

#include "wp_internal.h"

/* f->done once the future ended: later callbacks run at once. */
static wp__done done_closed;
#define DONE_CLOSED (&done_closed)

wp_future *wp__future_new(wp_pool *p, wp__buf *b) {
  size_t inl = b->len <= WP__INLINE_MSG || b->borrowed ? b->len : 0;
  wp_future *f = wp__slab_alloc(sizeof *f + inl);
  if (f == NULL) {
    wp__buf_free(b);
    return NULL;
  }
  memset(f, 0, sizeof *f);
  atomic_init(&f->refs, 2);
  atomic_init(&f->status, WP_PENDING);
  atomic_init(&f->nwaiters, 0);
  atomic_init(&f->done, NULL);
  f->msg_len = (uint32_t)b->len; /* at most WP_MAX_MSG */
  if (inl || b->len == 0) {
    if (b->len) memcpy(f->inline_msg, b->data, b->len);
    f->msg = f->inline_msg;
    wp__buf_free(b);
  } else {
    f->msg = b->data; /* taken */
    f->msg_owned = 1;
    b->data = NULL;
    b->len = b->cap = 0;
  }
  f->pool = p;
  wp__pool_mretain(p);
  return f;
}

const char *wp_future_pool_name(const wp_future *f) {
  return wp_pool_name(f->pool);
}

void wp_future_retain(wp_future *f) {
  atomic_fetch_add_explicit(&f->refs, 1, memory_order_relaxed);
}

void wp_future_release(wp_future *f) {
  wp__done *d;
  int refs;
  if (f == NULL) return;
  refs = atomic_fetch_sub_explicit(&f->refs, 1, memory_order_acq_rel);
  assert(refs > 0);
  if (refs != 1) return;
  /* The queue and a running worker each hold a reference. */
  assert(!f->queued && f->worker == NULL);
  if (f->msg_owned) free(f->msg);
  if (f->result != f->result_buf) free(f->result);
  free(f->name);
  free(f->tenant);
  d = atomic_load_explicit(&f->done, memory_order_relaxed);
  while (d && d != DONE_CLOSED) { /* only if it never ended */
    wp__done *next = d->next;
    free(d);
    d = next;
  }
  wp__pool_mrelease(f->pool);
  wp__slab_free(f);
}

/* In the child of a fork, a future of a pool made before it (its worker
 * is in the parent) ends failed the first time it is looked at: without
 * the pool's locks, which a thread of the parent may hold, and without the
 * callbacks registered in the parent (they could wake the parent's event
 * loop), which stay unrun. */
static wp_status end_forked(wp_future *f, int st) {
  WP__STR_RESULT(forked, "pool of the parent process (made before fork)");
  WP__STR_RESULT(brief, "forked");
  if (!atomic_compare_exchange_strong(&f->status, &st, WP__CLAIMED))
    return wp_future_status(f);
  if ((f->result = malloc(sizeof forked)) != NULL) {
    memcpy(f->result, &forked, sizeof forked);
    f->result_len = sizeof forked;
  } else {
    f->result = f->result_buf;
    memcpy(f->result, &brief, sizeof brief);
    f->result_len = sizeof brief;
  }
  f->t_end = uv_hrtime();
  atomic_store(&f->done, DONE_CLOSED);
  atomic_store(&f->status, WP_ERROR);
  return WP_ERROR;
}

wp_status wp_future_status(wp_future *f) {
  int st = atomic_load_explicit(&f->status, memory_order_acquire);
  if (st != WP_PENDING && st < WP__CLAIMED) return (wp_status)st;
  return wp__pool_forked(f->pool) ? end_forked(f, st) : WP_PENDING;
}

/* Runs callbacks in registration order: the list is newest first. */
static void run_callbacks(wp_future *f, wp__done *list) {
  wp__done *rev = NULL;
  while (list) {
    wp__done *next = list->next;
    list->next = rev;
    rev = list;
    list = next;
  }
  while (rev) {
    wp__done *next = rev->next;
    rev->cb(f, rev->ud);
    free(rev);
    rev = next;
  }
}

/* Waiters and completers pair like this: a waiter counts itself in
 * f->nwaiters, then checks the status under the pool's done_mu before it
 * sleeps; a completer stores the status, then broadcasts under done_mu if
 * it sees a waiter.  Both sides are sequentially consistent, so at least
 * one of them sees the other: no wake-up is lost, and a future nobody
 * waits for costs no lock at all. */
int wp__future_complete(wp_future *f, wp_status status, const char *result,
                        size_t len) {
  WP__STR_RESULT(oom, "not enough memory");
  WP__STR_RESULT(cancelled, "cancelled");
  wp_pool *p = f->pool;
  int expected = WP_PENDING;
  if (!atomic_compare_exchange_strong_explicit(
          &f->status, &expected, WP__CLAIMED, memory_order_acquire,
          memory_order_relaxed)) {
    if (expected != WP__CANCELLING ||
        !atomic_compare_exchange_strong_explicit(
            &f->status, &expected, WP__CLAIMED, memory_order_acquire,
            memory_order_relaxed))
      return 0; /* ended already (stuck, then returned) */
    /* An accepted cancel decides the outcome, however the task ended. */
    status = WP_CANCELLED;
    result = (const char *)&cancelled;
    len = sizeof cancelled;
  }
  /* f->msg stays: a worker declared stuck may still be reading it. */
  if (len <= sizeof f->result_buf) {
    f->result = len ? f->result_buf : NULL;
  } else if ((f->result = malloc(len)) == NULL) {
    status = WP_ERROR;
    result = (const char *)&oom;
    len = sizeof oom;
    f->result = f->result_buf;
  }
  if (len) memcpy(f->result, result, len);
  f->result_len = (uint32_t)len;
  f->t_end = uv_hrtime();
  atomic_store_explicit(&f->status, status, memory_order_seq_cst);
  if (atomic_load_explicit(&f->nwaiters, memory_order_seq_cst)) {
    uv_mutex_lock(&p->done_mu);
    uv_cond_broadcast(&p->done_cv);
    uv_mutex_unlock(&p->done_mu);
  }
  run_callbacks(
      f, atomic_exchange_explicit(&f->done, DONE_CLOSED, memory_order_acq_rel));
  return 1;
}

int wp__future_fail(wp_future *f, wp_status status, const char *msg) {
  char storage[256];
  wp__buf b = WP__BUF_ON(storage);
  wp_value v;
  int r;
  v.type = WP_TSTRING;
  v.u.s.ptr = msg;
  v.u.s.len = strlen(msg);
  if (wp__put_varint(&b, 1) || wp__put_cvalue(&b, &v)) b.len = 0;
  r = wp__future_complete(f, status, b.data, b.len);
  wp__buf_free(&b);
  return r;
}

static int future_ended(void *f) {
  return wp_future_status(f) != WP_PENDING;
}

/* The status as a sleeping waiter must read it (see wp__future_complete). */
static int ended_seq_cst(wp_future *f) {
  int st = atomic_load_explicit(&f->status, memory_order_seq_cst);
  return st != WP_PENDING && st < WP__CLAIMED;
}

int wp_future_wait(wp_future *f, double timeout) {
  wp_pool *p = f->pool;
  uint64_t deadline = 0;
  int r = 0;
  if (wp_future_status(f) != WP_PENDING) return 0;
  if (timeout != 0 && wp__spin(future_ended, f)) return 0;
  if (timeout >= 0) {
    if (timeout > 1e9) timeout = 1e9; /* about 31 years */
    deadline = uv_hrtime() + (uint64_t)(timeout * 1e9);
  }
  atomic_fetch_add_explicit(&f->nwaiters, 1, memory_order_seq_cst);
  uv_mutex_lock(&p->done_mu);
  while (!ended_seq_cst(f)) {
    if (timeout < 0) {
      uv_cond_wait(&p->done_cv, &p->done_mu);
    } else {
      uint64_t now = uv_hrtime();
      if (now >= deadline) {
        r = WP_ETIMEDOUT;
        break;
      }
      uv_cond_timedwait(&p->done_cv, &p->done_mu, deadline - now);
    }
  }
  uv_mutex_unlock(&p->done_mu);
  atomic_fetch_sub_explicit(&f->nwaiters, 1, memory_order_relaxed);
  return r;
}

int wp_future_cancel(wp_future *f) {
  if (wp_future_status(f) != WP_PENDING) return 0;
  switch (wp__pool_cancel(f->pool, f)) {
  case 1: /* it never started */
    if (wp__future_fail(f, WP_CANCELLED, "cancelled"))
      wp__pool_count_end(f->pool, NULL, WP_CANCELLED, -1);
    wp_future_release(f); /* the queue's reference */
    return 1;
  case 2: /* marked: whoever ends it ends it as cancelled */
    return 1;
  default:
    return 0;
  }
}

int wp_future_on_done(wp_future *f, wp_done_fn cb, void *ud) {
  wp__done *d = malloc(sizeof *d), *head;
  if (d == NULL) return WP_ENOMEM;
  d->cb = cb;
  d->ud = ud;
  /* Once the status is visible, a new callback runs at once, as it would
   * when the completer already took the list. */
  head = wp_future_status(f) != WP_PENDING
             ? DONE_CLOSED
             : atomic_load_explicit(&f->done, memory_order_acquire);
  do {
    if (head == DONE_CLOSED) {
      free(d);
      cb(f, ud);
      return 0;
    }
    d->next = head;
  } while (!atomic_compare_exchange_weak_explicit(
      &f->done, &head, d, memory_order_acq_rel, memory_order_acquire));
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

int wp__future_scalar(wp_future *f, wp_value *v) {
  const unsigned char *p = (const unsigned char *)f->result;
  uint32_t len = f->result_len;
  if (wp_future_status(f) != WP_OK) return -1;
  if (p == NULL || (len == 1 && p[0] == 0)) return 0;
  if (len < 2 || p[0] != 1) return -1;
  switch (p[1]) {
  case WP__T_NIL:
  case WP__T_FALSE:
  case WP__T_TRUE:
    v->type = p[1] == WP__T_NIL ? WP_TNIL : WP_TBOOLEAN;
    v->u.b = p[1] == WP__T_TRUE;
    return len == 2 ? 1 : -1;
  case WP__T_INT:
  case WP__T_FLT:
    if (len != 10) return -1;
    if (p[1] == WP__T_INT) {
      v->type = WP_TINTEGER;
      memcpy(&v->u.i, p + 2, 8);
    } else {
      v->type = WP_TNUMBER;
      memcpy(&v->u.n, p + 2, 8);
    }
    return 1;
  default:
    return -1;
  }
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
