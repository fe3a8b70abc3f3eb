/*
 * fuzz_http.c: libFuzzer target for the HTTP endpoints of bindings/http.c.
 *
 * The request parser is driven the way a client drives it: the process
 * serves /metrics, /healthz and /readyz from a wpool host on 127.0.0.1
 * (wpool_host_serve, as `wpool run --metrics` does), and every input is
 * sent as the bytes of one TCP connection, which the client then half
 * closes.  Whatever the bytes, the server must answer with HTTP responses
 * only, close the connection, and neither crash, leak nor hang (the
 * fuzzer's -timeout catches a connection that is never closed).  One pool
 * exists, so that /metrics has something to say.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lualib.h>

#include "wpool_host.h"

typedef struct client {
  uv_tcp_t tcp;
  uv_connect_t connect;
  uv_write_t write;
  uv_shutdown_t shutdown;
  uv_buf_t out;
  char head[16]; /* the first bytes of the answer */
  size_t got;
  int closed;
  char rbuf[65536];
} client;

static uv_loop_t *loop;
static struct sockaddr_in addr;

static void fail(const char *what) {
  fprintf(stderr, "http: %s\n", what);
  __builtin_trap();
}

/* Starts a host with one pool, serving on the first free port. */
static void serve(void) {
  static uv_loop_t l;
  lua_State *L;
  wpool_host *h;
  wp_options o;
  wp_pool *p;
  char where[64], err[256];
  int port, r = -1;
  if (uv_loop_init(&l)) fail("uv_loop_init");
  loop = &l;
  if ((L = luaL_newstate()) == NULL) fail("no memory");
  luaL_openlibs(L);
  if (wpool_host_new(loop, L, &h)) fail("wpool_host_new");
  wp_options_init(&o);
  o.name = "fuzz";
  if (wp_pool_new(&o, &p, err, sizeof err)) fail(err);
  for (port = 20000 + (int)(uv_os_getpid() % 20000); r; port++) {
    snprintf(where, sizeof where, "127.0.0.1:%d", port);
    if ((r = wpool_host_serve(h, where)) != 0 &&
        !(r == WP_ESYS && errno == EADDRINUSE))
      fail(wpool_host_strerror(r));
  }
  uv_ip4_addr("127.0.0.1", port - 1, &addr);
}

static void on_close(uv_handle_t *h) {
  ((client *)h->data)->closed = 1;
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  client *c = h->data;
  (void)hint;
  *buf = uv_buf_init(c->rbuf, sizeof c->rbuf);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  client *c = s->data;
  if (n < 0) {
    uv_close((uv_handle_t *)s, on_close);
    return;
  }
  if (c->got < sizeof c->head) {
    size_t k = sizeof c->head - c->got;
    memcpy(c->head + c->got, buf->base, (size_t)n < k ? (size_t)n : k);
  }
  c->got += (size_t)n;
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  (void)req;
  (void)status;
}

static void on_write(uv_write_t *req, int status) {
  client *c = req->data;
  (void)status;
  uv_shutdown(&c->shutdown, (uv_stream_t *)&c->tcp, on_shutdown);
}

static void on_connect(uv_connect_t *req, int status) {
  client *c = req->data;
  if (status == UV_EADDRNOTAVAIL) { /* out of local ports: skip this one */
    uv_close((uv_handle_t *)&c->tcp, on_close);
    return;
  }
  if (status) fail(uv_strerror(status));
  uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  c->write.data = c;
  if (uv_write(&c->write, (uv_stream_t *)&c->tcp, &c->out, 1, on_write))
    fail("uv_write");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static client c;
  int i;
  if (size == 0) return 0;
  if (loop == NULL) serve();
  memset(&c, 0, sizeof c);
  uv_tcp_init(loop, &c.tcp);
  c.tcp.data = c.connect.data = &c;
  c.out = uv_buf_init((char *)data, (unsigned)size);
  if (uv_tcp_connect(&c.connect, &c.tcp, (struct sockaddr *)&addr, on_connect))
    fail("uv_tcp_connect");
  while (!c.closed)
    uv_run(loop, UV_RUN_ONCE);
  /* Let the server's side finish closing. */
  for (i = 0; i < 4; i++)
    uv_run(loop, UV_RUN_NOWAIT);
  if (c.got && memcmp(c.head, "HTTP/1.1 ", c.got < 9 ? c.got : 9))
    fail("an answer that is not HTTP");
  return 0;
}
