/*
 * blktap.transport.nbd._handshake: the usual fixed newstyle handshake, compiled.
 *
 * take(fd, buf, start, end, state, name, size, flags) -> (consumed, state, outcome, unsent)
 *
 * Takes the complete messages in buf[start:end] that a client opening a connection
 * usually sends (its flags, STRUCTURED_REPLY, SET_META_CONTEXT for base:allocation, INFO
 * and GO asking for no more than the export and its block sizes), answers each on the
 * socket as the Python negotiation would, byte for byte, and says how far it got:
 *
 * - consumed: the bytes of buf taken from start;
 * - state: the negotiation so far (the ST_* bits, the options taken above
 *   ST_OPTIONS_SHIFT), given back at the next call;
 * - outcome: WAIT (every complete message was answered: call again when more arrives),
 *   AGREED (GO was answered: transmission starts), or PYTHON (the next message is one
 *   this pass does not take, unconsumed: the Python negotiation goes on from it, with
 *   the state);
 * - unsent: None, or the answers the socket did not take (full, or broken): queued by
 *   the caller, which goes on in Python (outcome PYTHON, unless AGREED).
 *
 * Anything else (another option, an error to answer, a name other than the export's own
 * or "", a client without fixed newstyle, an oversized option, a request for the
 * export's name or description) stops the pass before the message: the Python
 * negotiation (handshake.py) is the reference, and answers every error and policy. So
 * this file never decides what the protocol allows; it only spares the interpreter the
 * messages of a connection that goes the usual way (nbdcopy opens two per run, and the
 * client waits for each answer in turn).
 *
 * `name` is the export's name (UTF-8 bytes), `size` its size in bytes, `flags` its
 * transmission flags without FLAG_SEND_DF (added here once structured replies are on).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "_hook.h"  /* what the selector's wait asks of the Desk */
#include "_wire.h"  /* the wire: get16 ... put64, send_now */

/* The wire (the NBD protocol's doc/proto.md, "Option haggling"); big-endian. */
#define IHAVEOPT 0x49484156454F5054ull
#define OPT_REPLY_MAGIC 0x3e889045565a9ull
#define OPTION_HEADER 16 /* IHAVEOPT, option, length */
#define REPLY_HEADER 20  /* magic, option, reply type, length */
#define CLIENT_FLAG_FIXED_NEWSTYLE 1u
#define CLIENT_FLAG_NO_ZEROES 2u
#define OPT_INFO 6u
#define OPT_GO 7u
#define OPT_STRUCTURED_REPLY 8u
#define OPT_SET_META_CONTEXT 10u
#define REP_ACK 1u
#define REP_INFO 3u
#define REP_META_CONTEXT 4u
#define INFO_EXPORT 0u
#define INFO_NAME 1u
#define INFO_DESCRIPTION 2u
#define INFO_BLOCK_SIZE 3u
#define FLAG_SEND_DF (1u << 7)

/* The same as proto.py's (tests/test_nbd_handshake_compiled.py compares them). */
#define MIN_BLOCK 1u
#define PREFERRED_BLOCK 4096u
#define MAX_BLOCK (32u << 20)
#define META_ID_BASE_ALLOCATION 1u
static const char BASE_ALLOCATION[] = "base:allocation";
#define BASE_ALLOCATION_LEN (sizeof(BASE_ALLOCATION) - 1)
/* handshake.py's limits: beyond them the Python negotiation answers (or drops). */
#define MAX_OPTION_DATA (64u << 10)
#define MAX_OPTIONS 1024u
#define MAX_QUERIES 256u

/* state */
#define ST_FLAGS_SEEN 1u   /* the client's flags were taken */
#define ST_FIXED 2u        /* ... with fixed newstyle */
#define ST_NO_ZEROES 4u    /* ... and no zeroes */
#define ST_STRUCTURED 8u   /* structured replies are on */
#define ST_CONTEXTS_SET 16u /* SET_META_CONTEXT was answered here: the contexts are */
#define ST_BASE_ALLOCATION 32u /* ... base:allocation (set) or none (clear) */
#define ST_OPTIONS_SHIFT 8

enum outcome { WAIT = 0, AGREED = 1, PYTHON = 2 };
#define ENDED 3  /* a Desk's client whose connection ended at the desk (collect) */

/* The largest answer to one option (GO: two REP_INFO and the ACK) is 86 bytes. */
#define OUT_BYTES 4096
#define OUT_ROOM 128


struct export {
    const unsigned char *name;
    Py_ssize_t name_len;
    uint64_t size;
    uint16_t flags;
};

/* A reply's header at out, for ``length`` bytes of data after it; the data's start. */
static unsigned char *put_reply(unsigned char *out, uint32_t option, uint32_t type,
                                uint32_t length)
{
    put64(out, OPT_REPLY_MAGIC);
    put32(out + 8, option);
    put32(out + 12, type);
    put32(out + 16, length);
    return out + REPLY_HEADER;
}

/* Whether a name the client sent reaches the export without the Python side's help:
 * "" (the default export) or the export's own name (others are the Python side's,
 * which knows whether the export takes any name, and answers when it does not). */
static int names_export(const struct export *ex, const unsigned char *name, uint32_t len)
{
    return len == 0 || (len == (uint64_t)ex->name_len && memcmp(name, ex->name, len) == 0);
}

/* INFO or GO asking for nothing but the export and its block sizes (sent whether asked
 * or not, as handshake.py does); the answers' length, or 0 to leave it to Python. */
static size_t info(const struct export *ex, uint32_t option, const unsigned char *data,
                   uint32_t length, unsigned state, unsigned char *out)
{
    if (length < 6)
        return 0;
    uint32_t nlen = get32(data);
    if (nlen > length - 6 || !names_export(ex, data + 4, nlen))
        return 0;
    uint32_t nreq = get16(data + 4 + nlen);
    if (length != 6 + nlen + 2 * nreq)
        return 0;
    for (uint32_t i = 0; i < nreq; i++) {
        uint16_t req = get16(data + 6 + nlen + 2 * i);
        if (req == INFO_NAME || req == INFO_DESCRIPTION)
            return 0;
    }
    unsigned char *p = put_reply(out, option, REP_INFO, 12);
    put16(p, INFO_EXPORT);
    put64(p + 2, ex->size);
    put16(p + 10, ex->flags | (state & ST_STRUCTURED ? FLAG_SEND_DF : 0));
    p = put_reply(p + 12, option, REP_INFO, 14);
    put16(p, INFO_BLOCK_SIZE);
    put32(p + 2, MIN_BLOCK);
    put32(p + 6, PREFERRED_BLOCK);
    put32(p + 10, MAX_BLOCK);
    p = put_reply(p + 14, option, REP_ACK, 0);
    return (size_t)(p - out);
}

/* SET_META_CONTEXT choosing base:allocation (every query that, or none at all) on the
 * export, once structured replies are on; the answers' length, or 0. */
static size_t set_meta_context(const struct export *ex, const unsigned char *data,
                               uint32_t length, unsigned *state, unsigned char *out)
{
    if (!(*state & ST_STRUCTURED) || length < 8)
        return 0;
    uint32_t nlen = get32(data);
    if (nlen > length - 8 || !names_export(ex, data + 4, nlen))
        return 0;
    uint32_t count = get32(data + 4 + nlen);
    if (count > MAX_QUERIES)
        return 0;
    uint64_t pos = 8 + (uint64_t)nlen;
    for (uint32_t i = 0; i < count; i++) {
        if (pos + 4 > length)
            return 0;
        uint32_t qlen = get32(data + pos);
        pos += 4;
        if (qlen != BASE_ALLOCATION_LEN || pos + qlen > length
            || memcmp(data + pos, BASE_ALLOCATION, BASE_ALLOCATION_LEN) != 0)
            return 0;
        pos += qlen;
    }
    if (pos != length)
        return 0;
    unsigned char *p = out;
    if (count) {
        p = put_reply(p, OPT_SET_META_CONTEXT, REP_META_CONTEXT, 4 + BASE_ALLOCATION_LEN);
        put32(p, META_ID_BASE_ALLOCATION);
        memcpy(p + 4, BASE_ALLOCATION, BASE_ALLOCATION_LEN);
        p += 4 + BASE_ALLOCATION_LEN;
        *state |= ST_BASE_ALLOCATION;
    } else {
        *state &= ~ST_BASE_ALLOCATION;
    }
    *state |= ST_CONTEXTS_SET;
    p = put_reply(p, OPT_SET_META_CONTEXT, REP_ACK, 0);
    return (size_t)(p - out);
}

/* Take the complete messages of buf[*pos:end] (see the module's comment), answering
 * them on fd: *pos moves past what was taken, *st is the state, out[*sent:*used] what
 * was answered and not sent (the socket full, or broken). The outcome. */
static int take_messages(const struct export *ex, int fd, const unsigned char *buf,
                         Py_ssize_t *pos_io, Py_ssize_t end, unsigned *st_io,
                         unsigned char *out, size_t *used_io, size_t *sent_io)
{
    Py_ssize_t pos = *pos_io;
    unsigned st = *st_io;
    size_t used = 0, sent = 0;
    int outcome = WAIT;

    if (!(st & ST_FLAGS_SEEN)) {
        if (end - pos < 4)
            goto done;
        uint32_t cflags = get32(buf + pos);
        if (cflags & ~(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES)) {
            outcome = PYTHON;
            goto done;
        }
        st |= ST_FLAGS_SEEN;
        if (cflags & CLIENT_FLAG_FIXED_NEWSTYLE)
            st |= ST_FIXED;
        if (cflags & CLIENT_FLAG_NO_ZEROES)
            st |= ST_NO_ZEROES;
        pos += 4;
    }
    while (end - pos >= OPTION_HEADER) {
        uint32_t option = get32(buf + pos + 8), length = get32(buf + pos + 12);
        if (!(st & ST_FIXED) || get64(buf + pos) != IHAVEOPT
            || (st >> ST_OPTIONS_SHIFT) >= MAX_OPTIONS || length > MAX_OPTION_DATA) {
            outcome = PYTHON;
            break;
        }
        if (end - pos - OPTION_HEADER < (Py_ssize_t)length)
            break;  /* WAIT for the rest */
        if (used > OUT_BYTES - OUT_ROOM) {
            /* (a client sending options without reading their answers) */
            sent = 0;
            if (send_now(fd, out, &sent, used)) {
                outcome = PYTHON;
                goto done;
            }
            used = sent = 0;
        }
        const unsigned char *data = buf + pos + OPTION_HEADER;
        size_t answer = 0;
        if (option == OPT_STRUCTURED_REPLY) {
            if (length == 0) {
                st |= ST_STRUCTURED;
                answer = (size_t)(put_reply(out + used, option, REP_ACK, 0) - (out + used));
            }
        } else if (option == OPT_SET_META_CONTEXT) {
            answer = set_meta_context(ex, data, length, &st, out + used);
        } else if (option == OPT_INFO || option == OPT_GO) {
            answer = info(ex, option, data, length, st, out + used);
        }
        if (!answer) {
            outcome = PYTHON;
            break;
        }
        used += answer;
        pos += OPTION_HEADER + length;
        st += 1u << ST_OPTIONS_SHIFT;
        if (option == OPT_GO) {
            outcome = AGREED;
            break;
        }
    }
    if (used && send_now(fd, out, &sent, used) && outcome == WAIT)
        outcome = PYTHON;  /* (the socket full, or broken: what is left is queued) */
done:
    *pos_io = pos;
    *st_io = st;
    *used_io = used;
    *sent_io = sent;
    return outcome;
}

PyDoc_STRVAR(take_doc,
"take(fd, buf, start, end, state, name, size, flags) -> (consumed, state, outcome, unsent)\n\n"
"Answer the usual messages of a fixed newstyle handshake buffered in buf[start:end] (see\n"
"the module's source for the contract).");

static PyObject *take(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "take() takes 8 arguments");
        return NULL;
    }
    int fd = (int)PyLong_AsLong(args[0]);
    Py_ssize_t start = PyLong_AsSsize_t(args[2]);
    Py_ssize_t end = PyLong_AsSsize_t(args[3]);
    unsigned long state = PyLong_AsUnsignedLong(args[4]);
    unsigned long long size = PyLong_AsUnsignedLongLong(args[6]);
    unsigned long flags = PyLong_AsUnsignedLong(args[7]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyBytes_Check(args[5])) {
        PyErr_SetString(PyExc_TypeError, "name must be bytes");
        return NULL;
    }
    struct export ex = {
        (const unsigned char *)PyBytes_AS_STRING(args[5]), PyBytes_GET_SIZE(args[5]),
        size, (uint16_t)flags,
    };
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (start < 0 || end < start || end > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "start and end must lie within the buffer");
        return NULL;
    }
    unsigned char out[OUT_BYTES];
    size_t used, sent;
    Py_ssize_t pos = start;
    unsigned st = (unsigned)state;
    int outcome = take_messages(&ex, fd, (const unsigned char *)view.buf, &pos, end, &st,
                                out, &used, &sent);
    PyBuffer_Release(&view);
    PyObject *unsent;
    if (sent < used) {
        unsent = PyBytes_FromStringAndSize((const char *)out + sent, (Py_ssize_t)(used - sent));
        if (unsent == NULL)
            return NULL;
    } else {
        unsent = Py_NewRef(Py_None);
    }
    return Py_BuildValue("nkiN", pos - start, (unsigned long)st, outcome, unsent);
}

/*
 * Desk(listener, greeting, name, size, flags, unix_sndbuf, room): the front desk of an
 * NBD server's listening socket, a hook of the loop's compiled wait (io/_hook.h). The
 * wait gives it the listener's readinesses: it accepts the clients (as many as `room`
 * allows), sends each the greeting, watches it in the loop's epoll instance and answers
 * its options with the take above as they come, all without the interpreter. A client
 * leaves the desk with its first request once the take agreed on a session (GO
 * answered: transmission then starts in the turn of the loop that takes it over), when
 * the take stops (a message for the Python negotiation), when its socket ends, breaks or
 * fills, or its first message outgrows the desk's buffer: it is then handed over, out of the epoll set, and the first listener reported readable, for
 * the server's Python to collect() it (its descriptor, the state and outcome of the
 * take, the bytes received and not taken, the answers not sent) and go on from there;
 * expire() closes those still negotiating past the time limit.
 * An accept that fails for another reason than "none waiting" is left to the loop (the
 * listener reported as it came): the server's own accept meets the error and applies
 * its policy. So does a full desk.
 *
 * Why: a short connection (nbdcopy opens two per run, nbdinfo one) is mostly its
 * handshake, the client waiting for each answer in turn, and the loop's turn around
 * each message costs more than the message's work, more still in an interpreter whose
 * working set went cold in the pause between two such clients.
 */
#define CLIENT_BUFFER 1024  /* the usual options are far smaller */
#define ACCEPTS_PER_TAKE 16

/* Transmission (doc/proto.md, "Transmission"): the requests the desk looks at. */
#define REQUEST_MAGIC 0x25609513u
#define REQUEST_SIZE 28  /* magic, flags, type, handle, offset, length */
#define CMD_READ 0u
#define CMD_WRITE 1u
#define CMD_DISC 2u
#define CMD_BLOCK_STATUS 7u
/* The passes of transmit one client gets at the desk. The short connections the desk
 * serves to the end take a few (nbdinfo --map: one block status; each of nbdcopy's
 * workers on a sparse 1 GiB image: four); a long one (fio, a VM's disk) is handed over
 * at its next request, to the event loop's path, which batches and polls for it (kept
 * here, fio's 4 KiB reads of holes at QD1 fell from 40k to 19k IOPS). */
#define DESK_PASSES 16u

struct client {
    int fd;
    int family;           /* AF_UNIX, AF_INET, AF_INET6 */
    struct sockaddr_storage peer;  /* as accept4 gave it */
    int outcome;          /* once handed over */
    unsigned state;
    double since;         /* accepted at (CLOCK_MONOTONIC, seconds) */
    size_t used;          /* bytes in buf */
    unsigned passes;      /* of transmit that served it (DESK_PASSES at most) */
    unsigned char *unsent; /* answers (or the greeting) the socket did not take */
    size_t unsent_len;
    unsigned char buf[CLIENT_BUFFER];
};

struct client_list {
    struct client **items;
    Py_ssize_t count, capacity;
};

typedef struct {
    struct hook hook;
    int listener;          /* the listening socket */
    PyObject *name;        /* bytes: the export's name, which ex.name points into */
    struct export ex;
    unsigned char greeting[64];
    size_t greeting_len;
    int unix_sndbuf;
    Py_ssize_t room;       /* clients the desk may hold (held and handed over) */
    struct client_list held, handed;
    unsigned long long accepted;
    int epfd;              /* the loop's epoll instance, as the wait last gave it */
    int wants_accept;      /* the server's own accept must run (an error, a full desk) */
    int closed;
    PyObject *transmit;    /* the server's compiled pass over an agreed client's requests */
    PyObject *requests;    /* bytearray(CLIENT_BUFFER): a client's requests, for transmit */
    int transmitting;      /* in transmit (the desk must not close under it) */
    unsigned long long ended;  /* connections that ended here (a DISC, or broken) */
} Desk;

static double monotonic(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + now.tv_nsec * 1e-9;
}

/* (plain malloc: these run without the interpreter lock) */
static int list_add(struct client_list *list, struct client *c)
{
    if (list->count == list->capacity) {
        Py_ssize_t capacity = list->capacity ? list->capacity * 2 : 8;
        struct client **items = realloc(list->items, sizeof(*items) * (size_t)capacity);
        if (items == NULL)
            return -1;
        list->items = items;
        list->capacity = capacity;
    }
    list->items[list->count++] = c;
    return 0;
}

static void list_remove_at(struct client_list *list, Py_ssize_t i)
{
    list->items[i] = list->items[--list->count];
}

static void client_free(struct client *c)
{
    free(c->unsent);
    free(c);
}

static void client_keep_unsent(struct client *c, const unsigned char *rest, size_t len)
{
    if (!len)
        return;
    unsigned char *kept = realloc(c->unsent, c->unsent_len + len);
    if (kept == NULL) {  /* (no memory for a few bytes: the client is closed) */
        shutdown(c->fd, SHUT_RDWR);
        return;
    }
    memcpy(kept + c->unsent_len, rest, len);
    c->unsent = kept;
    c->unsent_len += len;
}

/* Out of the epoll set and onto the hand-over list: 0, or -1 (no memory: closed). */
static int hand_over(Desk *desk, int epfd, struct client *c, int outcome, int watched)
{
    if (watched)
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    c->outcome = outcome;
    if (list_add(&desk->handed, c) < 0) {
        if (c->fd >= 0)
            close(c->fd);
        client_free(c);
        return -1;
    }
    return 0;
}

/* Accept from listener lfd; *report set when the server's own accept must run (an
 * error, the desk full); clients handed over are on desk->handed. */
static void accept_clients(Desk *desk, int epfd, int lfd, int *report)
{
    for (int n = 0; n < ACCEPTS_PER_TAKE; n++) {
        if (desk->held.count + desk->handed.count >= desk->room) {
            *report = 1;  /* full: the server's own accept applies its limit */
            return;
        }
        struct sockaddr_storage addr;
        socklen_t addrlen = sizeof(addr);
        int fd = accept4(lfd, (struct sockaddr *)&addr, &addrlen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                *report = 1;  /* (EMFILE and the like: the server's accept meets it too) */
            return;
        }
        desk->accepted++;
        struct client *c = malloc(sizeof(*c));
        if (c == NULL) {
            close(fd);
            continue;
        }
        c->fd = fd;
        c->family = addr.ss_family;
        memcpy(&c->peer, &addr, sizeof(addr));
        c->outcome = WAIT;
        c->state = 0;
        c->since = monotonic();
        c->used = 0;
        c->passes = 0;
        c->unsent = NULL;
        c->unsent_len = 0;
        if (addr.ss_family == AF_UNIX) {
            /* (as server.py's UNIX_SEND_BUFFER: a large read's reply in one send) */
            setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &desk->unix_sndbuf, sizeof(desk->unix_sndbuf));
        } else if (addr.ss_family == AF_INET || addr.ss_family == AF_INET6) {
            int on = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
        }
        size_t sent = 0;
        int full = send_now(fd, desk->greeting, &sent, desk->greeting_len);
        if (full) {
            client_keep_unsent(c, desk->greeting + sent, desk->greeting_len - sent);
            hand_over(desk, epfd, c, PYTHON, 0);
            continue;
        }
        struct epoll_event watch = {.events = EPOLLIN, .data.fd = fd};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &watch) < 0 || list_add(&desk->held, c) < 0) {
            epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
            hand_over(desk, epfd, c, WAIT, 0);  /* (the server's Python goes on) */
        }
    }
    /* (more may wait: the listener stays ready, and the next wait comes back to it) */
}

/* What becomes of an agreed client after its requests were looked at. */
enum { STAYS, ENDS, HANDED };

/* The server's transmit over the requests of c's buffer, with the interpreter lock
 * (taken here: the wait let it go): what it consumed is dropped from the buffer, what
 * the socket did not take of the replies kept to be sent first. -1: it raised, or
 * answered nonsense (reported as unraisable; the client is handed over as it was), or
 * the connection broke (*broken). */
static Py_ssize_t call_transmit(Desk *desk, struct client *c, int *broken)
{
    Py_ssize_t consumed = -1;
    int structured = (c->state & ST_STRUCTURED) != 0;
    /* base:allocation's id when it is the session's one context (the desk's take
     * answers no other), else 0: block status is then the Python path's */
    unsigned all = ST_STRUCTURED | ST_CONTEXTS_SET | ST_BASE_ALLOCATION;
    unsigned status_id = (c->state & all) == all ? META_ID_BASE_ALLOCATION : 0;
    PyGILState_STATE gil = PyGILState_Ensure();
    if (desk->transmit == NULL) {  /* (taken away while the lock was let go) */
        PyGILState_Release(gil);
        return -1;
    }
    PyObject *transmit = Py_NewRef(desk->transmit);
    desk->transmitting = 1;
    memcpy(PyByteArray_AS_STRING(desk->requests), c->buf, c->used);
    PyObject *result = PyObject_CallFunction(transmit, "iOniI", c->fd, desk->requests,
                                             (Py_ssize_t)c->used, structured, status_id);
    desk->transmitting = 0;
    PyObject *unsent;
    if (result == NULL || !PyArg_ParseTuple(result, "nOp", &consumed, &unsent, broken)
            || consumed < 0 || (size_t)consumed > c->used
            || (unsent != Py_None && !PyBytes_Check(unsent))) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "transmit must return (consumed, unsent "
                            "bytes or None, broken)");
        if (PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
            /* (a SIGINT that came while transmit ran: not lost, but raised again where
             * the loop's Python next checks for signals) */
            PyErr_Clear();
            PyErr_SetInterrupt();
        } else {
            PyErr_WriteUnraisable(transmit);
        }
        consumed = -1;
    } else if (*broken) {
        consumed = -1;
    } else {
        if (unsent != Py_None)
            client_keep_unsent(c, (const unsigned char *)PyBytes_AS_STRING(unsent),
                               (size_t)PyBytes_GET_SIZE(unsent));
        memmove(c->buf, c->buf + consumed, c->used - (size_t)consumed);
        c->used -= (size_t)consumed;
    }
    Py_XDECREF(result);
    Py_DECREF(transmit);
    PyGILState_Release(gil);
    return consumed;
}

/* An agreed client's requests: a DISC (with nothing else before it) ends the
 * connection here, as the Python path ends it (Connection._disconnected: no reply);
 * reads, writes and block status go to the server's transmit (the compiled pass, which
 * serves what the disk can serve at once), DESK_PASSES times at most; the client stays
 * while all was served, and is handed over at anything else (the Python path then
 * serves it from there). */
static int transmission(Desk *desk, struct client *c)
{
    while (c->used >= REQUEST_SIZE) {
        uint32_t cmd = get16(c->buf + 6);
        if (get32(c->buf) != REQUEST_MAGIC)
            return HANDED;
        if (cmd == CMD_DISC)
            return ENDS;
        if (desk->transmit == NULL || c->passes >= DESK_PASSES
                || (cmd != CMD_READ && cmd != CMD_WRITE && cmd != CMD_BLOCK_STATUS))
            return HANDED;
        int broken = 0;
        Py_ssize_t consumed = call_transmit(desk, c, &broken);
        if (broken)
            return ENDS;
        if (consumed <= 0 || c->unsent_len)
            return HANDED;
        c->passes++;
    }
    return STAYS;
}

/* A held client's readiness: receive, take, and hand it over unless the take waits. A
 * client agreed at GO stays until its first request is here (or its stream ends), to be
 * handed over with it: transmission then starts in the same turn of the loop. */
static void serve_client(Desk *desk, int epfd, Py_ssize_t at, int *progressed, int *report)
{
    struct client *c = desk->held.items[at];
    ssize_t got = recv(c->fd, c->buf + c->used, CLIENT_BUFFER - c->used, MSG_DONTWAIT);
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    int outcome = c->outcome == AGREED ? AGREED : PYTHON;  /* (an end, an error: Python's) */
    int next = HANDED;
    if (c->outcome == AGREED) {
        /* (in transmission with nothing in flight: the end of its stream, or an error,
         * ends the connection, as the Python path ends it) */
        if (got <= 0)
            next = ENDS;
        else
            c->used += (size_t)got;
    } else if (got > 0) {
        c->used += (size_t)got;
        *progressed = 1;
        unsigned char out[OUT_BYTES];
        size_t used, sent;
        Py_ssize_t pos = 0;
        outcome = take_messages(&desk->ex, c->fd, c->buf, &pos, (Py_ssize_t)c->used,
                                &c->state, out, &used, &sent);
        if (pos) {
            memmove(c->buf, c->buf + pos, c->used - (size_t)pos);
            c->used -= (size_t)pos;
        }
        if (sent < used)
            client_keep_unsent(c, out + sent, used - sent);
        if (outcome == WAIT && c->used < CLIENT_BUFFER && !c->unsent_len)
            return;
        if (outcome == AGREED && !c->unsent_len)
            c->outcome = AGREED;  /* (GO answered: transmission, from what came with it) */
        if (c->unsent_len && outcome == WAIT)
            outcome = PYTHON;
    }
    if (c->outcome == AGREED && next != ENDS)
        next = transmission(desk, c);
    if (next == STAYS)
        return;
    list_remove_at(&desk->held, at);
    if (next == ENDS) {
        /* (closing it takes it out of the epoll set: it was the only reference);
         * handed over all the same, for the server to account for it (its log) */
        close(c->fd);
        c->fd = -1;
        c->used = 0;
        desk->ended++;
        if (hand_over(desk, epfd, c, ENDED, 0) == 0)
            *report = 1;
        return;
    }
    hand_over(desk, epfd, c, outcome, 1);
    *report = 1;
}

static int desk_take(struct hook *self, int epfd, struct epoll_event *event, int *progressed)
{
    Desk *desk = (Desk *)self;
    int fd = event->data.fd, report = 0;
    if (desk->closed)
        return HOOK_NOT_MINE;
    desk->epfd = epfd;
    if (fd == desk->listener) {
        accept_clients(desk, epfd, fd, &report);
        if (report)
            desk->wants_accept = 1;
    } else {
        /* (a scan: the clients in their handshake at one time are a handful) */
        Py_ssize_t at = -1;
        for (Py_ssize_t i = 0; i < desk->held.count && at < 0; i++) {
            if (desk->held.items[i]->fd == fd)
                at = i;
        }
        if (at < 0)
            return HOOK_NOT_MINE;
        serve_client(desk, epfd, at, progressed, &report);
        fd = desk->listener;  /* (what the loop is shown, to collect) */
    }
    if (!report && !desk->handed.count)
        return HOOK_TAKEN;
    event->data.fd = fd;
    event->events = EPOLLIN;
    return HOOK_REPORT;
}

static const struct hook_ops desk_ops = {desk_take};

static void desk_close_all(Desk *desk)
{
    for (Py_ssize_t i = 0; i < desk->held.count; i++) {
        close(desk->held.items[i]->fd);
        client_free(desk->held.items[i]);
    }
    for (Py_ssize_t i = 0; i < desk->handed.count; i++) {
        if (desk->handed.items[i]->fd >= 0)
            close(desk->handed.items[i]->fd);
        client_free(desk->handed.items[i]);
    }
    desk->held.count = desk->handed.count = 0;
}

static int desk_init(Desk *self, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"listener", "greeting", "name", "size", "flags",
                               "unix_sndbuf", "room", NULL};
    PyObject *name;
    Py_buffer greeting;
    int listener;
    unsigned long long size;
    unsigned int flags;
    int unix_sndbuf;
    Py_ssize_t room;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iy*O!KIin:Desk", keywords, &listener,
                                     &greeting, &PyBytes_Type, &name, &size, &flags,
                                     &unix_sndbuf, &room))
        return -1;
    if (self->hook.ops != NULL) {
        PyBuffer_Release(&greeting);
        PyErr_SetString(PyExc_RuntimeError, "a Desk is set up once");
        return -1;
    }
    if (listener < 0 || greeting.len <= 0 || (size_t)greeting.len > sizeof(self->greeting)
            || room < 0 || flags > 0xffff) {
        PyBuffer_Release(&greeting);
        PyErr_SetString(PyExc_ValueError, "listener, greeting (1-64 bytes), flags or room "
                        "out of range");
        return -1;
    }
    memcpy(self->greeting, greeting.buf, (size_t)greeting.len);
    self->greeting_len = (size_t)greeting.len;
    PyBuffer_Release(&greeting);
    self->listener = listener;
    self->name = Py_NewRef(name);
    self->ex.name = (const unsigned char *)PyBytes_AS_STRING(name);
    self->ex.name_len = PyBytes_GET_SIZE(name);
    self->ex.size = size;
    self->ex.flags = (uint16_t)flags;
    self->unix_sndbuf = unix_sndbuf;
    self->room = room;
    self->epfd = -1;
    self->requests = PyByteArray_FromStringAndSize(NULL, CLIENT_BUFFER);
    if (self->requests == NULL)
        return -1;
    self->hook.ops = &desk_ops;
    return 0;
}

static void desk_dealloc(Desk *self)
{
    desk_close_all(self);
    free(self->held.items);
    free(self->handed.items);
    Py_XDECREF(self->name);
    Py_XDECREF(self->transmit);
    Py_XDECREF(self->requests);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyDoc_STRVAR(collect_doc,
"collect() -> [(fd, family, since, state, outcome, received, unsent, peer)]: the clients\n"
"handed over since the last call, in order, now the caller's (a non-blocking socket of\n"
"that address family, accepted at `since`, time.monotonic()'s clock): the take's state\n"
"and outcome (WAIT: its pass may go on; AGREED or PYTHON; ENDED: the connection ended\n"
"at the desk, fd -1), the bytes received and not taken, the answers not sent (None:\n"
"all sent), and a TCP client's \"host:port\" (None for others).");

/* A TCP client's address as "host:port" (the server's name for it), None otherwise. */
static PyObject *peer_name(const struct client *c)
{
    char host[INET6_ADDRSTRLEN];
    const void *where;
    unsigned port;
    if (c->family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)&c->peer;
        where = &in->sin_addr;
        port = ntohs(in->sin_port);
    } else if (c->family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)&c->peer;
        where = &in6->sin6_addr;
        port = ntohs(in6->sin6_port);
    } else {
        Py_RETURN_NONE;
    }
    if (inet_ntop(c->family, where, host, sizeof(host)) == NULL)
        Py_RETURN_NONE;
    return PyUnicode_FromFormat("%s:%u", host, port);
}

static PyObject *desk_collect(Desk *self, PyObject *Py_UNUSED(ignored))
{
    Py_ssize_t count = self->handed.count;
    PyObject *list = PyList_New(count);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        struct client *c = self->handed.items[i];
        PyObject *unsent = c->unsent_len
            ? PyBytes_FromStringAndSize((const char *)c->unsent, (Py_ssize_t)c->unsent_len)
            : Py_NewRef(Py_None);
        PyObject *peer = unsent == NULL ? NULL : peer_name(c);
        PyObject *item = peer == NULL ? NULL : Py_BuildValue(
            "(iidkiy#NN)", c->fd, c->family, c->since, (unsigned long)c->state, c->outcome,
            c->buf, (Py_ssize_t)c->used, unsent, peer);
        if (item == NULL && peer == NULL)
            Py_XDECREF(unsent);
        if (item == NULL) {  /* (no memory: every client stays handed over, for next time) */
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    for (Py_ssize_t i = 0; i < count; i++)
        client_free(self->handed.items[i]);
    self->handed.count = 0;
    self->wants_accept = 0;
    return list;
}

PyDoc_STRVAR(expire_doc,
"expire(before) -> int: close the clients accepted before `before` (time.monotonic())\n"
"and still negotiating here; how many. Those agreed (GO answered) and waiting for their\n"
"first request are handed over instead, for collect().");

static PyObject *desk_expire(Desk *self, PyObject *arg)
{
    double before = PyFloat_AsDouble(arg);
    if (before == -1.0 && PyErr_Occurred())
        return NULL;
    Py_ssize_t n = 0;
    for (Py_ssize_t i = 0; i < self->held.count;) {
        struct client *c = self->held.items[i];
        if (c->since >= before) {
            i++;
            continue;
        }
        list_remove_at(&self->held, i);
        if (c->outcome == AGREED) {  /* (its handshake is over: an idle client, not late) */
            hand_over(self, self->epfd, c, AGREED, 1);
            continue;
        }
        /* (closing it takes it out of the epoll set: it was the only reference) */
        close(c->fd);
        client_free(c);
        n++;
    }
    return PyLong_FromSsize_t(n);
}

static PyObject *desk_close(Desk *self, PyObject *Py_UNUSED(ignored))
{
    if (self->transmitting) {  /* (the client transmit serves would be freed under it) */
        PyErr_SetString(PyExc_RuntimeError, "a desk cannot close from its transmit");
        return NULL;
    }
    desk_close_all(self);
    self->closed = 1;
    Py_RETURN_NONE;
}

static PyObject *desk_get_room(Desk *self, void *closure)
{
    return PyLong_FromSsize_t(self->room);
}

static int desk_set_room(Desk *self, PyObject *value, void *closure)
{
    Py_ssize_t room = value == NULL ? -1 : PyLong_AsSsize_t(value);
    if (room == -1 && PyErr_Occurred())
        return -1;
    if (room < 0) {
        PyErr_SetString(PyExc_ValueError, "room must be 0 or more");
        return -1;
    }
    self->room = room;
    return 0;
}

static int desk_set_flags(Desk *self, PyObject *value, void *closure)
{
    unsigned long flags = value == NULL ? ULONG_MAX : PyLong_AsUnsignedLong(value);
    if (flags == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    if (flags > 0xffff) {
        PyErr_SetString(PyExc_ValueError, "transmission flags are 16 bits");
        return -1;
    }
    self->ex.flags = (uint16_t)flags;
    return 0;
}

static PyObject *desk_get_flags(Desk *self, void *closure)
{
    return PyLong_FromUnsignedLong(self->ex.flags);
}

static PyObject *desk_get_held(Desk *self, void *closure)
{
    return PyLong_FromSsize_t(self->held.count + self->handed.count);
}

static PyObject *desk_get_wants_accept(Desk *self, void *closure)
{
    return PyBool_FromLong(self->wants_accept);
}

static PyObject *desk_get_ended(Desk *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->ended);
}

static PyObject *desk_get_transmit(Desk *self, void *closure)
{
    return Py_NewRef(self->transmit == NULL ? Py_None : self->transmit);
}

static int desk_set_transmit(Desk *self, PyObject *value, void *closure)
{
    if (value != NULL && value != Py_None && !PyCallable_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "transmit must be callable or None");
        return -1;
    }
    Py_XSETREF(self->transmit, value == NULL || value == Py_None ? NULL : Py_NewRef(value));
    return 0;
}

static PyObject *desk_get_accepted(Desk *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->accepted);
}

static PyMethodDef desk_methods[] = {
    {"collect", (PyCFunction)desk_collect, METH_NOARGS, collect_doc},
    {"expire", (PyCFunction)desk_expire, METH_O, expire_doc},
    {"close", (PyCFunction)desk_close, METH_NOARGS,
     "Close every client the desk holds and take no more (the listener is the caller's)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef desk_getset[] = {
    {"room", (getter)desk_get_room, (setter)desk_set_room,
     "How many clients the desk may hold at once (beyond, the server's accept).", NULL},
    {"flags", (getter)desk_get_flags, (setter)desk_set_flags,
     "The export's transmission flags, without FLAG_SEND_DF.", NULL},
    {"held", (getter)desk_get_held, NULL,
     "Clients the desk holds: negotiating, or handed over and not collected.", NULL},
    {"accepted", (getter)desk_get_accepted, NULL, "Clients the desk accepted in all.", NULL},
    {"ended", (getter)desk_get_ended, NULL,
     "Connections that ended at the desk (a DISC, or the client gone while transmit "
     "served it), never handed over.", NULL},
    {"transmit", (getter)desk_get_transmit, (setter)desk_set_transmit,
     "None, or transmit(fd, requests, end, structured, status_id) -> (consumed, unsent, "
     "broken): serves what it can of an agreed client's requests (requests[:end], a "
     "bytearray), called in the wait with the interpreter lock. Without it, an agreed "
     "client is handed over with its first request (a DISC still ends it here).", NULL},
    {"wants_accept", (getter)desk_get_wants_accept, NULL,
     "Whether the server's own accept must run (an accept failed here, or the desk is "
     "full); collect() clears it.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject DeskType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "blktap.transport.nbd._handshake.Desk",
    .tp_doc = "Desk(listener, greeting, name, size, flags, unix_sndbuf, room): accepts "
              "clients and answers their usual handshakes in the loop's wait (a hook).",
    .tp_basicsize = sizeof(Desk),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)desk_init,
    .tp_dealloc = (destructor)desk_dealloc,
    .tp_methods = desk_methods,
    .tp_getset = desk_getset,
};

static PyMethodDef methods[] = {
    {"take", (PyCFunction)(void (*)(void))take, METH_FASTCALL, take_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "blktap.transport.nbd._handshake",
    .m_doc = "The usual fixed newstyle NBD handshake, compiled (handshake.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__handshake(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* The Desk is a hook of the selector's wait: without io._poll (not built), none. */
    PyTypeObject *hook_type = PyCapsule_Import(HOOK_CAPSULE, 0);
    if (hook_type == NULL) {
        PyErr_Clear();
    } else {
        DeskType.tp_base = hook_type;
        if (PyType_Ready(&DeskType) < 0) {
            Py_DECREF(m);
            return NULL;
        }
        Py_INCREF(&DeskType);
        if (PyModule_AddObject(m, "Desk", (PyObject *)&DeskType) < 0) {
            Py_DECREF(&DeskType);
            Py_DECREF(m);
            return NULL;
        }
    }
    if (PyModule_AddIntConstant(m, "WAIT", WAIT) < 0
        || PyModule_AddIntConstant(m, "AGREED", AGREED) < 0
        || PyModule_AddIntConstant(m, "PYTHON", PYTHON) < 0
        || PyModule_AddIntConstant(m, "ENDED", ENDED) < 0
        || PyModule_AddIntConstant(m, "DESK_PASSES", DESK_PASSES) < 0
        || PyModule_AddIntConstant(m, "ST_FLAGS_SEEN", ST_FLAGS_SEEN) < 0
        || PyModule_AddIntConstant(m, "ST_FIXED", ST_FIXED) < 0
        || PyModule_AddIntConstant(m, "ST_NO_ZEROES", ST_NO_ZEROES) < 0
        || PyModule_AddIntConstant(m, "ST_STRUCTURED", ST_STRUCTURED) < 0
        || PyModule_AddIntConstant(m, "ST_CONTEXTS_SET", ST_CONTEXTS_SET) < 0
        || PyModule_AddIntConstant(m, "ST_BASE_ALLOCATION", ST_BASE_ALLOCATION) < 0
        || PyModule_AddIntConstant(m, "ST_OPTIONS_SHIFT", ST_OPTIONS_SHIFT) < 0
        || PyModule_AddIntConstant(m, "MIN_BLOCK", MIN_BLOCK) < 0
        || PyModule_AddIntConstant(m, "PREFERRED_BLOCK", PREFERRED_BLOCK) < 0
        || PyModule_AddIntConstant(m, "MAX_BLOCK", MAX_BLOCK) < 0
        || PyModule_AddIntConstant(m, "MAX_OPTIONS", MAX_OPTIONS) < 0
        || PyModule_AddIntConstant(m, "MAX_OPTION_DATA", MAX_OPTION_DATA) < 0
        || PyModule_AddIntConstant(m, "MAX_QUERIES", MAX_QUERIES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
