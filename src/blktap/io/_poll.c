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
 * client the loop has just answered) runs at once instead of waiting for the window. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <sched.h>
#include <sys/epoll.h>
#include <time.h>

static double
elapsed(const struct timespec *since)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - since->tv_sec) + (now.tv_nsec - since->tv_nsec) * 1e-9;
}

#define MAX_EVENTS 256

static PyObject *
spin(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "spin(epfd, seconds, maxevents)");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "not a file descriptor");
        return NULL;
    }
    int epfd = (int)fd;
    double window = PyFloat_AsDouble(args[1]);
    if (window == -1.0 && PyErr_Occurred())
        return NULL;
    long wanted = PyLong_AsLong(args[2]);
    if (wanted == -1 && PyErr_Occurred())
        return NULL;
    if (wanted < 1) {
        PyErr_SetString(PyExc_ValueError, "maxevents must be at least 1");
        return NULL;
    }
    int maxevents = wanted > MAX_EVENTS ? MAX_EVENTS : (int)wanted;
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
    PyObject *list = PyList_New(got);
    if (list == NULL)
        return NULL;
    for (int i = 0; i < got; i++) {
        PyObject *pair = Py_BuildValue("(iI)", events[i].data.fd, events[i].events);
        if (pair == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, pair);
    }
    return Py_BuildValue("(Nd)", list, spent);
}

static PyMethodDef methods[] = {
    {"spin", (PyCFunction)(void (*)(void))spin, METH_FASTCALL,
     "spin(epfd, seconds, maxevents) -> (events, spent): poll an epoll instance until it "
     "reports something or the time is up, without the interpreter lock."},
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
    return PyModule_Create(&module);
}
