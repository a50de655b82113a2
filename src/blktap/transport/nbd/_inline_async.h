/*
 * The NBD transport's compiled pass for a disk whose requests complete later (a Ceph
 * image through librbd's C calls): included by _inline.c, one compilation unit.
 *
 * nbd_pump serves what the kernel does at once; a disk on a cluster answers a request
 * after a network round trip, so here the pass is split in two. AsyncPass.submit takes
 * the plain READ and WRITE requests at the front of a connection's receive buffer and
 * issues each to librbd from one of the pass's slots (a write's payload copied into the
 * slot's buffer, a read's reply header built in front of where librbd puts the data),
 * with the slot as the completion's argument. The driver reaps through reap() (on the
 * loop, when librbd signals its eventfd): the completions with an argument are the
 * passes' slots, taken back there, and each pass with finished slots then calls its
 * connection back once, which sends their replies (AsyncPass.flush) or has them queued
 * behind what is queued; the others are the driver's own, handed back to it. A pass
 * linked to its connection's socket (_inline_link.h) does all of this in the
 * selector's wait instead, and sends its replies as they complete.
 * A write whose payload is not all received yet (a large one) is received by the Python
 * reader straight into a slot lent for it (reserve), then issued from there
 * (issue_write): no copy, and no pool buffer, VBD request or task either.
 *
 * As nbd_pump, it never answers an error: a request librbd failed (or read short) is
 * handed back whole to the Python path (flush's "failed"), which retries it through the
 * VBD and answers what it ends with. The driver resolves librbd's calls (ctypes) and
 * gives their addresses in its target; this file needs neither librbd's headers nor a
 * link against it.
 */

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "_hook.h"  /* the selector's wait: a linked pass answers its readinesses there */

/* AsyncTarget's fields, by position (the driver's NamedTuple: tapdisk/driver.py). */
enum { AT_IMAGE, AT_SIZE, AT_WRITES, AT_OPS, AT_EVENTFD, AT_REAP_CALLS, AT_FIELDS };
/* The calls in AsyncTarget.ops, in this order (librbd.h's signatures). */
enum { OP_CREATE_COMPLETION, OP_AIO_READ, OP_AIO_WRITE, OP_RELEASE, OP_COUNT };
/* The calls in AsyncTarget.reap_calls (and reap()'s), in this order. */
enum { RC_POLL_IO_EVENTS, RC_GET_ARG, RC_GET_RETURN_VALUE, RC_RELEASE, RC_COUNT };

typedef int (*create_completion_fn)(void *arg, void *callback, void **completion);
typedef int (*aio_rw_fn)(void *image, uint64_t offset, size_t length, void *buf,
                         void *completion);
typedef void (*release_fn)(void *completion);
typedef int (*poll_io_events_fn)(void *image, void **completions, int count);
typedef void *(*get_arg_fn)(void *completion);
typedef ssize_t (*get_return_value_fn)(void *completion);

/* The librbd calls that take finished completions back (reap(), and a linked pass's
 * answer to the eventfd in the wait). */
struct reap_calls {
    poll_io_events_fn poll_events;
    get_arg_fn get_arg;
    get_return_value_fn get_return_value;
    release_fn release;
};

#define SLOT_FREE 0
#define SLOT_ISSUED 1   /* librbd holds it (and its buffer) */
#define SLOT_READY 2    /* done: its reply waits in its buffer */
#define SLOT_FAILED 3   /* done badly: the Python path's to answer */
#define SLOT_RESERVED 4 /* lent to the Python path to receive a write's payload into */

struct slot;
typedef struct AsyncPass AsyncPass;

struct slot {
    AsyncPass *pass;
    unsigned char *buf;      /* the reply header (reads) and the data */
    size_t cap;
    size_t header;           /* bytes of reply header in front of the data */
    uint64_t offset;
    uint32_t length;
    uint16_t cmd, flags;
    unsigned char handle[8]; /* as the client sent it */
    ssize_t ret;
    double started;          /* when it was issued, then how long it took (seconds) */
    int state;
    int next;                /* the next slot in the done list (-1: the last) */
};

struct link;

struct AsyncPass {
    struct hook hook;        /* (PyObject_HEAD first) the wait's, while linked: _inline_link.h */
    struct slot *slots;
    int nslots;
    int issued;              /* slots librbd holds */
    int done_head, done_tail; /* slots done, in the order they finished */
    size_t held_bytes;       /* capacity of the slots' buffers, at most max_bytes */
    size_t max_bytes;
    PyObject *on_done;       /* the connection's callback: once per batch of completions */
    PyObject *target;        /* the last target seen, and its calls */
    void *image;
    uint64_t size;
    int writes;
    create_completion_fn create_completion;
    aio_rw_fn aio_read, aio_write;
    release_fn release;
    int done_fd;             /* the target's eventfd (-1: none seen yet) */
    struct reap_calls reap;
    /* A reference to itself, held while librbd holds a slot, the pass is linked or it
     * waits to be called back (taken and let go with the interpreter lock only: the
     * wait's hooks run without it). */
    int pinned;
    int pending;             /* on the list of passes to call back (later.passes) */
    struct AsyncPass *touched_next; /* the passes a reap finished slots of */
    int touched;
    struct link *link;       /* the connection served in the wait (NULL: never linked) */
};

/* The monotonic clock in seconds (the VBD's latency histograms' unit). */
static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The addresses of ``count`` librbd calls from the tuple ``calls`` into ``fn``: 0, or -1
 * with TypeError (``wrong``: not a tuple that long) or ValueError (an address of 0). */
static int call_addresses(PyObject *calls, int count, void **fn, const char *wrong)
{
    if (!PyTuple_Check(calls) || PyTuple_GET_SIZE(calls) < count) {
        PyErr_SetString(PyExc_TypeError, wrong);
        return -1;
    }
    for (int i = 0; i < count; i++) {
        fn[i] = PyLong_AsVoidPtr(PyTuple_GET_ITEM(calls, i));
        if (fn[i] == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "a librbd call without an address");
            return -1;
        }
    }
    return 0;
}

static int async_target(AsyncPass *self, PyObject *target)
{
    if (target == self->target)
        return 0;
    if (!PyTuple_Check(target) || PyTuple_GET_SIZE(target) < AT_FIELDS) {
        PyErr_SetString(PyExc_TypeError, "the target must be an AsyncTarget");
        return -1;
    }
    void *fn[OP_COUNT];
    if (call_addresses(PyTuple_GET_ITEM(target, AT_OPS), OP_COUNT, fn,
                       "AsyncTarget.ops must hold the librbd calls") < 0)
        return -1;
    void *reap[RC_COUNT];
    if (call_addresses(PyTuple_GET_ITEM(target, AT_REAP_CALLS), RC_COUNT, reap,
                       "AsyncTarget.reap_calls must hold librbd's four calls") < 0)
        return -1;
    void *image = PyLong_AsVoidPtr(PyTuple_GET_ITEM(target, AT_IMAGE));
    unsigned long long size = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(target, AT_SIZE));
    int writes = PyObject_IsTrue(PyTuple_GET_ITEM(target, AT_WRITES));
    long done_fd = PyLong_AsLong(PyTuple_GET_ITEM(target, AT_EVENTFD));
    if (PyErr_Occurred())
        return -1;
    if (image == NULL) {
        PyErr_SetString(PyExc_ValueError, "the image is closed");
        return -1;
    }
    if (done_fd < 0 || done_fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "the target has no eventfd");
        return -1;
    }
    self->done_fd = (int)done_fd;
    self->reap.poll_events = (poll_io_events_fn)reap[RC_POLL_IO_EVENTS];
    self->reap.get_arg = (get_arg_fn)reap[RC_GET_ARG];
    self->reap.get_return_value = (get_return_value_fn)reap[RC_GET_RETURN_VALUE];
    self->reap.release = (release_fn)reap[RC_RELEASE];
    self->image = image;
    self->size = size;
    self->writes = writes;
    self->create_completion = (create_completion_fn)fn[OP_CREATE_COMPLETION];
    self->aio_read = (aio_rw_fn)fn[OP_AIO_READ];
    self->aio_write = (aio_rw_fn)fn[OP_AIO_WRITE];
    self->release = (release_fn)fn[OP_RELEASE];
    Py_INCREF(target);
    Py_XSETREF(self->target, target);
    return 0;
}

/* A free slot whose buffer holds ``need`` bytes (grown within max_bytes), or NULL. */
static struct slot *free_slot(AsyncPass *self, size_t need)
{
    struct slot *small = NULL;
    for (int i = 0; i < self->nslots; i++) {
        struct slot *s = &self->slots[i];
        if (s->state != SLOT_FREE)
            continue;
        if (s->cap >= need)
            return s;
        if (small == NULL || s->cap > small->cap)
            small = s;
    }
    if (small == NULL || self->held_bytes - small->cap + need > self->max_bytes)
        return NULL;
    unsigned char *buf = realloc(small->buf, need);
    if (buf == NULL)
        return NULL;
    self->held_bytes += need - small->cap;
    small->buf = buf;
    small->cap = need;
    return small;
}

/* The pass's reference to itself (see AsyncPass.pinned), with the interpreter lock. */
static void pin(AsyncPass *self)
{
    if (!self->pinned) {
        Py_INCREF(self);
        self->pinned = 1;
    }
}

static int link_on(const AsyncPass *self);

/* Let the reference go when nothing needs it any more (with the lock; the last
 * reference may go here: nothing touches the pass after). */
static void maybe_unpin(AsyncPass *self)
{
    if (self->pinned && !self->issued && !self->pending && !link_on(self)) {
        self->pinned = 0;
        Py_DECREF(self);
    }
}

/* Issue the slot's request (its fields and, for a write, its payload filled in) to
 * librbd, as issued at time ``at``: 0, or -1 where librbd refuses it (nothing queued,
 * the slot still free or reserved: the Python path issues it again and says why). The
 * pass is pinned (by the caller, or by its link: this runs in the wait too). */
static int issue(AsyncPass *self, struct slot *s, double at)
{
    void *comp = NULL;
    if (self->create_completion(s, NULL, &comp) < 0)
        return -1;
    aio_rw_fn aio = s->cmd == CMD_READ ? self->aio_read : self->aio_write;
    if (aio(self->image, s->offset, s->length, s->buf + s->header, comp) < 0) {
        self->release(comp);  /* refused before queueing: no completion will come */
        return -1;
    }
    s->state = SLOT_ISSUED;
    s->started = at;
    self->issued++;
    return 0;
}

/* Why submit_requests stopped. */
enum {
    STOP_BUDGET,   /* max_requests issued */
    STOP_PARTIAL,  /* the next request is not all here (or nothing is) */
    STOP_PYTHON,   /* the next request is not this pass's to take (or librbd refused it) */
    STOP_FULL,     /* no slot or room free for the next one */
};

/* Issue the requests at rb[*start:end] that the pass takes (see submit's doc) to its
 * target, up to max_requests; *start moves past them, *reads and *writes count them.
 * Writes longer than max_write are the Python path's. Touches no Python object (the
 * wait runs it for a linked pass). */
static int submit_requests(AsyncPass *self, const unsigned char *rb, Py_ssize_t *start,
                           Py_ssize_t end, int structured, long max_requests,
                           uint64_t max_length, uint64_t max_write, long *reads,
                           long *writes)
{
    const size_t read_header = structured ? DATA_CHUNK_SIZE : SIMPLE_REPLY_SIZE;
    const double issued_at = now_seconds();
    Py_ssize_t at = *start;
    int stop = STOP_BUDGET;
    while (*reads + *writes < max_requests) {
        uint32_t cmd;
        uint64_t offset, length;
        Py_ssize_t took = next_request(rb, at, end, self->size, max_length, 0, &cmd,
                                       &offset, &length);
        const unsigned char *req = rb + at;
        if (took == 0) {
            /* a partial request, or one of another kind (an invalid one too) */
            Py_ssize_t avail = end - at;
            stop = STOP_PYTHON;
            if (avail < REQUEST_SIZE
                    || (get32(req) == REQUEST_MAGIC && get16(req + 6) == CMD_WRITE
                        && get32(req + 24) <= max_length && get32(req + 24) <= max_write
                        && (uint64_t)(avail - REQUEST_SIZE) < get32(req + 24)))
                stop = STOP_PARTIAL;
            break;
        }
        uint16_t flags = get16(req + 4);
        if (cmd == CMD_WRITE ? (!self->writes || flags || length > max_write)
                : (flags & ~(CMD_FLAG_FUA | (structured ? CMD_FLAG_DF : 0)))) {
            stop = STOP_PYTHON;  /* FUA writes (a write, then a flush), the rest */
            break;
        }
        size_t header = cmd == CMD_READ ? read_header : 0;
        struct slot *s = free_slot(self, header + length);
        if (s == NULL) {
            stop = STOP_FULL;
            break;
        }
        s->header = header;
        s->offset = offset;
        s->length = (uint32_t)length;
        s->cmd = (uint16_t)cmd;
        s->flags = flags;
        memcpy(s->handle, req + 8, 8);
        if (cmd == CMD_WRITE)
            memcpy(s->buf, req + REQUEST_SIZE, length);
        else if (structured)
            put_data_chunk(s->buf, s->handle, offset, length);
        else
            put_simple_reply(s->buf, s->handle);
        if (issue(self, s, issued_at) < 0) {
            stop = STOP_PYTHON;
            break;
        }
        at += took;
        if (cmd == CMD_READ)
            (*reads)++;
        else
            (*writes)++;
    }
    *start = at;
    return stop;
}

PyDoc_STRVAR(async_submit_doc,
"submit(rbuf, start, end, target, structured, max_requests, max_length)\n"
"--\n\n"
"Issue the READ and WRITE requests at rbuf[start:end] that this pass may take (whole,\n"
"of whole sectors inside the disk, at most ``max_length`` bytes, no flag but FUA and DF\n"
"on a read, writes only where ``target.writes``), up to ``max_requests``, to the disk\n"
"``target`` (an AsyncTarget), while a slot and room for its bytes are free. Returns\n"
"(start, reads, writes): the position of the first request not taken, and how many\n"
"were issued.");

static PyObject *async_submit(AsyncPass *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "submit takes 7 arguments");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    Py_ssize_t end = PyLong_AsSsize_t(args[2]);
    int structured = PyObject_IsTrue(args[4]);
    long max_requests = PyLong_AsLong(args[5]);
    unsigned long max_length = PyLong_AsUnsignedLong(args[6]);
    if (PyErr_Occurred() || async_target(self, args[3]) < 0)
        return NULL;
    Py_buffer rbuf;
    if (PyObject_GetBuffer(args[0], &rbuf, PyBUF_SIMPLE) < 0)
        return NULL;
    if (start < 0 || end < start || end > rbuf.len) {
        PyBuffer_Release(&rbuf);
        PyErr_SetString(PyExc_ValueError, "start and end must lie within rbuf");
        return NULL;
    }
    long reads = 0, writes = 0;
    pin(self);
    submit_requests(self, rbuf.buf, &start, end, structured, max_requests, max_length,
                    max_length, &reads, &writes);
    PyBuffer_Release(&rbuf);
    PyObject *out = Py_BuildValue("nll", start, reads, writes);
    maybe_unpin(self);
    return out;
}

PyDoc_STRVAR(async_reserve_doc,
"reserve(length)\n"
"--\n\n"
"A slot for a write whose payload is still to be received: (index, memoryview of\n"
"``length`` bytes in the slot's buffer), or None when no slot or room is free. The\n"
"view is valid until the slot is issued or given back (issue_write, unreserve).");

static PyObject *async_reserve(AsyncPass *self, PyObject *arg)
{
    Py_ssize_t length = PyLong_AsSsize_t(arg);
    if (length == -1 && PyErr_Occurred())
        return NULL;
    if (length <= 0 || length > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "a write of 1 byte to 4 GiB");
        return NULL;
    }
    struct slot *s = free_slot(self, (size_t)length);
    if (s == NULL)
        Py_RETURN_NONE;
    PyObject *view = PyMemoryView_FromMemory((char *)s->buf, length, PyBUF_WRITE);
    if (view == NULL)
        return NULL;
    s->state = SLOT_RESERVED;
    s->length = (uint32_t)length;
    return Py_BuildValue("nN", (Py_ssize_t)(s - self->slots), view);
}

static struct slot *reserved_slot(AsyncPass *self, PyObject *arg)
{
    Py_ssize_t index = PyLong_AsSsize_t(arg);
    if (index == -1 && PyErr_Occurred())
        return NULL;
    if (index < 0 || index >= self->nslots || self->slots[index].state != SLOT_RESERVED) {
        PyErr_SetString(PyExc_ValueError, "not a reserved slot");
        return NULL;
    }
    return &self->slots[index];
}

PyDoc_STRVAR(async_issue_write_doc,
"issue_write(index, handle, offset, target)\n"
"--\n\n"
"Issue the write whose payload fills the reserved slot ``index`` (the request's handle\n"
"and offset; whole sectors inside the disk) to ``target``, as submit issues one: True;\n"
"False where the target takes no writes or librbd refuses it (the slot stays reserved:\n"
"the caller copies the payload out for the Python path, then gives the slot back).");

static PyObject *async_issue_write(AsyncPass *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "issue_write takes 4 arguments");
        return NULL;
    }
    struct slot *s = reserved_slot(self, args[0]);
    if (s == NULL)
        return NULL;
    unsigned long long handle = PyLong_AsUnsignedLongLong(args[1]);
    unsigned long long offset = PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred() || async_target(self, args[3]) < 0)
        return NULL;
    if (!self->writes || ((offset | s->length) & SECTOR_MASK) || offset > self->size
            || s->length > self->size - offset)
        Py_RETURN_FALSE;
    s->header = 0;
    s->offset = offset;
    s->cmd = CMD_WRITE;
    s->flags = 0;
    put64(s->handle, handle);
    pin(self);
    int issued = issue(self, s, now_seconds()) == 0;
    maybe_unpin(self);
    return PyBool_FromLong(issued);
}

static PyObject *async_unreserve(AsyncPass *self, PyObject *arg)
{
    struct slot *s = reserved_slot(self, arg);
    if (s == NULL)
        return NULL;
    s->state = SLOT_FREE;
    Py_RETURN_NONE;
}

/* Completions asked for at a time (more are asked for while a batch comes back full). */
#define REAP_BATCH 32

/* Passes whose on_done the Python side must call (slots done that no link answered, a
 * link handed back, counts to fold into the VBD's), and completions of the driver's own
 * requests that a linked pass's hook reaped in the wait: kept here, without the
 * interpreter lock, until reap() (with it) hands them over. The wait's hooks and reap()
 * run on the loop's thread; the mutex is for a process with loops on several threads. */
struct stashed {
    void *image;
    void *completion;
    ssize_t ret;
};

static struct {
    pthread_mutex_t lock;
    AsyncPass **passes;
    int npasses, passes_cap;
    struct stashed *stash;
    int nstash, stash_cap;
    long strays;  /* completions a hook found with an argument that was no slot in flight */
} later = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* Grow an array of ``*cap`` items of ``size`` bytes to hold one more: 0, or -1. */
static int room_for_one(void **items, int count, int *cap, size_t size)
{
    if (count < *cap)
        return 0;
    int grown = *cap ? *cap * 2 : 16;
    void *more = realloc(*items, size * (size_t)grown);
    if (more == NULL)
        return -1;
    *items = more;
    *cap = grown;
    return 0;
}

/* Have the Python side call the pass back (once; it is pinned: a slot of it was in
 * flight, or it is linked). Out of memory, it is called back with its next completion. */
static void note_pending(AsyncPass *pass)
{
    if (pass->pending)
        return;
    pthread_mutex_lock(&later.lock);
    if (room_for_one((void **)&later.passes, later.npasses, &later.passes_cap,
                     sizeof(AsyncPass *)) == 0) {
        later.passes[later.npasses++] = pass;
        pass->pending = 1;
    }
    pthread_mutex_unlock(&later.lock);
}

/* Keep a completion of the driver's own for reap(): 0, or -1 (no memory: it is lost,
 * and the driver's request times out). */
static int stash_completion(void *image, void *completion, ssize_t ret)
{
    int rc = -1;
    pthread_mutex_lock(&later.lock);
    if (room_for_one((void **)&later.stash, later.nstash, &later.stash_cap,
                     sizeof(struct stashed)) == 0) {
        later.stash[later.nstash++] = (struct stashed){image, completion, ret};
        rc = 0;
    }
    pthread_mutex_unlock(&later.lock);
    return rc;
}

static int later_waiting(void)
{
    pthread_mutex_lock(&later.lock);
    int waiting = later.npasses + later.nstash;
    pthread_mutex_unlock(&later.lock);
    return waiting;
}

/* A slot librbd finished: on its pass's done list, in the order they finish, and the
 * pass chained on *touched (once). 0, or -1 for an argument that is no slot in flight
 * (left alone). */
static int finish_slot(struct slot *s, ssize_t ret, double finished_at, AsyncPass **touched)
{
    if (s->state != SLOT_ISSUED)
        return -1;
    AsyncPass *pass = s->pass;
    s->ret = ret;
    s->started = finished_at - s->started;  /* from now on: how long it took */
    s->state = ret < 0 || (s->cmd == CMD_READ && ret != s->length) ? SLOT_FAILED
               : SLOT_READY;
    s->next = -1;
    int index = (int)(s - pass->slots);
    if (pass->done_tail < 0)
        pass->done_head = index;
    else
        pass->slots[pass->done_tail].next = index;
    pass->done_tail = index;
    pass->issued--;  /* (still pinned: let go by the Python side, with the lock) */
    if (!pass->touched) {
        pass->touched = 1;
        pass->touched_next = *touched;
        *touched = pass;
    }
    return 0;
}

/* What becomes of a completion without an argument (the driver's own request). */
typedef int (*other_fn)(void *ctx, void *image, void *completion, ssize_t ret);

/* Take every finished completion of ``image`` and release it: slots onto their pass's
 * done list (the passes chained on *touched), the others to ``other``. *strays counts
 * arguments that are no slot in flight. Returns 0, or librbd's negative errno (the
 * completions taken until then are handled). No Python object is touched here. */
static int reap_completions(void *image, const struct reap_calls *rc, AsyncPass **touched,
                            long *strays, other_fn other, void *ctx)
{
    const double finished_at = now_seconds();
    void *done[REAP_BATCH];
    int n;
    do {
        n = rc->poll_events(image, done, REAP_BATCH);
        if (n < 0)
            return n;
        for (int i = 0; i < n; i++) {
            void *completion = done[i];
            void *arg = rc->get_arg(completion);
            ssize_t ret = rc->get_return_value(completion);
            rc->release(completion);
            if (arg != NULL) {
                if (finish_slot(arg, ret, finished_at, touched) < 0)
                    (*strays)++;
            } else {
                other(ctx, image, completion, ret);
            }
        }
    } while (n == REAP_BATCH);
    return 0;
}

static int link_answers(const AsyncPass *pass);
static void link_answer(AsyncPass *pass);

/* The passes a reap touched: a linked one answers its done slots itself, the others
 * wait for the Python side's call back. */
static void answer_touched(AsyncPass *touched)
{
    while (touched != NULL) {
        AsyncPass *pass = touched;
        touched = pass->touched_next;
        pass->touched = 0;
        pass->touched_next = NULL;
        if (link_answers(pass))
            link_answer(pass);
        else
            note_pending(pass);
    }
}

/* Call back every pass waiting for it (a callback's exception is reported, and the
 * others are still called); keeps any exception already set. With the lock. */
static void call_back_pending(void)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    for (;;) {
        pthread_mutex_lock(&later.lock);
        AsyncPass *pass = later.npasses ? later.passes[--later.npasses] : NULL;
        pthread_mutex_unlock(&later.lock);
        if (pass == NULL)
            break;
        pass->pending = 0;
        PyObject *on_done = pass->on_done;
        if (on_done != NULL && on_done != Py_None) {
            Py_INCREF(on_done);
            PyObject *r = PyObject_CallNoArgs(on_done);
            if (r == NULL)  /* a transport's bug: the other passes are still called */
                PyErr_WriteUnraisable(on_done);
            Py_XDECREF(r);
            Py_DECREF(on_done);
        }
        maybe_unpin(pass);
    }
    PyErr_Restore(type, value, traceback);
}

static int to_list(void *ctx, void *image, void *completion, ssize_t ret)
{
    (void)image;
    PyObject *item = Py_BuildValue("(Nn)", PyLong_FromVoidPtr(completion), ret);
    int rc = item == NULL ? -1 : PyList_Append((PyObject *)ctx, item);
    Py_XDECREF(item);
    if (rc < 0)  /* (out of memory: the driver's request times out) */
        PyErr_Clear();
    return rc;
}

PyDoc_STRVAR(async_reap_doc,
"reap(calls, image, eventfd)\n"
"--\n\n"
"What the driver does when librbd signals its eventfd: clear the eventfd's count (a\n"
"completion landing meanwhile signals again), then take every finished completion of\n"
"``image`` (its address) and release it. ``calls`` are the addresses of\n"
"rbd_poll_io_events, rbd_aio_get_arg, rbd_aio_get_return_value and rbd_aio_release.\n"
"A completion with an argument is a slot of a pass here: taken back, and answered by\n"
"its pass's link when it has one, else its pass is called back (on_done) once; so is\n"
"every pass a linked pass's hook left for the Python side. Returns ``(ours, strays)``:\n"
"``ours`` the (completion, return value) of those without one (the driver's own\n"
"requests, with those the hooks reaped meanwhile), and ``strays`` how many had an\n"
"argument that was no slot in flight (a bug; left alone).");

static PyObject *async_reap(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "reap takes (calls, image, eventfd)");
        return NULL;
    }
    void *fn[RC_COUNT];
    if (call_addresses(args[0], RC_COUNT, fn, "reap's calls must hold librbd's four calls")
        < 0)
        return NULL;
    void *image = PyLong_AsVoidPtr(args[1]);
    long eventfd = PyLong_AsLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (image == NULL) {
        PyErr_SetString(PyExc_ValueError, "the image is closed");
        return NULL;
    }
    if (eventfd < 0 || eventfd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "no eventfd");
        return NULL;
    }
    uint64_t count;
    if (read((int)eventfd, &count, sizeof count) < 0 && errno != EAGAIN && errno != EINTR)
        return PyErr_SetFromErrno(PyExc_OSError);
    struct reap_calls rc = {
        (poll_io_events_fn)fn[RC_POLL_IO_EVENTS], (get_arg_fn)fn[RC_GET_ARG],
        (get_return_value_fn)fn[RC_GET_RETURN_VALUE], (release_fn)fn[RC_RELEASE]};
    PyObject *ours = PyList_New(0);
    if (ours == NULL)
        return NULL;
    /* the driver's completions a hook reaped first, in the order they came */
    pthread_mutex_lock(&later.lock);
    int kept = 0;
    for (int i = 0; i < later.nstash; i++) {
        struct stashed *st = &later.stash[i];
        if (st->image != image)
            later.stash[kept++] = *st;
        else
            to_list(ours, image, st->completion, st->ret);
    }
    later.nstash = kept;
    long strays = later.strays;
    later.strays = 0;
    pthread_mutex_unlock(&later.lock);
    AsyncPass *touched = NULL;
    int n = reap_completions(image, &rc, &touched, &strays, to_list, ours);
    answer_touched(touched);
    call_back_pending();
    if (n < 0) {
        Py_DECREF(ours);
        errno = -n;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return Py_BuildValue("(Nl)", ours, strays);
}

/* Unlink the first done slot. */
static struct slot *pop_done(AsyncPass *self)
{
    if (self->done_head < 0)
        return NULL;
    struct slot *s = &self->slots[self->done_head];
    self->done_head = s->next;
    if (self->done_head < 0)
        self->done_tail = -1;
    return s;
}

static size_t reply_size(const struct slot *s)
{
    return s->cmd == CMD_READ ? s->header + s->length : SIMPLE_REPLY_SIZE;
}

/* A write's reply is built when it is sent (its buffer held the payload until then). */
static const unsigned char *reply_bytes(struct slot *s, unsigned char *write_reply)
{
    if (s->cmd == CMD_READ)
        return s->buf;
    put_simple_reply(write_reply, s->handle);
    return write_reply;
}

#define FLUSH_IOVS 64

/* Copy what follows the first ``skip`` bytes of the ``k`` gathered replies to ``dst``
 * (the bytes the socket did not take, kept to be sent in order). */
static void copy_unsent(const struct iovec *iov, int k, size_t skip, unsigned char *dst)
{
    for (int j = 0; j < k; j++) {
        if (skip >= iov[j].iov_len) {
            skip -= iov[j].iov_len;
            continue;
        }
        memcpy(dst, (unsigned char *)iov[j].iov_base + skip, iov[j].iov_len - skip);
        dst += iov[j].iov_len - skip;
        skip = 0;
    }
}

/* Send the ``k`` gathered replies (``bytes`` in all) on ``sock`` without waiting, unless
 * *full (the socket took nothing more before) or *error are set already: the bytes
 * sent; *full set when the socket is full, *error to the errno that broke it. */
static size_t send_gathered(int sock, const struct iovec *iov, int k, size_t bytes,
                            int *full, int *error)
{
    size_t sent = 0;
    while (!*full && !*error && sent < bytes) {
        /* skip what is sent already */
        struct iovec part[FLUSH_IOVS];
        int m = 0;
        size_t skip = sent;
        for (int j = 0; j < k; j++) {
            if (skip >= iov[j].iov_len) {
                skip -= iov[j].iov_len;
                continue;
            }
            part[m].iov_base = (unsigned char *)iov[j].iov_base + skip;
            part[m].iov_len = iov[j].iov_len - skip;
            skip = 0;
            m++;
        }
        struct msghdr msg = { .msg_iov = part, .msg_iovlen = (size_t)m };
        ssize_t got = sendmsg(sock, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                *full = 1;
            else
                *error = errno;
            break;
        }
        sent += (size_t)got;
    }
    return sent;
}

/* Append ``seconds`` to *list (made at need). */
static int add_time(PyObject **list, double seconds)
{
    if (*list == NULL && (*list = PyList_New(0)) == NULL)
        return -1;
    PyObject *t = PyFloat_FromDouble(seconds);
    if (t == NULL)
        return -1;
    int rc = PyList_Append(*list, t);
    Py_DECREF(t);
    return rc;
}

#include "_inline_link.h"  /* a connection served in the wait */

PyDoc_STRVAR(async_flush_doc,
"flush(sock)\n"
"--\n\n"
"Answer the requests done since the last flush: their replies are sent on ``sock``\n"
"without waiting (-1: none are), and what the socket does not take is returned as\n"
"bytes, for the caller to queue. Returns (reads, read_bytes, writes, write_bytes, rest,\n"
"error, failed, read_times, write_times): the requests answered, the replies not sent\n"
"(None: none), the errno that broke the connection (0: none), the requests that failed,\n"
"each (handle, command, flags, offset, length, payload (a write's) or None, errno), for\n"
"the Python path to serve again, and how long each read and write answered took, from\n"
"its issue to its completion's hand-back, in seconds (None: none). Every slot done is\n"
"free after.");

static PyObject *async_flush(AsyncPass *self, PyObject *sock_arg)
{
    int sock = PyLong_AsLong(sock_arg);
    if (sock == -1 && PyErr_Occurred())
        return NULL;
    unsigned long long reads = 0, read_bytes = 0, writes = 0, write_bytes = 0;
    int error = 0;
    PyObject *failed = NULL, *rest = NULL, *read_times = NULL, *write_times = NULL;
    /* The replies, gathered FLUSH_IOVS at a time; a write's reply header is built in
     * the write's own buffer (free from now on: its payload went to librbd). */
    struct slot *batch[FLUSH_IOVS];
    struct iovec iov[FLUSH_IOVS];
    struct slot *s;
    int socket_full = sock < 0;
    Py_ssize_t rest_len = 0;
    while (self->done_head >= 0) {
        int k = 0;
        size_t bytes = 0;
        while (k < FLUSH_IOVS && (s = pop_done(self)) != NULL) {
            if (s->state == SLOT_FAILED) {
                PyObject *payload = Py_None;
                Py_INCREF(payload);
                if (s->cmd == CMD_WRITE) {
                    Py_DECREF(payload);
                    payload = PyBytes_FromStringAndSize((const char *)s->buf, s->length);
                }
                uint64_t handle;
                memcpy(&handle, s->handle, 8);
                PyObject *item = payload == NULL ? NULL : Py_BuildValue(
                    "KIIKINi", (unsigned long long)be64toh(handle), (unsigned)s->cmd,
                    (unsigned)s->flags, (unsigned long long)s->offset,
                    (unsigned)s->length, payload, (int)(s->ret < 0 ? -s->ret : EIO));
                if (item == NULL || (failed == NULL && (failed = PyList_New(0)) == NULL)
                        || PyList_Append(failed, item) < 0) {
                    Py_XDECREF(item);
                    s->state = SLOT_FREE;
                    goto fail;
                }
                Py_DECREF(item);
                s->state = SLOT_FREE;
                continue;
            }
            if (add_time(s->cmd == CMD_READ ? &read_times : &write_times, s->started) < 0) {
                s->state = SLOT_FREE;  /* (out of memory: these go unanswered) */
                for (int j = 0; j < k; j++)
                    batch[j]->state = SLOT_FREE;
                goto fail;
            }
            if (s->cmd == CMD_READ) {
                reads++;
                read_bytes += s->length;
            } else {
                writes++;
                write_bytes += s->length;
            }
            iov[k].iov_base = (void *)reply_bytes(s, s->buf);
            iov[k].iov_len = reply_size(s);
            bytes += iov[k].iov_len;
            batch[k++] = s;
        }
        size_t sent = send_gathered(sock, iov, k, bytes, &socket_full, &error);
        if (error) {  /* nobody to answer: the slots go back */
            for (int j = 0; j < k; j++)
                batch[j]->state = SLOT_FREE;
            continue;
        }
        if (sent < bytes) {  /* what the socket did not take: into ``rest``, in order */
            size_t left = bytes - sent;
            if (rest == NULL) {
                rest = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)left);
            } else if (_PyBytes_Resize(&rest, rest_len + (Py_ssize_t)left) < 0) {
                rest = NULL;
            }
            if (rest == NULL) {
                for (int j = 0; j < k; j++)
                    batch[j]->state = SLOT_FREE;
                goto fail;
            }
            copy_unsent(iov, k, sent, (unsigned char *)PyBytes_AS_STRING(rest) + rest_len);
            rest_len += (Py_ssize_t)left;
        }
        for (int j = 0; j < k; j++)
            batch[j]->state = SLOT_FREE;
    }
    PyObject *out = Py_BuildValue("KKKKOiOOO", reads, read_bytes, writes, write_bytes,
                                  rest ? rest : Py_None, error, failed ? failed : Py_None,
                                  read_times ? read_times : Py_None,
                                  write_times ? write_times : Py_None);
    Py_XDECREF(rest);
    Py_XDECREF(failed);
    Py_XDECREF(read_times);
    Py_XDECREF(write_times);
    return out;

fail:
    /* What is still on the done list stays there for the next flush. */
    Py_XDECREF(rest);
    Py_XDECREF(failed);
    Py_XDECREF(read_times);
    Py_XDECREF(write_times);
    return NULL;
}

static PyObject *async_get_issued(AsyncPass *self, void *closure)
{
    (void)closure;
    return PyLong_FromLong(self->issued);
}

static PyObject *async_get_reserved(AsyncPass *self, void *closure)
{
    (void)closure;
    long n = 0;
    for (int i = 0; i < self->nslots; i++)
        n += self->slots[i].state == SLOT_RESERVED;
    return PyLong_FromLong(n);
}

static PyObject *async_get_pending(AsyncPass *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->done_head >= 0);
}

static PyObject *async_get_held_bytes(AsyncPass *self, void *closure)
{
    (void)closure;
    return PyLong_FromSize_t(self->held_bytes);
}

static int async_init(AsyncPass *self, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"on_done", "slots", "max_bytes", NULL};
    PyObject *on_done;
    int nslots = 32;
    Py_ssize_t max_bytes = 4 << 20;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|in", keywords, &on_done, &nslots,
                                     &max_bytes))
        return -1;
    if (self->slots != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "an AsyncPass is made once");
        return -1;
    }
    if (nslots < 1 || nslots > 4096 || max_bytes < 0) {
        PyErr_SetString(PyExc_ValueError, "1 to 4096 slots, and max_bytes >= 0");
        return -1;
    }
    self->slots = calloc((size_t)nslots, sizeof(struct slot));
    if (self->slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < nslots; i++)
        self->slots[i].pass = self;
    self->nslots = nslots;
    self->max_bytes = (size_t)max_bytes;
    self->done_head = self->done_tail = -1;
    self->done_fd = -1;
    self->hook.ops = &link_ops;
    Py_INCREF(on_done);
    Py_XSETREF(self->on_done, on_done);
    return 0;
}

static int async_traverse(AsyncPass *self, visitproc visit, void *arg)
{
    Py_VISIT(self->on_done);
    Py_VISIT(self->target);
    return 0;
}

static int async_clear(AsyncPass *self)
{
    Py_CLEAR(self->on_done);
    Py_CLEAR(self->target);
    return 0;
}

static void async_dealloc(AsyncPass *self)
{
    /* Never with a slot in flight, linked or to be called back: it is pinned then. */
    PyObject_GC_UnTrack(self);
    async_clear(self);
    link_free(self->link);
    if (self->slots != NULL) {
        for (int i = 0; i < self->nslots; i++)
            free(self->slots[i].buf);
        free(self->slots);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef async_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))async_submit, METH_FASTCALL, async_submit_doc},
    {"flush", (PyCFunction)async_flush, METH_O, async_flush_doc},
    {"reserve", (PyCFunction)async_reserve, METH_O, async_reserve_doc},
    {"issue_write", (PyCFunction)(void (*)(void))async_issue_write, METH_FASTCALL,
     async_issue_write_doc},
    {"unreserve", (PyCFunction)async_unreserve, METH_O,
     "unreserve(index)\n--\n\nGive back a slot reserve lent (not issued)."},
    {"link", (PyCFunction)(void (*)(void))async_link, METH_FASTCALL, async_link_doc},
    {"unlink", (PyCFunction)async_unlink, METH_NOARGS, async_unlink_doc},
    {"counts", (PyCFunction)async_counts, METH_NOARGS, async_counts_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef async_getset[] = {
    {"issued", (getter)async_get_issued, NULL, "Requests librbd holds.", NULL},
    {"reserved", (getter)async_get_reserved, NULL,
     "Slots lent to receive a payload into (reserve).", NULL},
    {"pending", (getter)async_get_pending, NULL,
     "Whether requests are done and not flushed yet.", NULL},
    {"held_bytes", (getter)async_get_held_bytes, NULL,
     "The bytes of the slots' buffers (at most max_bytes).", NULL},
    {"linked", (getter)async_get_linked, NULL,
     "Whether the wait serves the connection (link).", NULL},
    {"handed_back", (getter)async_get_handed_back, NULL,
     "Whether the link stopped, for the Python side to unlink.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(async_pass_doc,
"AsyncPass(on_done, slots=32, max_bytes=4 MiB)\n"
"--\n\n"
"One connection's compiled pass to a disk whose requests complete later (see\n"
"_inline_async.h): at most ``slots`` requests in flight, in buffers of at most\n"
"``max_bytes`` together. ``on_done()`` is called once per batch of completions that\n"
"are the Python side's (and when a link hands the connection back, or has counts to\n"
"fold). A hook of the selector's wait: link() serves the connection there.");

static PyTypeObject AsyncPassType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "blktap.transport.nbd._inline.AsyncPass",
    .tp_basicsize = sizeof(AsyncPass),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = async_pass_doc,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)async_init,
    .tp_dealloc = (destructor)async_dealloc,
    .tp_traverse = (traverseproc)async_traverse,
    .tp_clear = (inquiry)async_clear,
    .tp_methods = async_methods,
    .tp_getset = async_getset,
};
