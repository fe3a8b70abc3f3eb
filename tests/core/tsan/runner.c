/*
 * runner.c: runs the tests registered through the stand-in criterion.h
 * (ThreadSanitizer builds only; see that header for why).
 */
#include <stdlib.h>

#include "criterion/criterion.h"

typedef struct wpt_case {
  const char *suite, *name;
  wpt_fn fn;
} wpt_case;

static wpt_case cases[512];
static int ncases;
static jmp_buf on_fail;

void wpt_register(const char *suite, const char *name, wpt_fn fn) {
  if (ncases == (int)(sizeof cases / sizeof *cases)) {
    fprintf(stderr, "too many tests\n");
    abort();
  }
  cases[ncases].suite = suite;
  cases[ncases].name = name;
  cases[ncases].fn = fn;
  ncases++;
}

_Noreturn void wpt_fail(const char *file, int line, const char *what) {
  fprintf(stderr, "%s:%d: assertion failed: %s\n", file, line, what);
  longjmp(on_fail, 1);
}

int main(int argc, char **argv) {
  static int i, passed, failed; /* static: survive longjmp */
  (void)argc;
  (void)argv;
  for (i = 0; i < ncases; i++) {
    if (setjmp(on_fail) == 0) {
      cases[i].fn();
      passed++;
    } else {
      fprintf(stderr, "FAIL %s::%s\n", cases[i].suite, cases[i].name);
      failed++;
    }
  }
  printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
