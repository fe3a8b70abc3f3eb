/*
 * mailbox.h: wpl_mailbox, the one way the bindings hand pointers from
 * other threads (a future that ended, a blocking call that returned) to
 * the thread that owns a Lua state.  Posts append under a mutex and, when
 * the mailbox has a wake-up handle, send it (libuv merges sends: the owner
 * takes everything at each wake-up).  The mailbox is reference counted:
 * the owner holds one reference and every pending core callback holds one,
 * so a callback that runs after the owner went finds memory to post into.
 */
#ifndef WPOOL_MAILBOX_H
#define WPOOL_MAILBOX_H

#include <stddef.h>
#include <uv.h>

#include "wpool.h"

#define WPL_MAILBOX_HIDDEN __attribute__((visibility("hidden")))

/* Message kinds.  A WPL_MSG_FUTURE message holds a reference to its
 * future, which the mailbox releases if the message is never taken. */
enum { WPL_MSG_FUTURE, WPL_MSG_OFFLOAD };

typedef struct wpl_msg {
  int kind;  /* WPL_MSG_* */
  void *ptr; /* wp_future * or the poster's object */
} wpl_msg;

typedef struct wpl_mailbox wpl_mailbox;

/* A new open mailbox with one reference, the owner's; wake (borrowed, or
 * NULL) is sent at each post.  NULL out of memory.  Any thread. */
WPL_MAILBOX_HIDDEN wpl_mailbox *wpl_mailbox_new(uv_async_t *wake);
/* Any thread. */
WPL_MAILBOX_HIDDEN void wpl_mailbox_retain(wpl_mailbox *mb);
/* Drops a reference; the last one releases the futures of messages never
 * taken and frees the mailbox.  Any thread. */
WPL_MAILBOX_HIDDEN void wpl_mailbox_release(wpl_mailbox *mb);
/* Appends a message (the array doubles as it fills).  1 when posted; 0
 * when the mailbox is closed or memory ran out, and the caller still owns
 * ptr.  Any thread. */
WPL_MAILBOX_HIDDEN int wpl_mailbox_post(wpl_mailbox *mb, int kind, void *ptr);
/* Has f, once it ends, posted as a WPL_MSG_FUTURE message (a future not
 * posted, closed mailbox or no memory, is released: the owner never hears
 * of it).  Takes its own references to f and mb.  0 or WP_ENOMEM (nothing
 * taken).  Any thread. */
WPL_MAILBOX_HIDDEN int wpl_mailbox_watch(wpl_mailbox *mb, wp_future *f);
/* Takes every message posted so far: a malloc'd array of *n messages that
 * the caller frees (NULL when *n is 0).  The owner's thread. */
WPL_MAILBOX_HIDDEN wpl_msg *wpl_mailbox_take(wpl_mailbox *mb, size_t *n);
/* Refuses every later post and forgets the wake-up handle (which may then
 * be closed).  Messages already posted stay until taken or released.  The
 * owner's thread. */
WPL_MAILBOX_HIDDEN void wpl_mailbox_close(wpl_mailbox *mb);

#endif
