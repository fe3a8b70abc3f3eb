/*
 * host_signals.c: SIGINT and SIGTERM for one host per process.  They are
 * caught by a handler of our own (not uv_signal), which always acts on the
 * loop thread (a copy is forwarded there when another thread took it).  It
 * counts the signal, wakes the loop through an async handle, and arms a
 * hook in the host coroutine that is running, if any, so that a busy
 * script cannot keep the loop from seeing the signal.  Counting first and
 * waking second, with the count read again once the loop has stopped,
 * means no signal is lost.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>

#include "host_internal.h"

/* ---- signals --------------------------------------------------------- */

#define TERM_GRACE_NS 1000000000u /* a busy coroutine's time after SIGTERM */

/* The host whose loop takes SIGINT and SIGTERM (its sig_tid: the loop's
 * thread). */
static wpool_host *_Atomic sig_host;

/* Count hook armed by a signal in the running host coroutine: raises
 * "interrupted!" once h->interrupt_at has passed, and at every instruction
 * after that until the coroutine has left (wpl_co_resume removes the hook), so
 * that a pcall cannot keep the loop from the signal. */
void wpl_host_interrupt_hook(lua_State *L, lua_Debug *ar) {
  wpool_host *h = atomic_load(&sig_host);
  (void)ar;
  if (h == NULL || uv_hrtime() >= h->interrupt_at) {
    lua_sethook(L, wpl_host_interrupt_hook,
                LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
    luaL_error(L, "interrupted!");
  }
}

/* The SIGINT/SIGTERM handler.  On the loop thread: counts the signal,
 * interrupts a busy coroutine (SIGINT or a second signal at once, a first
 * SIGTERM after TERM_GRACE_NS, so a short callback may finish) and wakes the
 * loop.  On any other thread: sends the signal on to the loop thread. */
static void on_signal(int signum) {
  int saved = errno, k = signum == SIGTERM, total;
  wpool_host *h = atomic_load(&sig_host);
  lua_State *co;
  if (h == NULL) {
    errno = saved;
    return;
  }
  if (!pthread_equal(pthread_self(), h->sig_tid)) {
    pthread_kill(h->sig_tid, signum);
    errno = saved;
    return;
  }
  total = atomic_fetch_add(&h->nsig[k], 1) + 1 + atomic_load(&h->nsig[!k]);
  if ((co = h->running) != NULL) {
    if (k && total == 1) {
      h->interrupt_at = uv_hrtime() + TERM_GRACE_NS;
      lua_sethook(co, wpl_host_interrupt_hook, LUA_MASKCOUNT, 1000);
    } else {
      h->interrupt_at = 0;
      lua_sethook(co, wpl_host_interrupt_hook,
                  LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
    }
  }
  uv_async_send(&h->sig_async);
  errno = saved;
}

/* Acts on the signals counted since the last call: the first starts the
 * shutdown story, any later one forces the hard stop. */
void wpl_host_take_signals(wpool_host *h) {
  static const char *const names[2] = {"SIGINT", "SIGTERM"};
  static const char *const again[2] = {"second SIGINT", "second SIGTERM"};
  int k;
  for (k = 0; k < 2; k++) {
    while (h->nsig_seen[k] < atomic_load(&h->nsig[k])) {
      h->nsig_seen[k]++;
      if (h->story == STORY_NONE)
        wpool_host_shutdown(h, names[k]);
      else if (h->story == STORY_DRAINING)
        wpl_host_hard_stop(h, again[k]);
    }
  }
}

void wpl_host_sig_async_cb(uv_async_t *a) {
  wpl_host_take_signals(a->data);
}

int wpool_host_handle_signals(wpool_host *h, double drain_timeout) {
  struct sigaction sa;
  wpool_host *none = NULL;
  int saved;
  h->drain_timeout = drain_timeout;
  if (h->signals) return 0;
  h->sig_tid = pthread_self(); /* h's own: another host's stays as it is */
  if (!atomic_compare_exchange_strong(&sig_host, &none, h))
    return WP_EEXISTS; /* another host has them */
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  sigaddset(&sa.sa_mask, SIGINT);
  sigaddset(&sa.sa_mask, SIGTERM);
  if (sigaction(SIGINT, &sa, &h->old_sa[0]) != 0) goto err_host;
  if (sigaction(SIGTERM, &sa, &h->old_sa[1]) != 0) goto err_sigint;
  h->signals = 1;
  return 0;
err_sigint:
  saved = errno;
  sigaction(SIGINT, &h->old_sa[0], NULL);
  errno = saved;
err_host:
  atomic_store(&sig_host, NULL);
  return WP_ESYS;
}

/* [-0, +1, m] Pushes tostring of c's handle. */

void wpl_host_signals_close(wpool_host *h) {
  if (!h->signals) return;
  atomic_store(&sig_host, NULL);
  sigaction(SIGINT, &h->old_sa[0], NULL);
  sigaction(SIGTERM, &h->old_sa[1], NULL);
  h->signals = 0;
}
