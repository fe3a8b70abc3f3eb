/*
 * test_interrupt_signal.c: wp_set_interrupt_signal, the process-wide choice
 * of how running tasks are interrupted (core/worker.c).  The choice is
 * fixed by the first pool of a process, so each scenario runs in a process
 * that made no pool before it: a forked child for a chosen signal, then
 * this process for "no signal" (the polling hook).  One Test only, so that
 * the in-process runner of the TSan build sees the same order.
 */
#include <criterion/criterion.h>

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "wpool.h"

static const char INIT[] =
    "function spin() while true do end end\n"
    "function spin_pcall()\n"
    "  while true do pcall(function() while true do end end) end\n"
    "end\n"
    "function one() return 1 end\n";

static wp_pool *make_pool(const char *name, double task_timeout) {
  wp_options o;
  wp_pool *p = NULL;
  char err[512];
  int r;
  wp_options_init(&o);
  o.name = name;
  o.max_workers = 2;
  o.init = INIT;
  o.init_len = strlen(INIT);
  o.task_timeout = task_timeout;
  r = wp_pool_new(&o, &p, err, sizeof err);
  cr_assert_eq(r, 0, "wp_pool_new: %s", err);
  return p;
}

/* The status `handler` ends with (waits up to 60 s: a loaded machine). */
static wp_status run(wp_pool *p, const char *handler) {
  wp_future *f = NULL;
  wp_status st;
  cr_assert_eq(wp_submit_values(p, handler, NULL, 0, &f), 0);
  cr_assert_eq(wp_future_wait(f, 60), 0, "%s did not end", handler);
  st = wp_future_status(f);
  wp_future_release(f);
  return st;
}

/* Cancels a running endless task: it ends WP_CANCELLED. */
static wp_status cancel_running(wp_pool *p) {
  wp_future *f = NULL;
  wp_pool_counts c;
  wp_status st;
  double t0 = wp_now();
  cr_assert_eq(wp_submit_values(p, "spin", NULL, 0, &f), 0);
  do {
    wp_pool_get_counts(p, &c);
    if (c.running == 0) usleep(1000);
  } while (c.running == 0 && wp_now() - t0 < 60);
  cr_assert_eq(c.running, 1, "the task started");
  cr_assert_eq(wp_future_cancel(f), 1);
  cr_assert_eq(wp_future_wait(f, 60), 0, "cancel did not land");
  st = wp_future_status(f);
  wp_future_release(f);
  return st;
}

static int handler_is_default(int sig) {
  struct sigaction sa;
  return sigaction(sig, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL;
}

/* In a fresh child: SIGUSR2 instead of SIGRTMIN+5.  Exit status 0 when
 * all held. */
static int chosen_signal_child(void) {
  wp_pool *p;
  int ok = 1;
  ok &= wp_set_interrupt_signal(SIGUSR2) == 0;
  ok &= wp_interrupt_signal() == SIGUSR2;
  p = make_pool("isig-usr2", 0.05);
  ok &= run(p, "spin") == WP_TIMEOUT;
  ok &= run(p, "spin_pcall") == WP_TIMEOUT;
  ok &= !handler_is_default(SIGUSR2);             /* installed, on first use */
  ok &= handler_is_default(SIGRTMIN + 5);         /* the default untouched */
  ok &= wp_set_interrupt_signal(0) == WP_EEXISTS; /* fixed now */
  wp_pool_release(p);
  return ok ? 0 : 1;
}

Test(isig, chosen_signal_then_none) {
  wp_pool *p;
  pid_t pid;
  int status = -1;
  /* The default, and what is refused. */
  cr_assert_eq(wp_interrupt_signal(), SIGRTMIN + 5);
  cr_assert_eq(wp_set_interrupt_signal(-1), WP_EINVAL);
  cr_assert_eq(wp_set_interrupt_signal(SIGKILL), WP_EINVAL);
  cr_assert_eq(wp_set_interrupt_signal(SIGSTOP), WP_EINVAL);
  cr_assert_eq(wp_set_interrupt_signal(SIGRTMAX + 1), WP_EINVAL);
  cr_assert_eq(wp_interrupt_signal(), SIGRTMIN + 5, "unchanged");

  /* A chosen signal, in a child that made no pool yet. */
  fflush(NULL);
  pid = fork();
  cr_assert_neq(pid, -1);
  if (pid == 0) _exit(chosen_signal_child());
  cr_assert_eq(waitpid(pid, &status, 0), pid);
  cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
            "the chosen-signal child failed (status %d)", status);

  /* No signal: deadlines and cancels still land, through the polling
   * hook, even against pcall; no handler is installed. */
  cr_assert_eq(wp_set_interrupt_signal(SIGUSR1), 0);
  cr_assert_eq(wp_set_interrupt_signal(0), 0, "changed before a pool");
  cr_assert_eq(wp_interrupt_signal(), 0);
  p = make_pool("isig-none", 0.05);
  cr_assert_eq(wp_set_interrupt_signal(SIGUSR1), WP_EEXISTS);
  cr_assert_eq(wp_set_interrupt_signal(0), 0, "the same choice again");
  cr_assert_eq(run(p, "one"), WP_OK);
  cr_assert_eq(run(p, "spin"), WP_TIMEOUT);
  cr_assert_eq(run(p, "spin_pcall"), WP_TIMEOUT);
  cr_assert_eq(run(p, "one"), WP_OK, "the worker runs the next task");
  wp_pool_release(p);
  p = make_pool("isig-none-cancel", 0);
  cr_assert_eq(cancel_running(p), WP_CANCELLED);
  cr_assert_eq(run(p, "one"), WP_OK);
  wp_pool_release(p);
  cr_assert(handler_is_default(SIGRTMIN + 5), "no signal was taken");
  cr_assert(handler_is_default(SIGUSR1));
}
