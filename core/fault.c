/*
 * fault.c: the counters behind fault.h.  Compiled into the core only in
 * the fault-injection build; this file itself is not force-included, so
 * it calls the real allocator.
 *
 * A reallocation that shrinks a block is never refused: Lua requires an
 * allocator that does not fail when the new size is not larger, and so
 * does every caller in the core.
 */
#include <malloc.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "fault.h"

/* fault.h renamed the allocator for the files that include it; this one
 * needs the real functions. */
#undef malloc
#undef calloc
#undef realloc
#undef strdup
#undef posix_memalign

static atomic_long target; /* the allocation to refuse; 0: disarmed */
static atomic_int persist; /* refuse every one after it too */
static atomic_long seen, failed;

void wp_fault_arm(long n, int p) {
  atomic_store(&target, 0);
  if (n <= 0) return;
  atomic_store(&seen, 0);
  atomic_store(&failed, 0);
  atomic_store(&persist, p);
  atomic_store(&target, n);
}

long wp_fault_seen(void) {
  return atomic_load(&seen);
}

long wp_fault_failed(void) {
  return atomic_load(&failed);
}

/* Counts one allocation; 1 when it must fail. */
static int refuse(void) {
  long t = atomic_load(&target), n;
  if (t == 0) return 0;
  n = atomic_fetch_add(&seen, 1) + 1;
  if (n == t || (n > t && atomic_load(&persist))) {
    atomic_fetch_add(&failed, 1);
    return 1;
  }
  return 0;
}

void *wp_fault_malloc(size_t n) {
  return refuse() ? NULL : malloc(n);
}

void *wp_fault_calloc(size_t n, size_t size) {
  return refuse() ? NULL : calloc(n, size);
}

void *wp_fault_realloc(void *p, size_t n) {
  if (p != NULL && n <= malloc_usable_size(p)) return realloc(p, n);
  return refuse() ? NULL : realloc(p, n);
}

char *wp_fault_strdup(const char *s) {
  return refuse() ? NULL : strdup(s);
}

int wp_fault_posix_memalign(void **out, size_t align, size_t n) {
  return refuse() ? 12 /* ENOMEM */ : posix_memalign(out, align, n);
}
