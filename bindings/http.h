/*
 * http.h: the host's HTTP endpoints (http.c): a server on the host loop
 * and the process-wide table of its GET routes.  /healthz, /readyz,
 * /metrics and /debug/pools are in the table from the start; another file
 * adds a route with wpl_http_route.
 */
#ifndef WPOOL_HTTP_H
#define WPOOL_HTTP_H

#include <stddef.h>
#include <uv.h>

#define WPL_HTTP_HIDDEN __attribute__((visibility("hidden")))

typedef struct wpool_host wpool_host;
typedef struct wpl_http_server wpl_http_server;

/* What a route answers.  The handler sets code (200 when left at 0),
 * reason, type and the body: static text (owned 0), or malloc'd (owned 1:
 * the server frees it); body NULL with owned 1 means out of memory (500). */
typedef struct wpl_http_reply {
  int code;
  const char *reason; /* "OK" when NULL */
  const char *type;   /* Content-Type; text/plain when NULL */
  char *body;
  size_t len;
  int owned;
} wpl_http_reply;

/* Answers GET path for the host h, on the loop thread; never fails (an
 * error is a reply). */
typedef void (*wpl_http_handler)(wpool_host *h, wpl_http_reply *r);

/* Adds the route GET path (copied; exact match, the query ignored) to the
 * table of every server, now and later.  0, WP_EEXISTS (path taken) or
 * WP_ENOMEM (the table holds 32 routes).  Any thread. */
WPL_HTTP_HIDDEN int wpl_http_route(const char *path, wpl_http_handler fn);
/* The routes' lock around a fork (lworkerpool.c's handlers). */
WPL_HTTP_HIDDEN void wpl_http_atfork(int phase);

/* Starts serving on addr from the loop; *out is closed by wpl_http_close.
 * 0 or a libuv error code (UV_EINVAL for a malformed address).  The loop
 * thread. */
WPL_HTTP_HIDDEN int wpl_http_serve(wpool_host *h, uv_loop_t *loop,
                                   const char *addr, wpl_http_server **out);
/* Closes the listener and every connection; NULL is ignored.  The loop
 * thread. */
WPL_HTTP_HIDDEN void wpl_http_close(wpl_http_server *s);

#endif
