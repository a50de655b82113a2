/*
 * blktap/io/_hook.h: what the selector's compiled wait (_poll.c's wait) asks of a hook.
 *
 * A hook answers some readinesses itself, in the wait, without the interpreter lock:
 * a Direct (_poll.c) receives a large payload into its place; a transport's own (the
 * NBD server's Desk, transport/nbd/_handshake.c) accepts clients and answers their
 * handshakes. Every hook is an instance of a subtype of blktap.io._poll.Hook, whose
 * object starts with `struct hook` and whose `ops` the subtype's constructor sets.
 * Another extension reaches Hook through the capsule HOOK_CAPSULE: a PyTypeObject *,
 * to make its own type a subtype of (tp_base) before PyType_Ready.
 *
 * The wait calls ops->take for each event, in the order the hooks were given, until one
 * owns it:
 *
 *   int take(struct hook *self, int epfd, struct epoll_event *event, int *progressed)
 *
 * - returns HOOK_NOT_MINE when the event's descriptor is not the hook's;
 * - HOOK_TAKEN when the hook answered it and the loop need not see it;
 * - HOOK_REPORT when the loop must see `*event`, which the hook may have changed (its
 *   mask, or its descriptor: to one the loop watches, to call Python for what the hook
 *   leaves to it).
 *
 * `epfd` is the loop's epoll instance, where a hook may add descriptors of its own (the
 * loop never sees their events: they are the hook's) and must remove them before it
 * hands them to the loop. A hook sets `*progressed` when the event moved something
 * along (bytes received): the wait then polls its window again, for the next part.
 * Everything runs on the loop's thread, so a hook's Python methods and its take never
 * run at once; take must not touch Python objects.
 */
#ifndef BLKTAP_IO_HOOK_H
#define BLKTAP_IO_HOOK_H

#include <Python.h>
#include <sys/epoll.h>

#define HOOK_CAPSULE "blktap.io._poll.hook_type"

enum { HOOK_NOT_MINE = -1, HOOK_TAKEN = 0, HOOK_REPORT = 1 };

struct hook;

struct hook_ops {
    int (*take)(struct hook *self, int epfd, struct epoll_event *event, int *progressed);
};

struct hook {
    PyObject_HEAD
    const struct hook_ops *ops;  /* NULL until the subtype's constructor set it */
};

#endif
