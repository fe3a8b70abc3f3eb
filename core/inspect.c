/*
 * inspect.c: a live view of a pool's workers and queue (wp_pool_inspect),
 * for pool:inspect() and GET /debug/pools: the seed's goroutine dump.
 */
#include <stdio.h>
#include <string.h>

#include "wp_internal.h"

static void copy_text(char *dst, const char *src, int *has) {
  *has = src != NULL;
  snprintf(dst, WP_INSPECT_TEXT, "%s", src ? src : "");
}

int wp_pool_inspect(wp_pool *p, wp_worker_info *out, int max, size_t *queued,
                    double *oldest_s) {
  wp__worker *w;
  uint64_t now = uv_hrtime();
  int n = 0;
  if (wp__pool_forked(p)) { /* the parent's pool: no worker here */
    *queued = 0;
    *oldest_s = 0;
    return 0;
  }
  wp__pool_lock(p);
  *queued = p->nqueued;
  *oldest_s = p->qhead && now > p->qhead->t_submit
                  ? (double)(now - p->qhead->t_submit) / 1e9
                  : 0;
  for (w = p->workers; w; w = w->next) {
    wp_worker_info *i;
    if (w->closed || (!w->counted && !w->stuck)) continue;
    if (n++ >= max) continue;
    i = &out[n - 1];
    memset(i, 0, sizeof *i);
    i->id = w->id;
    i->tasks_done = w->tasks_done;
    i->memory = atomic_load_explicit(&w->mem_pub, memory_order_relaxed);
    if (w->cur) {
      i->state = w->stuck ? 2 : 1;
      i->overdue = w->deadline && now > w->deadline;
      i->running_s = now > w->started ? (double)(now - w->started) / 1e9 : 0;
      copy_text(i->task, w->cur->name, &i->has_task);
      copy_text(i->tenant, w->cur->tenant, &i->has_tenant);
    }
  }
  wp__pool_unlock(p);
  return n;
}
