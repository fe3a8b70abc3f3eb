/*
 * http.c: the host's health and metrics endpoints, served on its own loop.
 *
 *   GET /metrics  every live pool's metrics (Prometheus text format)
 *   GET /healthz  liveness: 200 from the loop itself, shutdown included
 *   GET /readyz   readiness: 503 once shutdown began or a pool stopped,
 *                 and while a pool is wedged (metrics.c)
 *   GET /debug/pools  what every pool's workers run now, as JSON
 *
 * The routes are one table (http.h): the four above are built in, and
 * another file adds one with wpl_http_route.  A path not in the table gets
 * a 404, a method other than GET on a known path a 405.
 *
 * Requests are parsed by http-parser (Debian's libhttp-parser).  A request
 * that is malformed, or larger than MAX_REQUEST bytes, gets a 400 and its
 * connection is closed; a client that does not finish a request within
 * IDLE_MS is disconnected, so a slow client cannot hold the loop or a
 * connection slot.  Responses are written whole; keep-alive is honoured.
 * Output is bounded per connection: once more than MAX_BACKLOG bytes of
 * responses wait to be sent, the connection stops parsing and reading (its
 * unparsed bytes are kept) until the client has taken them, so a client
 * that pipelines requests and never reads costs at most that much memory,
 * and is disconnected after IDLE_MS.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <http_parser.h>

#include "http.h"
#include "lbind.h"
#include "wp_internal.h" /* WP__FORK_* */
#include "wpool_host.h"

#define MAX_REQUEST 8192 /* bytes of one request, headers included */
#define MAX_URL 256
#define MAX_CONNS 128
#define IDLE_MS 5000
#define MAX_BACKLOG (256 * 1024) /* bytes of responses not yet sent */

typedef struct wpl_http_server server;

typedef struct conn {
  uv_tcp_t tcp;    /* first: the handle's memory is the conn's */
  uv_timer_t idle; /* closes a silent or slow client */
  server *srv;
  struct conn *next, *prev;
  http_parser parser;
  size_t req_bytes; /* bytes of the request being read */
  char url[MAX_URL];
  size_t url_len;
  int url_too_long;
  int closing;
  int nclosing;   /* handles still closing */
  size_t backlog; /* bytes of queued responses not yet written */
  int held;       /* parsing and reading stopped until the backlog drains */
  size_t nheld;   /* unparsed bytes kept at the start of rbuf meanwhile */
  char rbuf[4096];
} conn;

struct wpl_http_server {
  uv_tcp_t tcp;
  wpool_host *host;
  conn *conns;
  int nconns;
  int closing;
};

static http_parser_settings settings;

static void conn_closed(uv_handle_t *h) {
  conn *c = h->data;
  if (--c->nclosing == 0) free(c);
}

static void conn_close(conn *c) {
  server *s = c->srv;
  if (c->closing) return;
  c->closing = 1;
  if (c->prev)
    c->prev->next = c->next;
  else
    s->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  s->nconns--;
  c->nclosing = 2;
  uv_timer_stop(&c->idle);
  uv_close((uv_handle_t *)&c->idle, conn_closed);
  uv_close((uv_handle_t *)&c->tcp, conn_closed);
}

typedef struct write_req {
  uv_write_t req;
  conn *c;
  int close_after;
  size_t len; /* bytes of the response */
  char *body; /* malloc'd, or NULL */
  char head[256];
} write_req;

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);
static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf);
static void parse(conn *c, char *data, size_t len);

static void write_done(uv_write_t *req, int status) {
  write_req *w = (write_req *)req;
  conn *c = w->c;
  c->backlog -= w->len;
  if ((status || w->close_after) && !c->closing) conn_close(c);
  free(w->body);
  free(w);
  if (c->held && !c->closing && c->backlog <= MAX_BACKLOG / 2) {
    /* The client caught up: parse what was kept, then read again. */
    size_t n = c->nheld;
    c->held = 0;
    c->nheld = 0;
    http_parser_pause(&c->parser, 0);
    if (n) parse(c, c->rbuf, n);
    if (!c->held && !c->closing)
      uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  }
}

/* Queues one response; takes body (malloc'd) when owned is set. */
static void respond(conn *c, int code, const char *reason, const char *type,
                    char *body, size_t len, int owned, int keep) {
  write_req *w;
  uv_buf_t bufs[2];
  int n;
  if (c->closing) {
    if (owned) free(body);
    return;
  }
  if ((w = calloc(1, sizeof *w)) == NULL) {
    if (owned) free(body);
    conn_close(c);
    return;
  }
  w->c = c;
  w->close_after = !keep;
  w->body = owned ? body : NULL;
  w->len = len;
  n = snprintf(w->head, sizeof w->head,
               "HTTP/1.1 %d %s\r\nContent-Type: %s\r\n"
               "Content-Length: %zu\r\nConnection: %s\r\n\r\n",
               code, reason, type, len, keep ? "keep-alive" : "close");
  w->len += (size_t)n;
  bufs[0] = uv_buf_init(w->head, (unsigned)n);
  bufs[1] = uv_buf_init(body, (unsigned)len);
  if (uv_write(&w->req, (uv_stream_t *)&c->tcp, bufs, len ? 2 : 1,
               write_done) != 0) {
    free(w->body);
    free(w);
    conn_close(c);
    return;
  }
  c->backlog += w->len;
}

static void respond_text(conn *c, int code, const char *reason,
                         const char *text, int keep) {
  respond(c, code, reason, "text/plain; charset=utf-8", (char *)text,
          strlen(text), 0, keep);
}

/* ---- routes ---------------------------------------------------------- */

#define MAX_ROUTES 32

static void get_healthz(wpool_host *h, wpl_http_reply *r) {
  (void)h;
  r->body = "ok\n";
  r->len = 3;
}

static void get_readyz(wpool_host *h, wpl_http_reply *r) {
  if (wpool_host_ready(h) && !wpl_pools_wedged() && !wpl_redis_down()) {
    r->body = "ready\n";
    r->len = 6;
  } else {
    r->code = 503;
    r->reason = "Service Unavailable";
    r->body = "not ready\n";
    r->len = 10;
  }
}

static void get_metrics(wpool_host *h, wpl_http_reply *r) {
  (void)h;
  r->type = "text/plain; version=0.0.4; charset=utf-8";
  r->body = wpl_metrics_text(&r->len); /* the collectors' text included */
  r->owned = 1;
}

static void get_debug_pools(wpool_host *h, wpl_http_reply *r) {
  (void)h;
  r->type = "application/json";
  r->body = wpl_pools_json(&r->len);
  r->owned = 1;
}

/* The routes of every server; the first entries are built in, and
 * wpl_http_route appends.  Paths of added routes are malloc'd and live as
 * long as the process. */
static struct {
  uv_once_t once;
  uv_mutex_t mu; /* guards n and the entries past the built-in ones */
  int n;
  struct route {
    const char *path;
    wpl_http_handler fn;
  } v[MAX_ROUTES];
} routes = {UV_ONCE_INIT, .n = 4,
            .v = {{"/healthz", get_healthz},
                  {"/readyz", get_readyz},
                  {"/metrics", get_metrics},
                  {"/debug/pools", get_debug_pools}}};

static void routes_init(void) {
  if (uv_mutex_init(&routes.mu) != 0) abort();
}

void wpl_http_atfork(int phase) {
  wp__atfork_lock(phase, &routes.once, routes_init, &routes.mu);
}

/* The handler of path, or NULL.  Needs routes.mu. */
static wpl_http_handler route_find_locked(const char *path) {
  int i;
  for (i = 0; i < routes.n; i++)
    if (strcmp(routes.v[i].path, path) == 0) return routes.v[i].fn;
  return NULL;
}

static wpl_http_handler route_find(const char *path) {
  wpl_http_handler fn;
  uv_once(&routes.once, routes_init);
  uv_mutex_lock(&routes.mu);
  fn = route_find_locked(path);
  uv_mutex_unlock(&routes.mu);
  return fn;
}

int wpl_http_route(const char *path, wpl_http_handler fn) {
  char *copy;
  int err = 0;
  if ((copy = strdup(path)) == NULL) return WP_ENOMEM;
  uv_once(&routes.once, routes_init);
  uv_mutex_lock(&routes.mu);
  if (route_find_locked(path)) {
    err = WP_EEXISTS;
  } else if (routes.n == MAX_ROUTES) {
    err = WP_ENOMEM;
  } else {
    routes.v[routes.n].path = copy;
    routes.v[routes.n].fn = fn;
    routes.n++;
  }
  uv_mutex_unlock(&routes.mu);
  if (err) free(copy);
  return err;
}

/* ---- requests -------------------------------------------------------- */

static int on_url(http_parser *p, const char *at, size_t len) {
  conn *c = p->data;
  if (c->url_len + len >= MAX_URL) {
    c->url_too_long = 1;
    return 0;
  }
  memcpy(c->url + c->url_len, at, len);
  c->url_len += len;
  c->url[c->url_len] = '\0';
  return 0;
}

static int on_message_begin(http_parser *p) {
  conn *c = p->data;
  c->url_len = 0;
  c->url[0] = '\0';
  c->url_too_long = 0;
  return 0;
}

static int on_message_complete(http_parser *p) {
  conn *c = p->data;
  wpool_host *h = c->srv->host;
  int keep = http_should_keep_alive(p);
  wpl_http_handler fn;
  char *q;
  c->req_bytes = 0;
  uv_timer_again(&c->idle);
  if (c->url_too_long) {
    respond_text(c, 400, "Bad Request", "request too large\n", 0);
    return 1;
  }
  if ((q = strchr(c->url, '?')) != NULL) *q = '\0'; /* ignore the query */
  if ((fn = route_find(c->url)) == NULL) {
    respond_text(c, 404, "Not Found", "not found\n", keep);
  } else if (p->method != HTTP_GET) {
    respond_text(c, 405, "Method Not Allowed", "only GET\n", keep);
  } else {
    wpl_http_reply r = {0, NULL, NULL, NULL, 0, 0};
    fn(h, &r);
    if (r.owned && r.body == NULL)
      respond_text(c, 500, "Internal Server Error", "out of memory\n", 0);
    else
      respond(c, r.code ? r.code : 200, r.reason ? r.reason : "OK",
              r.type ? r.type : "text/plain; charset=utf-8", r.body, r.len,
              r.owned, keep);
  }
  if (keep && c->backlog > MAX_BACKLOG)
    http_parser_pause(p, 1); /* on_read/write_done keep the rest */
  return keep ? 0 : 1;       /* 1 stops parsing after a closing response */
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  conn *c = h->data;
  (void)hint;
  *buf = uv_buf_init(c->rbuf, sizeof c->rbuf);
}

/* Feeds len bytes at data to the parser and acts on how it stopped. */
static void parse(conn *c, char *data, size_t len) {
  size_t done;
  c->req_bytes += len;
  done = http_parser_execute(&c->parser, &settings, data, len);
  if (c->closing) return;
  if (HTTP_PARSER_ERRNO(&c->parser) == HPE_CB_message_complete) {
    uv_read_stop((uv_stream_t *)&c->tcp); /* a closing response is on its way */
    return;
  }
  if (HTTP_PARSER_ERRNO(&c->parser) == HPE_PAUSED) {
    /* Too much output waits: keep the rest and stop reading meanwhile. */
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->req_bytes = 0; /* a request just ended: the kept bytes count again */
    memmove(c->rbuf, data + done, len - done);
    c->nheld = len - done;
    c->held = 1;
    return;
  }
  if (HTTP_PARSER_ERRNO(&c->parser) != HPE_OK || done != len ||
      c->req_bytes > MAX_REQUEST) {
    uv_read_stop((uv_stream_t *)&c->tcp);
    respond_text(c, 400, "Bad Request",
                 c->req_bytes > MAX_REQUEST ? "request too large\n"
                                            : "malformed request\n",
                 0);
  }
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  conn *c = stream->data;
  if (nread < 0) {
    conn_close(c);
    return;
  }
  if (nread == 0 || c->closing) return;
  parse(c, buf->base, (size_t)nread);
}

static void on_idle(uv_timer_t *t) {
  conn_close(t->data);
}

static void on_connection(uv_stream_t *listener, int status) {
  server *s = listener->data;
  conn *c;
  if (status != 0) return;
  if ((c = calloc(1, sizeof *c)) == NULL) return;
  c->srv = s;
  uv_tcp_init(listener->loop, &c->tcp);
  uv_timer_init(listener->loop, &c->idle);
  c->tcp.data = c->idle.data = c;
  c->nclosing = 2;
  if (uv_accept(listener, (uv_stream_t *)&c->tcp) != 0 ||
      s->nconns >= MAX_CONNS || s->closing) {
    c->closing = 1;
    uv_close((uv_handle_t *)&c->idle, conn_closed);
    uv_close((uv_handle_t *)&c->tcp, conn_closed);
    return;
  }
  c->next = s->conns;
  if (s->conns) s->conns->prev = c;
  s->conns = c;
  s->nconns++;
  http_parser_init(&c->parser, HTTP_REQUEST);
  c->parser.data = c;
  uv_timer_start(&c->idle, on_idle, IDLE_MS, IDLE_MS);
  uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

/* "host:port" or "[v6]:port" into a socket address.  0 or UV error. */
static int parse_addr(const char *addr, struct sockaddr_storage *ss) {
  char host[128];
  const char *colon = strrchr(addr, ':');
  char *end;
  long port;
  size_t hl;
  if (colon == NULL) return UV_EINVAL;
  port = strtol(colon + 1, &end, 10);
  if (*end || end == colon + 1 || port < 0 || port > 65535) return UV_EINVAL;
  hl = (size_t)(colon - addr);
  if (hl >= sizeof host) return UV_EINVAL;
  memcpy(host, addr, hl);
  host[hl] = '\0';
  if (host[0] == '[' && hl >= 2 && host[hl - 1] == ']') {
    host[hl - 1] = '\0';
    return uv_ip6_addr(host + 1, (int)port, (struct sockaddr_in6 *)ss);
  }
  return uv_ip4_addr(host, (int)port, (struct sockaddr_in *)ss);
}

static void server_closed(uv_handle_t *h) {
  free(h->data);
}

int wpl_http_serve(wpool_host *h, uv_loop_t *loop, const char *addr,
                   wpl_http_server **out) {
  struct sockaddr_storage ss;
  server *s;
  int r;
  settings.on_message_begin = on_message_begin;
  settings.on_url = on_url;
  settings.on_message_complete = on_message_complete;
  memset(&ss, 0, sizeof ss);
  if ((r = parse_addr(addr, &ss)) != 0) return r;
  if ((s = calloc(1, sizeof *s)) == NULL) return UV_ENOMEM;
  s->host = h;
  uv_tcp_init(loop, &s->tcp);
  s->tcp.data = s;
  if ((r = uv_tcp_bind(&s->tcp, (struct sockaddr *)&ss, 0)) != 0 ||
      (r = uv_listen((uv_stream_t *)&s->tcp, 128, on_connection)) != 0) {
    uv_close((uv_handle_t *)&s->tcp, server_closed);
    return r;
  }
  uv_unref((uv_handle_t *)&s->tcp); /* serving keeps no script alive */
  *out = s;
  return 0;
}

void wpl_http_close(server *s) {
  if (s == NULL) return;
  s->closing = 1;
  while (s->conns)
    conn_close(s->conns);
  uv_close((uv_handle_t *)&s->tcp, server_closed);
}
