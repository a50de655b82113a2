/* The event loop's poll before it sleeps (io/polling.py).
 *
 * spin(epfd, seconds, maxevents) -> (events, spent): asks the epoll instance again and
 * again, with a zero timeout, until it reports something or `seconds` have passed.
 * `events` is what it reported, a list of (fd, epoll mask) pairs as select.epoll.poll
 * gives them (at most `maxevents`, and at most MAX_EVENTS: asyncio registers its
 * descriptors level-triggered, so what did not fit is reported again next time); an
 * empty list when the time ran out; None when epoll_wait failed, for the selector's
 * own call to meet the error. `spent` is how long it took (seconds). Handing the events
 * over saves the selector a second epoll_wait for what the poll has just seen: a
 * system call per turn of the loop, on every request the poll catches.
 *
 * Why compiled: the poll must not hold the interpreter lock. Other threads (I/O threads,
 * a library's completion thread) need it to hand their results to the loop, which they
 * do by waking the loop's self-pipe; a loop polling in Python would take the lock back
 * after every zero-timeout call, keep them waiting until its window ran out, and then
 * pay the very wake-up it polled to avoid. Here the lock is released once for the whole
 * window, and a completion made meanwhile ends the poll.
 *
 * Between two calls the thread yields its CPU: a task woken on this CPU (often the
 * client the loop has just answered) runs at once instead of waiting for the window.
 *
 * wait(epfd, window, timeout, maxevents, hooks) -> (events, spent, slept, waited): the
 * same poll, then a sleep in epoll_wait up to `timeout` (negative: no limit), for a loop
 * with hooks that answer some readinesses themselves (_hook.h says what a hook does;
 * Hook is their base type, exported to other extensions through a capsule). The hook
 * here is Direct: the rest of a message to go from its socket straight into its place
 * (a large write's payload into the slot it is issued from, transport/sockio.py's
 * receive_direct). A readiness of such a socket is
 * answered here, by a recv into the place, and the wait goes on while the place is not
 * full: the loop is not woken for each of the chunks a sender's socket buffer cuts a
 * payload into (five or six for 1 MiB over a UNIX socket), only once it is all there,
 * or the stream ends or breaks, or another descriptor is ready. Every such chunk spins
 * the window again: the next comes as soon as the sender has refilled its buffer.
 * `slept` says whether it slept at all, `waited` how long its last sleep was (for the
 * window's adaptation). Like spin, it returns None for events where epoll_wait failed
 * (an interrupted wait is an empty list: the loop comes back, its signals are handled).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>

#include "_hook.h"

static double
elapsed(const struct timespec *since)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - since->tv_sec) + (now.tv_nsec - since->tv_nsec) * 1e-9;
}

#define MAX_EVENTS 256

/* The epoll instance and the most events asked for, as spin() and wait() take them: 0,
 * or -1 with an exception set. */
static int
epoll_arguments(PyObject *epfd_arg, PyObject *maxevents_arg, int *epfd, int *maxevents)
{
    long fd = PyLong_AsLong(epfd_arg);
    if (fd == -1 && PyErr_Occurred())
        return -1;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "not a file descriptor");
        return -1;
    }
    long wanted = PyLong_AsLong(maxevents_arg);
    if (wanted == -1 && PyErr_Occurred())
        return -1;
    if (wanted < 1) {
        PyErr_SetString(PyExc_ValueError, "maxevents must be at least 1");
        return -1;
    }
    *epfd = (int)fd;
    *maxevents = wanted > MAX_EVENTS ? MAX_EVENTS : (int)wanted;
    return 0;
}

/* The events as select.epoll.poll gives them: a list of (fd, mask) pairs. */
static PyObject *
event_list(const struct epoll_event *events, int count)
{
    PyObject *list = PyList_New(count);
    if (list == NULL)
        return NULL;
    for (int i = 0; i < count; i++) {
        PyObject *pair = Py_BuildValue("(iI)", events[i].data.fd, events[i].events);
        if (pair == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, pair);
    }
    return list;
}

static PyObject *
spin(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "spin(epfd, seconds, maxevents)");
        return NULL;
    }
    int epfd, maxevents;
    if (epoll_arguments(args[0], args[2], &epfd, &maxevents) < 0)
        return NULL;
    double window = PyFloat_AsDouble(args[1]);
    if (window == -1.0 && PyErr_Occurred())
        return NULL;
    struct epoll_event events[MAX_EVENTS];
    struct timespec start;
    int got = 0;
    double spent = 0.0;
    Py_BEGIN_ALLOW_THREADS
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        got = epoll_wait(epfd, events, maxevents, 0);
        if (got != 0)
            break;
        spent = elapsed(&start);
        if (spent >= window)
            break;
        sched_yield();
    }
    if (got != 0)
        spent = elapsed(&start);
    Py_END_ALLOW_THREADS
    if (got < 0)
        return Py_BuildValue("(Od)", Py_None, spent);
    PyObject *list = event_list(events, got);
    if (list == NULL)
        return NULL;
    return Py_BuildValue("(Nd)", list, spent);
}

/* The base of every hook (_hook.h): not made from Python, only subclassed in C. */
static PyTypeObject HookType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "blktap.io._poll.Hook",
    .tp_doc = "What the selector's wait() calls for the readinesses it answers itself "
              "(io/_hook.h); made only by the compiled subtypes (Direct, ...).",
    .tp_basicsize = sizeof(struct hook),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
};

/* A receive wait() does itself: the rest of a message, from socket `fd` into `place`
 * (held while the Direct is, until release()), `pos` bytes of it there so far. `error`
 * is the errno of a receive that failed here (0: none), for the owner to report, since
 * the socket will not tell it twice. */
typedef struct {
    struct hook hook;
    int fd;
    int error;
    Py_ssize_t pos;
    Py_buffer place;  /* place.obj is NULL once released */
} Direct;

static int direct_take(struct hook *self, int epfd, struct epoll_event *event,
                       int *progressed);
static const struct hook_ops direct_ops = {direct_take};

static int
direct_init(Direct *self, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"fd", "place", NULL};
    int fd;
    PyObject *place;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iO:Direct", keywords, &fd, &place))
        return -1;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "not a file descriptor");
        return -1;
    }
    if (self->place.obj != NULL)
        PyBuffer_Release(&self->place);
    if (PyObject_GetBuffer(place, &self->place, PyBUF_WRITABLE) < 0)
        return -1;
    self->fd = fd;
    self->error = 0;
    self->pos = 0;
    self->hook.ops = &direct_ops;
    return 0;
}

static void
direct_dealloc(Direct *self)
{
    if (self->place.obj != NULL)
        PyBuffer_Release(&self->place);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
direct_release(Direct *self, PyObject *Py_UNUSED(ignored))
{
    if (self->place.obj != NULL)
        PyBuffer_Release(&self->place);
    self->hook.ops = NULL;  /* (wait() refuses it from now on) */
    Py_RETURN_NONE;
}

static PyObject *
direct_get_pos(Direct *self, void *closure)
{
    return PyLong_FromSsize_t(self->pos);
}

static int
direct_set_pos(Direct *self, PyObject *value, void *closure)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "pos cannot be deleted");
        return -1;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(value);
    if (pos == -1 && PyErr_Occurred())
        return -1;
    if (pos < 0 || pos > self->place.len) {
        PyErr_SetString(PyExc_ValueError, "pos is outside the place");
        return -1;
    }
    self->pos = pos;
    return 0;
}

static PyObject *
direct_get_error(Direct *self, void *closure)
{
    return PyLong_FromLong(self->error);
}

static PyObject *
direct_get_length(Direct *self, void *closure)
{
    return PyLong_FromSsize_t(self->place.obj != NULL ? self->place.len : 0);
}

static PyMethodDef direct_methods[] = {
    {"release", (PyCFunction)direct_release, METH_NOARGS,
     "Let go of the place (wait() refuses a released Direct)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef direct_getset[] = {
    {"pos", (getter)direct_get_pos, (setter)direct_set_pos,
     "How many bytes of the place are filled.", NULL},
    {"error", (getter)direct_get_error, NULL,
     "The errno of a receive that failed in wait() (0: none).", NULL},
    {"length", (getter)direct_get_length, NULL, "The place's size (0 once released).",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject DirectType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "blktap.io._poll.Direct",
    .tp_doc = "Direct(fd, place): the rest of a message for wait() to receive from "
              "socket fd straight into place (a writable buffer).",
    .tp_basicsize = sizeof(Direct),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_base = &HookType,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)direct_init,
    .tp_dealloc = (destructor)direct_dealloc,
    .tp_methods = direct_methods,
    .tp_getset = direct_getset,
};

/* What wait() does with a readiness of a Direct's socket: receive into the place. The
 * mask left to report to the loop: without EPOLLIN while the place is not full and the
 * stream goes on (nothing for the loop), whole otherwise (full, the end of the stream,
 * an error, a hang-up: the loop's receive takes it from there). */
static uint32_t
receive_chunk(Direct *d, uint32_t mask, int *progressed)
{
    if (!(mask & EPOLLIN) || d->pos >= d->place.len)
        return mask;
    ssize_t got = recv(d->fd, (char *)d->place.buf + d->pos, (size_t)(d->place.len - d->pos),
                       MSG_DONTWAIT);
    if (got > 0) {
        d->pos += got;
        *progressed = 1;
    } else if (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        d->error = errno;
        return mask;
    } else if (got == 0) {
        return mask;  /* the end of the stream: the loop's own receive sees it too */
    }
    if (d->pos < d->place.len && !(mask & (EPOLLERR | EPOLLHUP)))
        mask &= ~(uint32_t)EPOLLIN;
    return mask;
}

static int
direct_take(struct hook *self, int epfd, struct epoll_event *event, int *progressed)
{
    Direct *d = (Direct *)self;
    if (d->fd != event->data.fd)
        return HOOK_NOT_MINE;
    event->events = receive_chunk(d, event->events, progressed);
    return event->events ? HOOK_REPORT : HOOK_TAKEN;
}

static PyObject *
wait_events(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "wait(epfd, window, timeout, maxevents, hooks)");
        return NULL;
    }
    int epfd, maxevents;
    if (epoll_arguments(args[0], args[3], &epfd, &maxevents) < 0)
        return NULL;
    double window = PyFloat_AsDouble(args[1]);
    if (window == -1.0 && PyErr_Occurred())
        return NULL;
    double timeout = PyFloat_AsDouble(args[2]);
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    if (window < 0.0)
        window = 0.0;
    if (timeout >= 0.0 && window > timeout)
        window = timeout;
    PyObject *seq = PySequence_Fast(args[4], "hooks must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    struct hook **hooks = PyMem_Malloc(sizeof(struct hook *) * (size_t)(count ? count : 1));
    if (hooks == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        if (!PyObject_TypeCheck(items[i], &HookType) || ((struct hook *)items[i])->ops == NULL) {
            PyErr_SetString(PyExc_TypeError, "hooks must hold hooks set up (a Direct not "
                            "released, ...)");
            PyMem_Free(hooks);
            Py_DECREF(seq);
            return NULL;
        }
        hooks[i] = (struct hook *)items[i];  /* (held by seq, which holds them until the end) */
    }

    struct epoll_event events[MAX_EVENTS];
    struct epoll_event kept[MAX_EVENTS];
    int nkept = 0, failed = 0, slept = 0;
    double spent = 0.0, waited = 0.0;
    Py_BEGIN_ALLOW_THREADS
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    double spin_until = window;
    for (;;) {
        double now = elapsed(&start);
        int ms = 0;
        if (now >= spin_until) {
            if (timeout < 0.0) {
                ms = -1;
            } else {
                double left = timeout - now;
                ms = left <= 0.0 ? 0 : left * 1e3 >= INT_MAX ? INT_MAX : (int)ceil(left * 1e3);
            }
        }
        struct timespec before;
        if (ms != 0)
            clock_gettime(CLOCK_MONOTONIC, &before);
        int got = epoll_wait(epfd, events, maxevents, ms);
        if (ms != 0) {
            slept = 1;
            waited = elapsed(&before);
        }
        if (got < 0) {
            failed = errno != EINTR;
            break;
        }
        int progressed = 0;
        for (int i = 0; i < got; i++) {
            struct epoll_event event = events[i];
            int taken = HOOK_NOT_MINE;
            for (Py_ssize_t j = 0; j < count && taken == HOOK_NOT_MINE; j++)
                taken = hooks[j]->ops->take(hooks[j], epfd, &event, &progressed);
            if (taken == HOOK_TAKEN || !event.events)
                continue;
            int seen = 0;  /* (two events a hook reported on the same descriptor) */
            for (int k = 0; k < nkept && !seen; k++) {
                if (kept[k].data.fd == event.data.fd) {
                    kept[k].events |= event.events;
                    seen = 1;
                }
            }
            if (!seen)
                kept[nkept++] = event;
        }
        if (nkept)
            break;
        now = elapsed(&start);
        if (timeout >= 0.0 && now >= timeout)
            break;  /* the time is up (a timer is due) */
        if (got == 0 && ms != 0)
            break;  /* slept to the timeout */
        if (progressed)  /* a chunk came: the next soon follows */
            spin_until = timeout >= 0.0 && now + window > timeout ? timeout : now + window;
        else if (got == 0)
            sched_yield();
    }
    spent = elapsed(&start);
    Py_END_ALLOW_THREADS
    PyMem_Free(hooks);
    Py_DECREF(seq);
    if (failed)
        return Py_BuildValue("(OdOd)", Py_None, spent, slept ? Py_True : Py_False, waited);
    PyObject *list = event_list(kept, nkept);
    if (list == NULL)
        return NULL;
    return Py_BuildValue("(NdOd)", list, spent, slept ? Py_True : Py_False, waited);
}

static PyMethodDef methods[] = {
    {"spin", (PyCFunction)(void (*)(void))spin, METH_FASTCALL,
     "spin(epfd, seconds, maxevents) -> (events, spent): poll an epoll instance until it "
     "reports something or the time is up, without the interpreter lock."},
    {"wait", (PyCFunction)(void (*)(void))wait_events, METH_FASTCALL,
     "wait(epfd, window, timeout, maxevents, hooks) -> (events, spent, slept, waited): "
     "poll for the window, then sleep up to timeout (negative: no limit), the hooks "
     "(a Direct receiving its chunks, ...) answering their readinesses meanwhile "
     "without waking the loop."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_poll",
    .m_doc = "The event loop's poll before it sleeps (io/polling.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__poll(void)
{
    if (PyType_Ready(&HookType) < 0 || PyType_Ready(&DirectType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *capsule = PyCapsule_New(&HookType, HOOK_CAPSULE, NULL);
    if (capsule == NULL || PyModule_AddObject(m, "hook_type", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&HookType);
    if (PyModule_AddObject(m, "Hook", (PyObject *)&HookType) < 0) {
        Py_DECREF(&HookType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&DirectType);
    if (PyModule_AddObject(m, "Direct", (PyObject *)&DirectType) < 0) {
        Py_DECREF(&DirectType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
