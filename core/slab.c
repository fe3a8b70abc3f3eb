/*
 * slab.c: the memory futures live in.
 *
 * A script that keeps 200,000 futures touches 50 MB of fresh heap, and on
 * a VM every first touch of a 4 KiB page is a fault that costs
 * microseconds (docs/performance.md).  Futures therefore come from size
 * classes of 64-byte slots carved from chunks of their own: a class's
 * first chunk is 64 KiB, each new one twice the last up to 2 MiB, and a
 * 2 MiB chunk is aligned and advised as a transparent huge page, so that
 * a burst of futures faults once per 2 MiB.  A freed slot goes back on
 * its chunk's free list and is reused first.  A chunk whose slots are all
 * free stays for the next burst while the empty chunks kept add up to no
 * more than the most the process ever had in use, and 128 MiB at most (or
 * while it is its class's only chunk with room); past that it goes back
 * to the system, so a one-off burst does not stay resident in full.
 *
 * Empty chunks are shared: a class that needs a chunk takes a spare one
 * of any class before it maps one.
 *
 * Each slot starts with a header naming its chunk (NULL: the block came
 * from malloc, for sizes past the largest class).  One mutex per class,
 * taken once per 32 slots: each thread keeps a small cache of free slots
 * (below).  Any thread may allocate and free.  Under AddressSanitizer and in
 * the allocation-failure build every block comes from malloc, so that those
 * tools see each future on its own.
 */
#include <assert.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "wp_internal.h"

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define WP__SLAB_MALLOC 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(WPOOL_FAULT_H)
#define WP__SLAB_MALLOC 1
#endif

#ifdef WP__SLAB_MALLOC

void *wp__slab_alloc(size_t n) {
  return malloc(n);
}

void wp__slab_free(void *ptr) {
  free(ptr);
}

long wp__slab_mapped(void) {
  return -1;
}

long wp__slab_live(void) {
  return -1;
}

long wp__slab_set_retain_max(long bytes) {
  (void)bytes;
  return -1;
}

void wp__slab_atfork(int phase) {
  (void)phase; /* malloc's own locks are the C library's */
}

#else

#include <pthread.h>
#include <sys/mman.h>

#define HDR 16 /* keeps the block 16-byte aligned */
#define SLOT_UNIT 64
#define NCLASSES (WP__SLAB_MAX / SLOT_UNIT)
#define FIRST_CHUNK ((size_t)64 << 10)
#define HUGE_CHUNK ((size_t)2 << 20)

typedef struct chunk chunk;
typedef struct sclass sclass;

/* The start of every slot. */
typedef struct slot {
  chunk *owner;      /* NULL for a malloc'd block */
  struct slot *next; /* on its chunk's free list, while free */
} slot;

/* The head of a mapping of size bytes; its slots follow. */
struct chunk {
  chunk *next, *prev; /* in the class's list of chunks with room */
  sclass *cls;
  size_t size;
  char *bump, *end; /* slots never handed out: [bump, end) */
  slot *free;       /* slots handed out and freed */
  size_t live;      /* slots in use */
  int listed;       /* on cls->room */
};

struct sclass {
  uv_mutex_t mu;
  chunk *room;       /* chunks with a free or never-used slot */
  size_t slot_size;  /* header included */
  size_t next_chunk; /* the size of the next mapping */
};

/* Slots start after the head, on a slot boundary. */
#define HEAD_SIZE ((sizeof(chunk) + SLOT_UNIT - 1) / SLOT_UNIT * SLOT_UNIT)

static sclass classes[NCLASSES];
static uv_once_t classes_once = UV_ONCE_INIT;
static pthread_key_t cache_key;
static int cache_key_ok = 1;
static void cache_exit(void *arg);
static atomic_long mapped; /* bytes in chunks, for tests */
static atomic_long live;   /* slots out of their chunks, for tests */
static atomic_long peak;   /* the most bytes of chunks ever in use */
static atomic_long retain_max = 128L << 20; /* spare bytes kept at most */

/* Empty chunks kept for any class, linked by next; a leaf lock, taken
 * under a class lock. */
static struct {
  uv_mutex_t mu;
  chunk *list;
  long bytes;
} spare;

static void classes_init(void) {
  /* Without a key no thread caches (cache_ready fails). */
  if (pthread_key_create(&cache_key, cache_exit) != 0) cache_key_ok = 0;
  uv_mutex_init(&spare.mu);
  for (int i = 0; i < NCLASSES; i++) {
    /* A mutex that cannot be made is a broken system: libuv aborts. */
    uv_mutex_init(&classes[i].mu);
    classes[i].slot_size = (size_t)(i + 1) * SLOT_UNIT;
    classes[i].next_chunk = FIRST_CHUNK;
  }
}

void wp__slab_atfork(int phase) {
  int i;
  uv_once(&classes_once, classes_init);
  if (phase == WP__FORK_PREPARE) { /* a class lock, then the spare list's */
    for (i = 0; i < NCLASSES; i++)
      uv_mutex_lock(&classes[i].mu);
    uv_mutex_lock(&spare.mu);
    return;
  }
  /* The other threads' caches stay theirs: in a child, never freed. */
  uv_mutex_unlock(&spare.mu);
  for (i = NCLASSES - 1; i >= 0; i--)
    uv_mutex_unlock(&classes[i].mu);
}

static void room_add(sclass *c, chunk *k) {
  k->prev = NULL;
  k->next = c->room;
  if (c->room) c->room->prev = k;
  c->room = k;
  k->listed = 1;
}

static void room_remove(sclass *c, chunk *k) {
  if (k->prev)
    k->prev->next = k->next;
  else
    c->room = k->next;
  if (k->next) k->next->prev = k->prev;
  k->next = k->prev = NULL;
  k->listed = 0;
}

/* Maps a chunk of size bytes, 2 MiB-aligned and advised as a huge page
 * when it is that large.  NULL when the system refuses. */
static chunk *chunk_map(size_t size) {
  size_t len = size >= HUGE_CHUNK ? size + HUGE_CHUNK : size;
  char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                 -1, 0);
  char *base;
  if (m == MAP_FAILED) return NULL;
  base = m;
  if (len != size) { /* trim to an aligned chunk */
    base = (char *)(((uintptr_t)m + HUGE_CHUNK - 1) &
                    ~(uintptr_t)(HUGE_CHUNK - 1));
    if (base > m) munmap(m, (size_t)(base - m));
    if (base + size < m + len)
      munmap(base + size, (size_t)(m + len - (base + size)));
#ifdef MADV_HUGEPAGE
    (void)madvise(base, size, MADV_HUGEPAGE); /* advice: may be ignored */
#endif
  }
  atomic_fetch_add_explicit(&mapped, (long)size, memory_order_relaxed);
  return (chunk *)base;
}

/* Records that bytes of chunks are in use now: the most ever is what
 * the spare list may keep. */
static void note_in_use(long bytes) {
  long p = atomic_load_explicit(&peak, memory_order_relaxed);
  while (bytes > p &&
         !atomic_compare_exchange_weak_explicit(
             &peak, &p, bytes, memory_order_relaxed, memory_order_relaxed)) {
  }
}

/* Needs c->mu.  A spare chunk if there is one, else a new mapping; NULL
 * when the system refuses memory. */
static chunk *chunk_new_locked(sclass *c) {
  chunk *k;
  size_t size = c->next_chunk;
  uv_mutex_lock(&spare.mu);
  if ((k = spare.list) != NULL) {
    spare.list = k->next;
    spare.bytes -= (long)k->size;
    size = k->size;
  }
  note_in_use(atomic_load_explicit(&mapped, memory_order_relaxed) -
              spare.bytes + (k ? 0 : (long)size));
  uv_mutex_unlock(&spare.mu);
  if (k == NULL) {
    if ((k = chunk_map(size)) == NULL) return NULL;
    if (c->next_chunk < HUGE_CHUNK) c->next_chunk *= 2;
  }
  k->cls = c;
  k->size = size;
  k->bump = (char *)k + HEAD_SIZE;
  k->end = (char *)k + size;
  k->free = NULL;
  k->live = 0;
  room_add(c, k);
  return k;
}

/* Needs c->mu.  Hands out one slot, or NULL when the system refuses
 * memory. */
static slot *take_locked(sclass *c) {
  chunk *k = c->room;
  slot *s;
  if (k == NULL && (k = chunk_new_locked(c)) == NULL) return NULL;
  if (k->free) {
    s = k->free;
    k->free = s->next;
  } else {
    s = (slot *)k->bump;
    k->bump += c->slot_size;
  }
  k->live++;
  atomic_fetch_add_explicit(&live, 1, memory_order_relaxed);
  if (k->free == NULL && (size_t)(k->end - k->bump) < c->slot_size)
    room_remove(c, k); /* full */
  s->owner = k;
  return s;
}

/* Needs c->mu.  Takes s back.  A chunk left empty while another has room
 * leaves the class: to the spare list while it holds less than the most
 * ever in use (and retain_max), else on *unmap, to be unmapped after the
 * lock. */
static void put_locked(sclass *c, slot *s, chunk **unmap) {
  chunk *k = s->owner;
  assert(k->cls == c && k->live > 0);
  s->next = k->free;
  k->free = s;
  k->live--;
  atomic_fetch_sub_explicit(&live, 1, memory_order_relaxed);
  if (k->live == 0) { /* hand its slots out in address order again */
    k->free = NULL;
    k->bump = (char *)k + HEAD_SIZE;
  }
  if (!k->listed) room_add(c, k);
  if (k->live == 0 && (k->prev || k->next)) { /* another has room */
    long budget = atomic_load_explicit(&peak, memory_order_relaxed);
    long cap = atomic_load_explicit(&retain_max, memory_order_relaxed);
    room_remove(c, k);
    k->cls = NULL;
    if (budget > cap) budget = cap;
    uv_mutex_lock(&spare.mu);
    if (spare.bytes + (long)k->size <= budget) {
      k->next = spare.list;
      spare.list = k;
      spare.bytes += (long)k->size;
      k = NULL;
    }
    uv_mutex_unlock(&spare.mu);
    if (k) {
      k->next = *unmap;
      *unmap = k;
    }
  }
}

static void unmap_all(chunk *k) {
  while (k) {
    chunk *next = k->next;
    atomic_fetch_sub_explicit(&mapped, (long)k->size, memory_order_relaxed);
    munmap(k, k->size);
    k = next;
  }
}

/* ---- per-thread caches ----------------------------------------------- */

/* Each thread keeps up to CACHE_MAX free slots per class and moves them
 * to and from the chunks CACHE_MOVE at a time, under one lock: a thread
 * that submits and collects futures takes no lock for most of them.  The
 * slots stay counted as live in their chunks; a thread's cache goes back
 * when it exits (the key's destructor). */
#define CACHE_MAX 64
#define CACHE_MOVE 32

typedef struct tcache {
  slot *head[NCLASSES];
  int n[NCLASSES];
  int registered; /* the key's destructor will flush this cache */
} tcache;

static _Thread_local tcache tc;

/* Returns all but the keep newest slots of class i of this thread's
 * cache: the oldest go, so that a burst's first chunks can empty. */
static void cache_flush(int i, int keep) {
  sclass *c = &classes[i];
  chunk *unmap = NULL;
  slot **link = &tc.head[i], *s;
  for (int k = 0; k < keep && *link; k++)
    link = &(*link)->next;
  s = *link;
  *link = NULL;
  tc.n[i] = keep < tc.n[i] ? keep : tc.n[i];
  uv_mutex_lock(&c->mu);
  while (s) {
    slot *next = s->next;
    put_locked(c, s, &unmap);
    s = next;
  }
  uv_mutex_unlock(&c->mu);
  unmap_all(unmap);
}

static void cache_exit(void *arg) {
  (void)arg;
  for (int i = 0; i < NCLASSES; i++)
    cache_flush(i, 0);
  tc.registered = 0; /* a later free registers again */
}

/* Whether this thread may cache: its cache will be flushed at exit. */
static int cache_ready(void) {
  if (!tc.registered && cache_key_ok &&
      pthread_setspecific(cache_key, &tc) == 0)
    tc.registered = 1;
  return tc.registered;
}

void *wp__slab_alloc(size_t n) {
  sclass *c;
  tcache *t;
  slot *s;
  int i;
  if (n > WP__SLAB_MAX - HDR) {
    if ((s = malloc(HDR + n)) == NULL) return NULL;
    s->owner = NULL;
    return (char *)s + HDR;
  }
  i = (int)((n + HDR - 1) / SLOT_UNIT);
  t = &tc; /* one TLS lookup: in a shared library each costs a call */
  if (t->head[i] == NULL) {
    int want;
    uv_once(&classes_once, classes_init);
    c = &classes[i];
    want = cache_ready() ? CACHE_MOVE : 1;
    uv_mutex_lock(&c->mu);
    while (t->n[i] < want && (s = take_locked(c)) != NULL) {
      s->next = t->head[i];
      t->head[i] = s;
      t->n[i]++;
    }
    uv_mutex_unlock(&c->mu);
    if (t->head[i] == NULL) return NULL;
  }
  s = t->head[i];
  t->head[i] = s->next;
  t->n[i]--;
  return (char *)s + HDR;
}

void wp__slab_free(void *ptr) {
  tcache *t;
  slot *s;
  int i;
  if (ptr == NULL) return;
  s = (slot *)((char *)ptr - HDR);
  if (s->owner == NULL) {
    free(s);
    return;
  }
  i = (int)(s->owner->cls - classes);
  t = &tc;
  s->next = t->head[i];
  t->head[i] = s;
  if (++t->n[i] > CACHE_MAX || !t->registered) {
    if (!cache_ready())
      cache_flush(i, 0);
    else if (t->n[i] > CACHE_MAX)
      cache_flush(i, CACHE_MAX - CACHE_MOVE);
  }
}

long wp__slab_mapped(void) {
  return atomic_load_explicit(&mapped, memory_order_relaxed);
}

long wp__slab_live(void) {
  return atomic_load_explicit(&live, memory_order_relaxed);
}

long wp__slab_set_retain_max(long bytes) {
  return atomic_exchange_explicit(&retain_max, bytes, memory_order_relaxed);
}

#endif
