/*
 * test_slab.c: Criterion tests of the memory futures live in
 * (core/slab.c): blocks of every size are aligned and apart, a burst is
 * given back to the system once freed, and threads that allocate and
 * free each other's blocks neither lose nor share one (run under TSan
 * too), and each thread's cache of free slots goes back when it exits.
 * In the ASan and allocation-failure builds the slab is plain malloc, and
 * the checks of what it maps are skipped.
 */
#include <criterion/criterion.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <uv.h>

#include "wp_internal.h"

static void stamp(unsigned char *b, size_t n, unsigned tag) {
  for (size_t i = 0; i < n; i++)
    b[i] = (unsigned char)(tag + i);
}

static int stamped(const unsigned char *b, size_t n, unsigned tag) {
  for (size_t i = 0; i < n; i++)
    if (b[i] != (unsigned char)(tag + i)) return 0;
  return 1;
}

Test(slab, blocks_of_every_size_are_aligned_and_apart) {
  enum { N = 1400 };
  static unsigned char *blocks[N];
  for (size_t n = 0; n < N; n++) {
    blocks[n] = wp__slab_alloc(n);
    cr_assert_not_null(blocks[n]);
    cr_assert_eq((uintptr_t)blocks[n] % 16, 0, "size %zu", n);
    stamp(blocks[n], n, (unsigned)n);
  }
  for (size_t n = 0; n < N; n++) {
    cr_assert(stamped(blocks[n], n, (unsigned)n), "size %zu overwritten", n);
    wp__slab_free(blocks[n]);
  }
  wp__slab_free(NULL);
}

Test(slab, freed_blocks_are_reused) {
  void *a = wp__slab_alloc(200), *b;
  cr_assert_not_null(a);
  wp__slab_free(a);
  b = wp__slab_alloc(190); /* the same class */
  if (wp__slab_mapped() >= 0) cr_assert_eq(a, b);
  wp__slab_free(b);
}

static void **burst(int n, size_t size) {
  void **blocks = malloc((size_t)n * sizeof *blocks);
  cr_assert_not_null(blocks);
  for (int i = 0; i < n; i++) {
    cr_assert_not_null(blocks[i] = wp__slab_alloc(size));
    memset(blocks[i], i, size);
  }
  return blocks;
}

static void unburst(void **blocks, int n) {
  for (int i = 0; i < n; i++)
    wp__slab_free(blocks[i]);
  free(blocks);
}

Test(slab, a_burst_goes_back_to_the_system) {
  enum { N = 100000, SIZE = 240 };
  long before = wp__slab_mapped(), cap, during, kept;
  void **blocks;
  if (before < 0) return; /* malloc underneath */
  cap = wp__slab_set_retain_max(8L << 20);
  blocks = burst(N, SIZE);
  during = wp__slab_mapped();
  cr_assert_geq(during - before, (long)N * SIZE, "%ld mapped", during);
  unburst(blocks, N);
  /* 8 MiB of empty chunks stay, and the class keeps one chunk with
   * room: the rest went back. */
  kept = wp__slab_mapped();
  cr_assert_leq(kept - before, (8L << 20) + (2L << 20), "%ld left",
                kept - before);
  wp__slab_set_retain_max(cap);
}

Test(slab, empty_chunks_serve_any_class) {
  enum { N = 60000 };
  long kept;
  void **blocks;
  if (wp__slab_mapped() < 0) return; /* malloc underneath */
  unburst(burst(N, 240), N);         /* 15 MB of 256-byte slots */
  kept = wp__slab_mapped();
  /* Bursts of other classes, no larger, map nothing new. */
  blocks = burst(N, 180);
  cr_assert_eq(wp__slab_mapped(), kept);
  unburst(blocks, N);
  blocks = burst(N / 2, 400);
  cr_assert_eq(wp__slab_mapped(), kept);
  unburst(blocks, N / 2);
}

/* In a child whose address space is capped, allocation fails cleanly
 * (NULL, no crash) once the system refuses a chunk, and works again after
 * frees.  Not under TSan, whose shadow memory needs the address space. */
static long vm_size(void) {
  long pages = 0;
  FILE *f = fopen("/proc/self/statm", "r");
  if (f) {
    if (fscanf(f, "%ld", &pages) != 1) pages = 0;
    fclose(f);
  }
  return pages * sysconf(_SC_PAGESIZE);
}

static int refused_then_recovers(void) {
  enum { MAX = 1 << 20 };
  static void *blocks[MAX];
  struct rlimit rl;
  long n = 0;
  long vm = vm_size();
  if (vm <= 0) return 10;
  rl.rlim_cur = rl.rlim_max = (rlim_t)(vm + (16L << 20));
  if (setrlimit(RLIMIT_AS, &rl) != 0) return 11;
  while (n < MAX && (blocks[n] = wp__slab_alloc(240)) != NULL)
    memset(blocks[n++], 7, 240);
  if (n == MAX || n == 0) return 12; /* never refused, or nothing at all */
  for (long i = 0; i < n; i++)
    wp__slab_free(blocks[i]);
  for (long i = 0; i < n / 2; i++)
    if ((blocks[i] = wp__slab_alloc(240)) == NULL) return 13;
  for (long i = 0; i < n / 2; i++)
    wp__slab_free(blocks[i]);
  return 0;
}

Test(slab, refused_memory_is_null_not_a_crash) {
  pid_t pid;
  int status;
#if defined(__SANITIZE_THREAD__)
  return;
#endif
  if (wp__slab_mapped() < 0) return; /* malloc underneath */
  fflush(NULL);
  pid = fork();
  cr_assert_geq(pid, 0);
  if (pid == 0) _exit(refused_then_recovers());
  cr_assert_eq(waitpid(pid, &status, 0), pid);
  cr_assert(WIFEXITED(status), "child died: status %d", status);
  cr_assert_eq(WEXITSTATUS(status), 0, "child exit %d", WEXITSTATUS(status));
}

static void churn(void *arg) {
  void *b[100];
  (void)arg;
  for (int round = 0; round < 50; round++) {
    for (int i = 0; i < 100; i++)
      b[i] = wp__slab_alloc((size_t)(i * 7 % 600));
    for (int i = 0; i < 100; i++)
      wp__slab_free(b[i]);
  }
}

/* A thread keeps free slots of its own, and gives them back when it
 * exits. */
Test(slab, an_exiting_thread_returns_its_cache) {
  uv_thread_t t;
  long before = wp__slab_live();
  cr_assert_eq(uv_thread_create(&t, churn, NULL), 0);
  uv_thread_join(&t);
  cr_assert_eq(wp__slab_live(), before);
}

/* Threads allocate blocks, hand every other one to the next thread
 * through a mailbox while it has room, and free what they are handed
 * after checking it; what is left is freed after the join. */
enum { THREADS = 4, ROUNDS = 40000, BOX = 64 };

typedef struct box {
  uv_mutex_t mu;
  unsigned char *slot[BOX];
  size_t len[BOX];
  int n;
} box;

static box boxes[THREADS];
static int bad_of[THREADS]; /* each thread writes its own */

static size_t size_of(unsigned seed) {
  return (seed * 2654435761u >> 7) % 900;
}

static int drain(box *b) {
  unsigned char *got[BOX];
  size_t len[BOX];
  int n, bad = 0;
  uv_mutex_lock(&b->mu);
  n = b->n;
  memcpy(got, b->slot, (size_t)n * sizeof *got);
  memcpy(len, b->len, (size_t)n * sizeof *len);
  b->n = 0;
  uv_mutex_unlock(&b->mu);
  for (int i = 0; i < n; i++) {
    if (!stamped(got[i], len[i], (unsigned)len[i] * 7u)) bad++;
    wp__slab_free(got[i]);
  }
  return bad;
}

static void worker(void *arg) {
  int id = (int)(intptr_t)arg, *bad = &bad_of[id];
  box *next = &boxes[(id + 1) % THREADS];
  for (unsigned r = 0; r < ROUNDS; r++) {
    size_t n = size_of(r * THREADS + (unsigned)id);
    unsigned char *b = wp__slab_alloc(n);
    if (b == NULL) {
      (*bad)++;
      continue;
    }
    stamp(b, n, (unsigned)n * 7u);
    uv_mutex_lock(&next->mu);
    if (r % 2 && next->n < BOX) { /* a block for the next thread */
      next->slot[next->n] = b;
      next->len[next->n++] = n;
      b = NULL;
    }
    uv_mutex_unlock(&next->mu);
    if (b) {
      if (!stamped(b, n, (unsigned)n * 7u)) (*bad)++;
      wp__slab_free(b);
    }
    if (r % 16 == 0) *bad += drain(&boxes[id]);
  }
}

Test(slab, threads_free_each_others_blocks) {
  uv_thread_t t[THREADS];
  int bad = 0;
  for (int i = 0; i < THREADS; i++) {
    cr_assert_eq(uv_mutex_init(&boxes[i].mu), 0);
    boxes[i].n = 0;
    bad_of[i] = 0;
  }
  for (int i = 0; i < THREADS; i++)
    cr_assert_eq(uv_thread_create(&t[i], worker, (void *)(intptr_t)i), 0);
  for (int i = 0; i < THREADS; i++)
    uv_thread_join(&t[i]);
  for (int i = 0; i < THREADS; i++) {
    bad += bad_of[i] + drain(&boxes[i]);
    uv_mutex_destroy(&boxes[i].mu);
  }
  cr_assert_eq(bad, 0);
}
