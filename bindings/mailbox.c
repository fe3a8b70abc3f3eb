/*
 * mailbox.c: wpl_mailbox (mailbox.h), the cross-thread mailbox of the host
 * loop (host_loop.c) and of a plain state's policy hooks (policy.c).  A
 * post that finds no memory drops the message: the poster keeps what it
 * posted, and a future watched through wpl_mailbox_watch is released.
 */
#include <stdatomic.h>
#include <stdlib.h>

#include "mailbox.h"

struct wpl_mailbox {
  atomic_int refs;  /* the owner's and each pending callback's */
  uv_mutex_t mu;    /* guards everything below */
  uv_async_t *wake; /* sent at each post, or NULL */
  int closed;       /* posts are refused */
  wpl_msg *v;       /* messages posted, not yet taken */
  size_t n, cap;
};

wpl_mailbox *wpl_mailbox_new(uv_async_t *wake) {
  wpl_mailbox *mb = calloc(1, sizeof *mb);
  if (mb == NULL) return NULL;
  if (uv_mutex_init(&mb->mu) != 0) {
    free(mb);
    return NULL;
  }
  atomic_init(&mb->refs, 1);
  mb->wake = wake;
  return mb;
}

void wpl_mailbox_retain(wpl_mailbox *mb) {
  atomic_fetch_add(&mb->refs, 1);
}

void wpl_mailbox_release(wpl_mailbox *mb) {
  size_t i;
  if (atomic_fetch_sub(&mb->refs, 1) != 1) return;
  for (i = 0; i < mb->n; i++)
    if (mb->v[i].kind == WPL_MSG_FUTURE) wp_future_release(mb->v[i].ptr);
  uv_mutex_destroy(&mb->mu);
  free(mb->v);
  free(mb);
}

int wpl_mailbox_post(wpl_mailbox *mb, int kind, void *ptr) {
  int ok = 0;
  uv_mutex_lock(&mb->mu);
  if (!mb->closed) {
    if (mb->n == mb->cap) {
      size_t cap = mb->cap ? mb->cap * 2 : 64;
      wpl_msg *v = realloc(mb->v, cap * sizeof *v);
      if (v) {
        mb->v = v;
        mb->cap = cap;
      }
    }
    if (mb->n < mb->cap) {
      mb->v[mb->n].kind = kind;
      mb->v[mb->n].ptr = ptr;
      mb->n++;
      ok = 1;
      if (mb->wake) uv_async_send(mb->wake);
    }
  }
  uv_mutex_unlock(&mb->mu);
  return ok;
}

/* The core's completion callback, in whichever thread ended f. */
static void future_cb(wp_future *f, void *ud) {
  wpl_mailbox *mb = ud;
  if (!wpl_mailbox_post(mb, WPL_MSG_FUTURE, f)) wp_future_release(f);
  wpl_mailbox_release(mb);
}

int wpl_mailbox_watch(wpl_mailbox *mb, wp_future *f) {
  wp_future_retain(f);
  wpl_mailbox_retain(mb);
  if (wp_future_on_done(f, future_cb, mb) != 0) {
    wp_future_release(f);
    wpl_mailbox_release(mb);
    return WP_ENOMEM;
  }
  return 0;
}

wpl_msg *wpl_mailbox_take(wpl_mailbox *mb, size_t *n) {
  wpl_msg *v;
  uv_mutex_lock(&mb->mu);
  v = mb->v;
  *n = mb->n;
  mb->v = NULL;
  mb->n = mb->cap = 0;
  uv_mutex_unlock(&mb->mu);
  return v;
}

void wpl_mailbox_close(wpl_mailbox *mb) {
  uv_mutex_lock(&mb->mu);
  mb->closed = 1;
  mb->wake = NULL;
  uv_mutex_unlock(&mb->mu);
}
