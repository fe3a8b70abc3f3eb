/*
 * fork.c: what fork() leaves the child.
 *
 * Only the forking thread goes on in the child, so a pool made before the
 * fork has no workers there: such a pool is dead in the child.  Its calls
 * fail with WP_EFORKED or do nothing, its pending futures end failed the
 * first time the child looks at them, and releasing it frees nothing
 * (its locks may be held by threads that do not exist).  Everything else
 * works in the child: new pools, shared dictionaries, the function store.
 *
 * For that the process-wide locks must be free at the fork, so the
 * prepare handler takes them all and the parent and child handlers give
 * them back.  Each is a leaf (its holder takes no other lock meanwhile)
 * except the slab's class locks, taken before its spare list's; the
 * bindings register their own handlers after these (wp__fork_watch), so
 * theirs, which may be held while a pool's lock is taken, are taken
 * first.  No handler takes a pool's lock.
 */
#include <pthread.h>
#include <stdlib.h>

#include "wp_internal.h"

static atomic_uint generation; /* bumped in each child */
static uv_once_t watch_once = UV_ONCE_INIT;

unsigned wp__fork_generation(void) {
  return atomic_load_explicit(&generation, memory_order_relaxed);
}

static void prepare(void) {
  wp__pools_atfork(WP__FORK_PREPARE);
  wp__shdict_atfork(WP__FORK_PREPARE);
  wp__fnstore_atfork(WP__FORK_PREPARE);
  wp__cfunction_atfork(WP__FORK_PREPARE);
  wp__slab_atfork(WP__FORK_PREPARE);
}

static void after(int phase) {
  wp__slab_atfork(phase);
  wp__cfunction_atfork(phase);
  wp__fnstore_atfork(phase);
  wp__shdict_atfork(phase);
  wp__pools_atfork(phase);
}

static void parent(void) {
  after(WP__FORK_PARENT);
}

static void child(void) {
  atomic_fetch_add_explicit(&generation, 1, memory_order_relaxed);
  after(WP__FORK_CHILD);
}

static void watch(void) {
  /* Fails only without memory for the handlers: then a fork is what it
   * was before this file (a child must not use the pools). */
  (void)pthread_atfork(prepare, parent, child);
}

void wp__atfork_lock(int phase, uv_once_t *once, void (*init)(void),
                     uv_mutex_t *mu) {
  uv_once(once, init);
  if (phase == WP__FORK_PREPARE)
    uv_mutex_lock(mu);
  else
    uv_mutex_unlock(mu);
}

void wp__fork_watch(void) {
  uv_once(&watch_once, watch);
}
