/*
 * fnstore.c: the process's store of function records, so that a task
 * message names its function by a small index instead of carrying its
 * bytecode.
 *
 * A record is what a message holds after WP__T_FUNC up to the upvalue
 * count: the 8-byte id (the bytecode's hash), the 4-byte length and the
 * bytecode.  A state that submits the same Lua function
 * again (lsubmit.c's function cache) interns its record once; every later
 * message holds WP__T_FUNCID and the record's index, a few bytes where the
 * bytecode took a hundred or more, which keeps a queued future small.
 *
 * Records live until the process exits, and the store is bounded (records
 * and bytes): once full, interning fails and messages carry the bytecode
 * as before.  Interning takes the store's lock; reading a record by index
 * takes none (a published slot never changes).  Any thread.
 */
#include <stdlib.h>
#include <string.h>

#include "wp_internal.h"

#define MAX_RECORDS 4096
#define MAX_BYTES ((size_t)16 << 20)
#define NBUCKETS 8192 /* open addressing on the id: at most half full */

typedef struct fnrec {
  uint32_t len; /* of data */
  char data[];
} fnrec;

static _Atomic(fnrec *) records[MAX_RECORDS];
static uint16_t buckets[NBUCKETS]; /* index + 1; 0: empty.  Under mu */
static uint32_t nrecords;          /* under mu */
static size_t nbytes;              /* under mu */
static size_t max_bytes = MAX_BYTES;
static uv_mutex_t mu;
static uv_once_t once = UV_ONCE_INIT;

static void init_once(void) {
  if (uv_mutex_init(&mu) != 0) abort();
}

void wp__fnstore_atfork(int phase) {
  wp__atfork_lock(phase, &once, init_once, &mu);
}

int wp__fnstore_intern(const char *rec, size_t len, uint32_t *index) {
  uint64_t id;
  size_t h;
  fnrec *r;
  int ret = WP_ENOMEM;
  if (len < 12 || len > UINT32_MAX) return WP_EINVAL;
  memcpy(&id, rec, 8);
  uv_once(&once, init_once);
  uv_mutex_lock(&mu);
  for (h = (size_t)id % NBUCKETS; buckets[h]; h = (h + 1) % NBUCKETS) {
    uint32_t i = buckets[h] - 1u;
    r = atomic_load_explicit(&records[i], memory_order_relaxed);
    if (r->len == len && memcmp(r->data, rec, len) == 0) {
      *index = i;
      ret = 0;
      goto out;
    }
  }
  if (nrecords == MAX_RECORDS || nbytes > max_bytes || len > max_bytes - nbytes)
    goto out;
  if ((r = malloc(sizeof *r + len)) == NULL) goto out;
  r->len = (uint32_t)len;
  memcpy(r->data, rec, len);
  atomic_store_explicit(&records[nrecords], r, memory_order_release);
  buckets[h] = (uint16_t)(nrecords + 1);
  *index = nrecords++;
  nbytes += len;
  ret = 0;
out:
  uv_mutex_unlock(&mu);
  return ret;
}

const char *wp__fnstore_get(uint64_t index, size_t *len) {
  fnrec *r;
  if (index >= MAX_RECORDS) return NULL;
  r = atomic_load_explicit(&records[index], memory_order_acquire);
  if (r == NULL) return NULL;
  *len = r->len;
  return r->data;
}

size_t wp__fnstore_set_max_bytes(size_t n) {
  size_t old;
  uv_once(&once, init_once);
  uv_mutex_lock(&mu);
  old = max_bytes;
  max_bytes = n;
  uv_mutex_unlock(&mu);
  return old;
}
