/* The event loop's poll before it sleeps (io/polling.py), without the interpreter lock.
 *
 * spin(epfd, seconds) -> (ready, spent): asks the epoll instance again and again, with a
 * zero timeout, until it reports something or `seconds` have passed; `ready` says which,
 * `spent` is how long it took (seconds). Nothing is consumed: the selector's own
 * epoll_wait then reports the same events (asyncio registers its descriptors
 * level-triggered), so an error here is reported as "ready" and the selector meets it.
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

static PyObject *
spin(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "spin(epfd, seconds)");
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
    struct epoll_event event;
    struct timespec start;
    int got = 0;
    double spent = 0.0;
    Py_BEGIN_ALLOW_THREADS
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        got = epoll_wait(epfd, &event, 1, 0);
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
    return Py_BuildValue("(Od)", got != 0 ? Py_True : Py_False, spent);
}

static PyMethodDef methods[] = {
    {"spin", (PyCFunction)(void (*)(void))spin, METH_FASTCALL,
     "spin(epfd, seconds) -> (ready, spent): poll an epoll instance until it reports "
     "something or the time is up, without the interpreter lock."},
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
