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

#include <string.h>

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
    if (PyModule_AddIntConstant(m, "WAIT", WAIT) < 0
        || PyModule_AddIntConstant(m, "AGREED", AGREED) < 0
        || PyModule_AddIntConstant(m, "PYTHON", PYTHON) < 0
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
