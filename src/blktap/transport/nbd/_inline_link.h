/*
 * A connection served in the selector's wait (included by _inline_async.h): an
 * AsyncPass linked to its client's socket answers both of that connection's
 * readinesses without the interpreter.
 *
 * - The socket's: receive into the link's buffer, issue the plain reads and writes there
 *   (submit_requests, as submit does them); a write whose payload is not all there gets
 *   its slot at once and the rest of its payload is received straight into it.
 * - librbd's eventfd: take the finished completions back (reap_completions) and send
 *   the linked passes' replies (link_answer), each in its slot's order of completion.
 *
 * The Python side links a pass only while the connection has nothing else under way
 * (connection.py: no request of its own in flight, nothing queued to send, nothing
 * received and not taken) and takes the socket back at anything unusual: a request the
 * pass does not take (another command, a flag, one over max_length), the end
 * of the stream or an error, a request librbd failed or refused, a socket too full for
 * a reply. The link is then "handed back": the socket's readiness is turned off in the
 * loop's epoll instance (so that the loop does not read behind the bytes the link holds)
 * and the pass waits for its on_done; the Python side takes what the link received and
 * did not take, and the replies the socket did not take, with unlink(), and serves on
 * from there. Whatever a hook leaves to the Python side (a handed-back link, the counts
 * to fold into the VBD every LINK_SYNC answers, the driver's own completions, slots of
 * passes not linked) reaches it through the eventfd's readiness, reported to the loop:
 * the driver's reaper (reap()) then hands it over.
 *
 * Every field here is the loop thread's: the wait's hooks and the Python methods never
 * run at once.
 */

/* What a link holds of what it received and did not take yet. A write whose payload is
 * not all here is not kept in it: its payload goes straight into its slot (direct). */
#define LINK_BUFFER (64u << 10)
#define LINK_SYNC 256             /* answers between two folds of the counts into the VBD */

enum { LINK_OFF, LINK_ON, LINK_HANDED };
/* Why a link was handed back (unlink() says it, for the log and the tests). */
enum {
    BACK_NONE,      /* not handed back: the Python side took it (a pause, the end) */
    BACK_REQUEST,   /* a request the link does not take, or librbd refused */
    BACK_STREAM,    /* the stream ended or broke */
    BACK_FAILED,    /* librbd failed a request (or read short): the Python path retries */
    BACK_SOCKET_FULL, /* the socket did not take every reply */
    BACK_BROKEN,    /* a reply could not be sent (the errno is unlink()'s) */
};

struct link {
    int state;
    int fd;                   /* the client's socket */
    int epfd;                 /* the loop's epoll instance, where the socket is watched */
    int muted;                /* the socket's readiness is off there (no slot; handed back) */
    int structured;
    uint64_t max_length;
    int reason, error;        /* why it was handed back; the errno of a failed send */
    unsigned char *rbuf;      /* LINK_BUFFER bytes: received, rbuf[rstart:rend] not taken */
    size_t rstart, rend;
    /* A write whose payload is being received into its slot (NULL: none), its header
     * as it came, and the payload's bytes there so far. */
    struct slot *direct;
    unsigned char direct_header[REQUEST_SIZE];
    size_t direct_filled;
    unsigned char *unsent;    /* replies the socket did not take */
    size_t unsent_len;
    /* what the VBD has not been told yet (counts()) */
    unsigned long long issued, reads, read_bytes, writes, write_bytes;
    double *read_times, *write_times;
    int nread_times, read_times_cap, nwrite_times, write_times_cap;
    unsigned answered;        /* since the Python side last folded the counts */
};

static int link_on(const AsyncPass *self)
{
    return self->link != NULL && self->link->state != LINK_OFF;
}

static int link_answers(const AsyncPass *pass)
{
    return pass->link != NULL && pass->link->state == LINK_ON;
}

static void watch_socket(struct link *l, int on)
{
    struct epoll_event ev = {.events = on ? EPOLLIN : 0, .data.fd = l->fd};
    /* (the loop registered it, for reading only: its own registration, as it was) */
    epoll_ctl(l->epfd, EPOLL_CTL_MOD, l->fd, &ev);
    l->muted = !on;
}

static void hand_back(AsyncPass *pass, int reason)
{
    struct link *l = pass->link;
    l->state = LINK_HANDED;
    l->reason = reason;
    if (!l->muted)
        watch_socket(l, 0);
    note_pending(pass);
}

static void keep_time(double **times, int *count, int *cap, double seconds)
{
    if (room_for_one((void **)times, *count, cap, sizeof(double)) == 0)
        (*times)[(*count)++] = seconds;
    /* (no memory: the sample is lost, the request still counted) */
}

/* The write at the front of the buffer (its payload not all here; submit_requests
 * checked all but that): its payload from now on received straight into a slot of its
 * own, what came of it copied there. STOP_PARTIAL (the rest to come), STOP_FULL (no
 * slot or room for it yet: it waits in the buffer) or STOP_PYTHON. */
static int start_direct(AsyncPass *pass)
{
    struct link *l = pass->link;
    const unsigned char *req = l->rbuf + l->rstart;
    uint64_t offset = get64(req + 16);
    uint32_t length = get32(req + 24);
    if (get32(req) != REQUEST_MAGIC || get16(req + 6) != CMD_WRITE || get16(req + 4)
            || !pass->writes || length == 0 || length > l->max_length
            || ((offset | length) & SECTOR_MASK) || offset > pass->size
            || length > pass->size - offset)
        return STOP_PYTHON;
    struct slot *s = free_slot(pass, length);
    if (s == NULL)
        return STOP_FULL;
    size_t came = l->rend - l->rstart - REQUEST_SIZE;  /* (less than length: partial) */
    memcpy(l->direct_header, req, REQUEST_SIZE);
    memcpy(s->buf, req + REQUEST_SIZE, came);
    s->state = SLOT_RESERVED;
    s->header = 0;
    s->offset = offset;
    s->length = length;
    s->cmd = CMD_WRITE;
    s->flags = 0;
    memcpy(s->handle, req + 8, 8);
    l->direct = s;
    l->direct_filled = came;
    l->rstart = l->rend = 0;
    return STOP_PARTIAL;
}

/* Receive the rest of the direct write's payload: 1 once it is all there and issued,
 * 0 while more is to come (or the link was handed back). */
static int receive_direct(AsyncPass *pass)
{
    struct link *l = pass->link;
    struct slot *s = l->direct;
    while (l->direct_filled < s->length) {
        ssize_t got = recv(l->fd, s->buf + l->direct_filled, s->length - l->direct_filled,
                           MSG_DONTWAIT);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        if (got <= 0) {
            hand_back(pass, BACK_STREAM);
            return 0;
        }
        l->direct_filled += (size_t)got;
    }
    if (issue(pass, s, now_seconds()) < 0) {  /* (still reserved: unlink gives it back) */
        hand_back(pass, BACK_REQUEST);
        return 0;
    }
    l->direct = NULL;
    l->issued++;
    return 1;
}

/* Issue what the link's buffer holds: 1 when all it could take was taken (what is left
 * is a partial request), 0 when it stopped for a slot (the socket muted until one frees)
 * or handed the link back. */
static int link_take_buffered(AsyncPass *pass)
{
    struct link *l = pass->link;
    long reads = 0, writes = 0;
    Py_ssize_t start = (Py_ssize_t)l->rstart;
    int stop = submit_requests(pass, l->rbuf, &start, (Py_ssize_t)l->rend, l->structured,
                               LONG_MAX, l->max_length, l->max_length, &reads, &writes);
    l->rstart = (size_t)start;
    l->issued += (unsigned long long)(reads + writes);
    if (stop == STOP_PARTIAL && l->rend - l->rstart >= REQUEST_SIZE)
        stop = start_direct(pass);
    if (stop == STOP_PYTHON || (stop == STOP_FULL && !pass->issued)) {
        /* (with nothing in flight, no slot will free here for it: too large) */
        hand_back(pass, BACK_REQUEST);
        return 0;
    }
    if (stop == STOP_FULL) {
        if (!l->muted)
            watch_socket(l, 0);
        return 0;
    }
    if (l->muted)
        watch_socket(l, 1);
    return 1;
}

/* The socket is readable: receive what it holds and issue it. */
static void link_receive(AsyncPass *pass)
{
    struct link *l = pass->link;
    for (;;) {
        if (l->direct != NULL && !receive_direct(pass))
            return;
        if (l->rstart) {  /* (a partial request, a few bytes, to the front) */
            memmove(l->rbuf, l->rbuf + l->rstart, l->rend - l->rstart);
            l->rend -= l->rstart;
            l->rstart = 0;
        }
        size_t room = LINK_BUFFER - l->rend;
        ssize_t got = recv(l->fd, l->rbuf + l->rend, room, MSG_DONTWAIT);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (got <= 0) {  /* the end, or an error: the Python side meets it in turn */
            hand_back(pass, BACK_STREAM);
            return;
        }
        l->rend += (size_t)got;
        if (!link_take_buffered(pass) || ((size_t)got < room && l->direct == NULL))
            return;
    }
}

/* Send the replies of the pass's done slots (it is linked), count them for the VBD, and
 * issue what waited for a slot. A failed slot (the Python path retries it), a reply the
 * socket does not take or cannot send hands the link back. */
static void link_answer(AsyncPass *pass)
{
    struct link *l = pass->link;
    for (int i = pass->done_head; i >= 0; i = pass->slots[i].next) {
        if (pass->slots[i].state == SLOT_FAILED) {
            hand_back(pass, BACK_FAILED);  /* (unlink, then flush: the Python path) */
            return;
        }
    }
    int full = 0, error = 0;
    struct slot *s;
    while (pass->done_head >= 0) {
        struct slot *batch[FLUSH_IOVS];
        struct iovec iov[FLUSH_IOVS];
        int k = 0;
        size_t bytes = 0;
        while (k < FLUSH_IOVS && (s = pop_done(pass)) != NULL) {
            if (s->cmd == CMD_READ) {
                l->reads++;
                l->read_bytes += s->length;
                keep_time(&l->read_times, &l->nread_times, &l->read_times_cap, s->started);
            } else {
                l->writes++;
                l->write_bytes += s->length;
                keep_time(&l->write_times, &l->nwrite_times, &l->write_times_cap, s->started);
            }
            iov[k].iov_base = (void *)reply_bytes(s, s->buf);
            iov[k].iov_len = reply_size(s);
            bytes += iov[k].iov_len;
            batch[k++] = s;
        }
        l->answered += (unsigned)k;
        size_t sent = send_gathered(l->fd, iov, k, bytes, &full, &error);
        if (!error && sent < bytes) {  /* kept in order, for the Python side to send */
            unsigned char *kept = realloc(l->unsent, l->unsent_len + bytes - sent);
            if (kept == NULL) {
                error = ENOMEM;
            } else {
                l->unsent = kept;
                copy_unsent(iov, k, sent, l->unsent + l->unsent_len);
                l->unsent_len += bytes - sent;
            }
        }
        for (int j = 0; j < k; j++)
            batch[j]->state = SLOT_FREE;
    }
    if (error) {
        l->error = error;
        hand_back(pass, BACK_BROKEN);
        return;
    }
    if (l->unsent_len) {
        hand_back(pass, BACK_SOCKET_FULL);
        return;
    }
    if (l->answered >= LINK_SYNC) {
        l->answered = 0;
        note_pending(pass);  /* (the counts, to the VBD; the link goes on) */
    }
    if (l->muted && l->rend > l->rstart)
        link_take_buffered(pass);  /* (slots are free again) */
}

static int stash_other(void *ctx, void *image, void *completion, ssize_t ret)
{
    (void)ctx;
    return stash_completion(image, completion, ret);
}

/* The wait's call (_hook.h): the linked socket's readiness, or the eventfd's. What it
 * leaves to the Python side is reported as the eventfd's readiness, which the driver
 * answers with reap(). */
static int link_take(struct hook *self, int epfd, struct epoll_event *event, int *progressed)
{
    AsyncPass *pass = (AsyncPass *)self;
    struct link *l = pass->link;
    if (l == NULL || l->state == LINK_OFF)
        return HOOK_NOT_MINE;
    int fd = event->data.fd;
    if (fd == l->fd && l->state == LINK_ON) {
        link_receive(pass);
        *progressed = 1;  /* (its completion soon follows: the wait polls for it) */
    } else if (fd == pass->done_fd) {
        uint64_t count;
        if (read(fd, &count, sizeof count) < 0 && errno != EAGAIN && errno != EINTR)
            return HOOK_REPORT;  /* (the driver's reaper meets the error) */
        AsyncPass *touched = NULL;
        long strays = 0;
        int n = reap_completions(pass->image, &pass->reap, &touched, &strays, stash_other,
                                 NULL);
        answer_touched(touched);
        if (strays) {  /* (for the driver's reaper to say so) */
            pthread_mutex_lock(&later.lock);
            later.strays += strays;
            pthread_mutex_unlock(&later.lock);
        }
        if (n < 0 || strays)
            return HOOK_REPORT;  /* (the driver's reaper meets the error again) */
        *progressed = 1;  /* (the client's next request soon follows) */
    } else {
        return HOOK_NOT_MINE;
    }
    if (!later_waiting())
        return HOOK_TAKEN;
    event->data.fd = pass->done_fd;
    event->events = EPOLLIN;
    return HOOK_REPORT;
}

static const struct hook_ops link_ops = {link_take};

PyDoc_STRVAR(async_link_doc,
"link(fd, epfd, target, structured, max_length)\n"
"--\n\n"
"Serve the connection on socket ``fd`` in the selector's wait from now on (the pass must\n"
"be one of its hooks): its plain reads and writes of at most ``max_length`` bytes\n"
"issued to ``target`` as submit issues them (a write's payload received straight into\n"
"its slot), their replies sent as they complete. ``epfd`` is the loop's epoll instance,\n"
"where the socket is registered for reading; nothing must be received from it or sent\n"
"on it meanwhile but by the link, until unlink().");

static PyObject *async_link(AsyncPass *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "link takes (fd, epfd, target, structured, "
                        "max_length)");
        return NULL;
    }
    int fd = PyLong_AsLong(args[0]);
    int epfd = PyLong_AsLong(args[1]);
    int structured = PyObject_IsTrue(args[3]);
    unsigned long long max_length = PyLong_AsUnsignedLongLong(args[4]);
    if (PyErr_Occurred() || async_target(self, args[2]) < 0)
        return NULL;
    if (fd < 0 || epfd < 0) {
        PyErr_SetString(PyExc_ValueError, "not a file descriptor");
        return NULL;
    }
    if (link_on(self)) {
        PyErr_SetString(PyExc_RuntimeError, "the pass is linked already");
        return NULL;
    }
    struct link *l = self->link;
    if (l == NULL && (l = self->link = calloc(1, sizeof(*l))) == NULL)
        return PyErr_NoMemory();
    if (l->rbuf == NULL && (l->rbuf = malloc(LINK_BUFFER)) == NULL)
        return PyErr_NoMemory();  /* (let go at unlink: a connection not linked holds none) */
    l->fd = fd;
    l->epfd = epfd;
    l->muted = 0;
    l->structured = structured;
    l->max_length = max_length;
    l->direct = NULL;
    l->reason = BACK_NONE;
    l->error = 0;
    l->rstart = l->rend = 0;
    l->answered = 0;
    l->state = LINK_ON;
    pin(self);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(async_unlink_doc,
"unlink()\n"
"--\n\n"
"Take the connection back from the wait (linked or handed back): the socket is watched\n"
"for reading again. Returns (received, unsent, error, reason): the bytes received and\n"
"not taken (to be read before anything else), the replies the socket did not take (to\n"
"be sent before anything else; None: none), the errno of a reply that could not be sent\n"
"(0: none) and why the link was handed back (BACK_*). The slots in flight are answered\n"
"through on_done and flush from now on; counts() has what the link did.");

static PyObject *async_unlink(AsyncPass *self, PyObject *Py_UNUSED(ignored))
{
    struct link *l = self->link;
    if (!link_on(self)) {
        PyErr_SetString(PyExc_RuntimeError, "the pass is not linked");
        return NULL;
    }
    if (l->muted)
        watch_socket(l, 1);
    l->state = LINK_OFF;
    /* What was received and not taken: a direct write's header and what came of its
     * payload (the buffer is empty then), or what the buffer holds. */
    struct slot *s = l->direct;
    PyObject *received = s == NULL
        ? PyBytes_FromStringAndSize((const char *)l->rbuf + l->rstart,
                                    (Py_ssize_t)(l->rend - l->rstart))
        : PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(REQUEST_SIZE + l->direct_filled));
    if (received != NULL && s != NULL) {
        memcpy(PyBytes_AS_STRING(received), l->direct_header, REQUEST_SIZE);
        memcpy(PyBytes_AS_STRING(received) + REQUEST_SIZE, s->buf, l->direct_filled);
    }
    if (s != NULL) {
        s->state = SLOT_FREE;
        l->direct = NULL;
    }
    PyObject *unsent = received == NULL ? NULL : l->unsent_len ? PyBytes_FromStringAndSize(
        (const char *)l->unsent, (Py_ssize_t)l->unsent_len) : Py_NewRef(Py_None);
    PyObject *out = unsent == NULL ? NULL : Py_BuildValue(
        "(NNii)", received, unsent, l->error, l->reason);
    if (unsent == NULL)
        Py_XDECREF(received);
    l->rstart = l->rend = 0;
    free(l->rbuf);
    l->rbuf = NULL;
    free(l->unsent);
    l->unsent = NULL;
    l->unsent_len = 0;
    maybe_unpin(self);  /* (the caller holds the pass: this is never its last reference) */
    return out;
}

static PyObject *times_list(double *times, int count)
{
    if (!count)
        Py_RETURN_NONE;
    PyObject *list = PyList_New(count);
    if (list == NULL)
        return NULL;
    for (int i = 0; i < count; i++) {
        PyObject *t = PyFloat_FromDouble(times[i]);
        if (t == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, t);
    }
    return list;
}

PyDoc_STRVAR(async_counts_doc,
"counts()\n"
"--\n\n"
"What the link did since the last call, for the VBD (issued_inline, finished_inline):\n"
"(issued, reads, read_bytes, writes, write_bytes, read_times, write_times), the requests\n"
"it issued, those it answered, and how long each answered one took from its issue to\n"
"its completion's hand-back, in seconds (None: none).");

static PyObject *async_counts(AsyncPass *self, PyObject *Py_UNUSED(ignored))
{
    struct link *l = self->link;
    if (l == NULL)
        return Py_BuildValue("(iiiiiOO)", 0, 0, 0, 0, 0, Py_None, Py_None);
    PyObject *reads = times_list(l->read_times, l->nread_times);
    PyObject *writes = reads == NULL ? NULL : times_list(l->write_times, l->nwrite_times);
    if (writes == NULL) {
        Py_XDECREF(reads);
        return NULL;
    }
    PyObject *out = Py_BuildValue("(KKKKKNN)", l->issued, l->reads, l->read_bytes,
                                  l->writes, l->write_bytes, reads, writes);
    if (out != NULL) {
        l->issued = l->reads = l->read_bytes = l->writes = l->write_bytes = 0;
        l->nread_times = l->nwrite_times = 0;
        l->answered = 0;
    }
    return out;
}

static PyObject *async_get_linked(AsyncPass *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(link_answers(self));
}

static PyObject *async_get_handed_back(AsyncPass *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->link != NULL && self->link->state == LINK_HANDED);
}

static void link_free(struct link *l)
{
    if (l == NULL)
        return;
    free(l->rbuf);
    free(l->unsent);
    free(l->read_times);
    free(l->write_times);
    free(l);
}
