/*
 * options.h: the options of a pool, described once.
 *
 * One row per option a user sets by name: its Lua key, its type, where it
 * lives in wp_options, the range a given value must lie in, its default
 * and the words of its error.  The rows drive wp_options_init (the
 * defaults), the checks of wp_pool_new, the option parser of
 * workerpool.new (bindings/lworkerpool.c) and, through
 * tests/core/test_options.c, the option tables of docs/api.md and
 * docs/guards.md.  Internal: hidden symbols, wp__ prefix.
 */
#ifndef WP_OPTIONS_H
#define WP_OPTIONS_H

#include <stddef.h>

#include "wpool.h"

#ifndef WP_HIDDEN
#define WP_HIDDEN __attribute__((visibility("hidden")))
#endif

typedef enum {
  WP__OPT_INT,     /* an int field holding an integer */
  WP__OPT_SIZE,    /* a size_t field holding an integer */
  WP__OPT_SECONDS, /* a double field holding a number of seconds */
  WP__OPT_STRING,  /* a const char * field */
  WP__OPT_CHOICE   /* an int field: the index of one of `choices` */
} wp__opt_type;

enum {
  WP__OPT_REQUIRED = 1, /* workerpool.new needs it; C keeps the default */
  WP__OPT_OPEN_MIN = 2  /* min itself is out of range ("positive") */
};

/* The offset of an option that is no field of wp_options: the bindings
 * keep it (init_file, tenant_label_limit). */
#define WP__OPT_NOFIELD ((size_t)-1)

typedef struct wp__option {
  const char *name;           /* the Lua key; messages start with it */
  wp__opt_type type;          /* WP__OPT_* */
  size_t offset;              /* in wp_options, or WP__OPT_NOFIELD */
  double min, max;            /* numbers: the range of a value given (the
                                 bounds of a choice's index) */
  double def;                 /* the default: set by wp_options_init, taken when
                                 Lua leaves the key out; a C caller may leave it */
  int flags;                  /* WP__OPT_* flags */
  const char *must;           /* the error after the name: "must be ..." */
  const char *const *choices; /* WP__OPT_CHOICE: the words, NULL-ended */
  const char *doc_default;    /* the default as the docs' tables say it */
} wp__option;

/* Every option, in the order workerpool.new checks them; the last row has
 * a NULL name.  There are fewer than WP__OPT_MAX rows. */
#define WP__OPT_MAX 32
WP_HIDDEN extern const wp__option wp__options[];

/* The row of `name`, or NULL.  Any thread; no allocation. */
WP_HIDDEN const wp__option *wp__option_find(const char *name);

/* Whether v lies in the range of a given value of d (NaN never does).
 * Never fails. */
WP_HIDDEN int wp__option_in_range(const wp__option *d, double v);

/* Checks opts as wp_pool_new takes them: every numeric field holds its
 * default or lies in its range, min_workers <= max_workers, a name is
 * 1 to 255 bytes, on_full = "block" has a queue_cap.  Returns 0, or
 * WP_EINVAL with "name must ..." written to errbuf (when errlen > 0,
 * truncated).  Any thread; no allocation. */
WP_HIDDEN int wp__options_check(const wp_options *opts, char *errbuf,
                                size_t errlen);

#endif
