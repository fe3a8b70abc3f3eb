/*
 * fault.h: allocation-failure injection, for the test build only.
 *
 * With -DWPOOL_FAULT_INJECTION=ON, CMake force-includes this header
 * (-include) into every file of core/, so that their malloc, calloc,
 * realloc, strdup and posix_memalign calls (the worker states' allocator
 * included) go through the counters of fault.c.  A test arms the injector
 * to make the n-th allocation from then on fail, runs a scenario, and
 * checks that the failure surfaced as a clean WP_ENOMEM or "not enough
 * memory" (tests/fault/, docs/testing.md).  Other builds never see this
 * file.
 *
 * All functions are thread-safe; none fails.
 */
#ifndef WPOOL_FAULT_H
#define WPOOL_FAULT_H

/* Declare the real functions before they are renamed below. */
#include <stdlib.h>
#include <string.h>

/* Makes allocation number n (1: the next one) fail; with persist, every
 * later one fails too, and resets the counters below.  n <= 0 disarms and
 * keeps them. */
void wp_fault_arm(long n, int persist);

/* Allocations attempted and refused since the last wp_fault_arm. */
long wp_fault_seen(void);
long wp_fault_failed(void);

void *wp_fault_malloc(size_t n);
void *wp_fault_calloc(size_t n, size_t size);
void *wp_fault_realloc(void *p, size_t n);
char *wp_fault_strdup(const char *s);
int wp_fault_posix_memalign(void **out, size_t align, size_t n);

/* Tests include this header for the functions above only. */
#ifndef WPOOL_FAULT_API_ONLY
#define malloc(n) wp_fault_malloc(n)
#define calloc(n, size) wp_fault_calloc(n, size)
#define realloc(p, n) wp_fault_realloc(p, n)
#define strdup(s) wp_fault_strdup(s)
#define posix_memalign(out, align, n) wp_fault_posix_memalign(out, align, n)
#endif

#endif
