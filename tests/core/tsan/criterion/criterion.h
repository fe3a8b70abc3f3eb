/*
 * criterion.h (stand-in): the subset of Criterion's API our C tests use,
 * for ThreadSanitizer builds only.
 *
 * Criterion 2.4 cannot start under ThreadSanitizer (its inheritable arena
 * fails to map: Snaipe/Criterion#274), so TSan builds compile the same test
 * files against this header and runner.c instead: every Test() registers
 * itself and runs in-process, one after another.  A failed assertion ends
 * its test through longjmp and the run ends with Criterion-style counts.
 */
#ifndef WPT_CRITERION_H
#define WPT_CRITERION_H

#include <setjmp.h>
#include <stdio.h>
#include <string.h>

typedef void (*wpt_fn)(void);

void wpt_register(const char *suite, const char *name, wpt_fn fn);
_Noreturn void wpt_fail(const char *file, int line, const char *what);

#define WPT_CAT_(a, b) a##b
#define WPT_CAT(a, b) WPT_CAT_(a, b)

#define Test(suite, name, ...)                                                 \
  static void suite##_##name(void);                                            \
  __attribute__((constructor)) static void WPT_CAT(wpt_reg_,                   \
                                                   suite##_##name)(void) {     \
    wpt_register(#suite, #name, suite##_##name);                               \
  }                                                                            \
  static void suite##_##name(void)

#define cr_assert(cond, ...)                                                   \
  do {                                                                         \
    if (!(cond)) wpt_fail(__FILE__, __LINE__, #cond);                          \
  } while (0)
#define cr_expect cr_assert
#define cr_assert_not(cond, ...) cr_assert(!(cond))
#define cr_assert_eq(a, b, ...) cr_assert((a) == (b))
#define cr_assert_neq(a, b, ...) cr_assert((a) != (b))
#define cr_assert_lt(a, b, ...) cr_assert((a) < (b))
#define cr_assert_leq(a, b, ...) cr_assert((a) <= (b))
#define cr_assert_gt(a, b, ...) cr_assert((a) > (b))
#define cr_assert_geq(a, b, ...) cr_assert((a) >= (b))
#define cr_assert_null(p, ...) cr_assert((p) == NULL)
#define cr_assert_not_null(p, ...) cr_assert((p) != NULL)
#define cr_assert_str_eq(a, b, ...) cr_assert(strcmp((a), (b)) == 0)
#define cr_assert_float_eq(a, b, eps, ...)                                     \
  cr_assert((a) - (b) <= (eps) && (b) - (a) <= (eps))
#define cr_assert_fail(...)                                                    \
  do {                                                                         \
    fprintf(stderr, __VA_ARGS__);                                              \
    fputc('\n', stderr);                                                       \
    wpt_fail(__FILE__, __LINE__, "cr_assert_fail");                            \
  } while (0)
/* Suites only carry options here; each test sets itself up. */
#define TestSuite(...) struct wpt_unused_suite
#define cr_fatal(...) wpt_fail(__FILE__, __LINE__, "cr_fatal")
#define cr_log_info(...) ((void)0)

#endif
