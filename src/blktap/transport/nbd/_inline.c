/*
 * blktap.transport.nbd._inline: the NBD transport's inline path, compiled.
 *
 * One call takes the complete READ and WRITE requests at the front of a connection's
 * receive buffer that the kernel can serve without waiting (a disk whose bytes sit in
 * files in memory or in the page cache, at their own offsets or where a VHD's BAT or a
 * qcow2's L2 tables place them), does them with pread/pwrite,
 * gathers their replies in a scratch buffer and sends them in one system call. It stops
 * at the first request it does not take (another command, a flag, an unaligned or
 * out-of-range request, a write payload not all received, a read that would wait, an
 * error), consuming nothing of it: the Python path takes it from there and answers what
 * is wrong with it. So the compiled path never answers an error and never decides a
 * policy; it only skips the interpreter for what the Python side door would do the
 * same way (connection.py, VBD.read_now/write_now, AioDriver).
 *
 * The interpreter lock is released for the whole pass: the buffers are pinned by the
 * buffer protocol and nothing else touches them (the event loop's thread owns them).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <sys/socket.h>

#include "_inline_disk.h"  /* the disk: layers, maps, reads and writes (tapdisk/) */
#include "_wire.h"  /* the wire: get16 ... put64, send_now */

/* The wire (the NBD protocol's doc/proto.md); every number is big-endian. */
#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_REPLY_MAGIC 0x67446698u
#define STRUCTURED_REPLY_MAGIC 0x668e33efu
#define REQUEST_SIZE 28        /* magic, flags, type, handle, offset, length */
#define SIMPLE_REPLY_SIZE 16   /* magic, error, handle */
#define DATA_CHUNK_SIZE 28     /* magic, flags, type, handle, length; offset */
#define HOLE_CHUNK_SIZE 32     /* magic, flags, type, handle, length; offset, hole size */
#define STATUS_CHUNK_SIZE 24 /* magic, flags, type, handle, length; context id */
#define CMD_READ 0
#define CMD_WRITE 1
#define CMD_BLOCK_STATUS 7
#define CMD_FLAG_FUA (1u << 0)
#define CMD_FLAG_DF (1u << 2)
#define CMD_FLAG_REQ_ONE (1u << 3)
#define REPLY_FLAG_DONE 1u
#define REPLY_TYPE_OFFSET_DATA 1u
#define REPLY_TYPE_OFFSET_HOLE 2u
#define REPLY_TYPE_BLOCK_STATUS 5u
#define SECTOR_MASK 511u
/* base:allocation's states; connection.py's limits of a block status answer (the module
 * exports them: a test compares) */
#define STATE_DATA 0
#define STATE_HOLE_ZERO 3  /* NBD_STATE_HOLE | NBD_STATE_ZERO */
#define STATUS_UNKNOWN AT_PYTHON  /* the Python path's, as locate says it */
#define MAX_STATUS_LENGTH (1ull << 31)
#define MAX_STATUS_EXTENTS 65536L



/* A successful simple reply to the request whose handle (as the client sent it) is at
 * ``handle``: SIMPLE_REPLY_SIZE bytes. */
static inline void put_simple_reply(unsigned char *reply, const unsigned char *handle)
{
    put32(reply, SIMPLE_REPLY_MAGIC);
    put32(reply + 4, 0);
    memcpy(reply + 8, handle, 8);
}

/* The header of a structured reply's one and last data chunk, of ``length`` bytes read
 * at ``offset``: DATA_CHUNK_SIZE bytes, the data to follow. */
static inline void put_data_chunk(unsigned char *reply, const unsigned char *handle,
                                  uint64_t offset, uint64_t length)
{
    put32(reply, STRUCTURED_REPLY_MAGIC);
    put16(reply + 4, REPLY_FLAG_DONE);
    put16(reply + 6, REPLY_TYPE_OFFSET_DATA);
    memcpy(reply + 8, handle, 8);
    put32(reply + 16, (uint32_t)(length + 8));
    put64(reply + 20, offset);
}

#define TAKE_NOT (-1)  /* take: the Python path's */
#define TAKE_DATA 0    /* take: a read to fill from the layers, or a write at *place */
#define TAKE_HOLE 1    /* take: a read all of zeros, answered by one hole chunk */

/* How a pass takes the request at ``req`` (whole, inside the disk: next_request), as far
 * as its flags and the map tell (a read may still find its bytes out of the page cache).
 * A read: every piece in a place the disk knows or reading as zeros; in a structured
 * session, zeros from end to end are one hole chunk (as VBD.zero_runs_now answers them,
 * asking no layer below), and a read partly of zeros is the Python path's (it answers in
 * a chunk per run). A write: to the top, within one block or cluster it holds. */
static int take(const struct disk *d, const unsigned char *req, uint32_t cmd,
                uint64_t offset, uint64_t length, int structured, uint64_t *place)
{
    uint32_t flags = get16(req + 4);
    uint64_t room, pos, zeros = 0;
    int at;
    if (cmd == CMD_WRITE) {
        if (!d->writes || (flags & ~CMD_FLAG_FUA))
            return TAKE_NOT;
        int64_t where = locate(d, offset, &room, 1, &at);
        if (where < 0 || room < length
                || !file_write_now(d, (uint64_t)where, length, flags & CMD_FLAG_FUA))
            return TAKE_NOT;
        *place = (uint64_t)where;
        return TAKE_DATA;
    }
    if (flags & ~(CMD_FLAG_FUA | (structured ? CMD_FLAG_DF : 0)))
        return TAKE_NOT;
    for (pos = 0; pos < length; pos += room < length - pos ? room : length - pos) {
        int64_t where = locate(d, offset + pos, &room, 0, &at);
        if (where == AT_PYTHON)
            return TAKE_NOT;
        if (where == AT_ZEROS)
            zeros += room < length - pos ? room : length - pos;
    }
    if (structured && zeros)
        return zeros == length ? TAKE_HOLE : TAKE_NOT;
    return TAKE_DATA;
}

/* Block status (the base:allocation context) of a qcow2 layer's cluster entry:
 * STATE_DATA, STATE_HOLE_ZERO, AT_HOLE (the layer below's) or STATUS_UNKNOWN (the
 * Python path's: a zero flag without its meaning, a reserved bit, a misaligned
 * cluster), as the qcow2 driver's status_now tells them (compressed clusters are data). */
static int qcow2_entry_state(const struct layer *l, uint64_t entry)
{
    if (entry & QCOW2_COMPRESSED)
        return STATE_DATA;
    if (entry & QCOW2_RESERVED_MASK)
        return STATUS_UNKNOWN;
    if (entry & QCOW2_ZERO)
        return l->zero_flag ? STATE_HOLE_ZERO : STATUS_UNKNOWN;
    uint64_t host = entry & QCOW2_OFFSET_MASK;
    if (host == 0)
        return AT_HOLE;
    return host & ((1ull << l->cluster_bits) - 1) ? STATUS_UNKNOWN : STATE_DATA;
}

/* The state of a qcow2 layer's byte ``off`` (qcow2_entry_state's answers) and in *room
 * the bytes from there on with the same one in this layer: the clusters after it in its
 * L2 table that say the same (looked at until ``want`` bytes are covered), or the rest of
 * an L1 entry without a table. */
static int qcow2_status(const struct layer *l, uint64_t off, uint64_t want, uint64_t *room)
{
    uint64_t cs = 1ull << l->cluster_bits;
    uint64_t cluster = off >> l->cluster_bits;
    uint64_t first = cluster % l->l2_entries;
    uint64_t within = off & (cs - 1);
    const uint64_t *table;
    if (!pinned_table(l, cluster / l->l2_entries, &table))
        return STATUS_UNKNOWN;
    if (table == NULL) {
        *room = (l->l2_entries - first) * cs - within;
        return AT_HOLE;
    }
    int state = qcow2_entry_state(l, __atomic_load_n(&table[first], __ATOMIC_ACQUIRE));
    uint64_t next = first + 1;
    if (state != STATUS_UNKNOWN)
        while (next < l->l2_entries && (next - first) * cs - within < want
               && qcow2_entry_state(l, __atomic_load_n(&table[next], __ATOMIC_ACQUIRE)) == state)
            next++;
    *room = (next - first) * cs - within;
    return state;
}

/* The same for a dynamic VHD layer (vhd_block: a block held is data, one without a BAT
 * entry the layer below's, one held in part the Python path's: its bitmap tells its
 * sectors). */
static int vhd_block_state(const struct layer *l, uint64_t blk)
{
    int held = vhd_block(l, blk);
    return held == 1 ? STATE_DATA : held;  /* (AT_HOLE, or AT_PYTHON: STATUS_UNKNOWN) */
}

static int vhd_status(const struct layer *l, uint64_t off, uint64_t want, uint64_t *room)
{
    uint64_t blk = off / l->block_bytes, within = off % l->block_bytes;
    int state = vhd_block_state(l, blk);
    uint64_t next = blk + 1;
    if (state != STATUS_UNKNOWN)
        while ((next - blk) * l->block_bytes - within < want
               && vhd_block_state(l, next) == state)
            next++;
    *room = (next - blk) * l->block_bytes - within;
    return state;
}

/* The block status of disk byte ``off``, as the driver stack's status_now tells it
 * (VBD.block_status_now): STATE_DATA, STATE_HOLE_ZERO (not held by any layer of a disk
 * without a parent, or past a smaller parent's end, or a qcow2 zero cluster), or
 * STATUS_UNKNOWN (the Python path's: among others a file at its own offsets, whose
 * holes the Python path asks the file system for); in *room the bytes from ``off`` that
 * have the same answer (at least one; the maps are read no further than ``want`` bytes,
 * the rest of the request: a small one costs no pass over a whole table or BAT). */
static int status_at(const struct disk *d, uint64_t off, uint64_t want, uint64_t *room)
{
    uint64_t left = UINT64_MAX, here = 0;
    for (int i = 0; i < d->layers; i++) {
        const struct layer *l = &d->layer[i];
        if (i > 0) {
            if (off >= l->size) {
                *room = left;
                return STATE_HOLE_ZERO;
            }
            if (l->size - off < left)
                left = l->size - off;
        }
        int state;
        if (l->kind == MAP_QCOW2)
            state = qcow2_status(l, off, want, &here);
        else if (l->kind == MAP_VHD)
            state = vhd_status(l, off, want, &here);
        else
            return STATUS_UNKNOWN;
        if (state == STATUS_UNKNOWN)
            return state;
        if (here < left)
            left = here;
        if (state != AT_HOLE) {
            *room = left;
            return state;
        }
    }
    *room = left;
    return d->holes_zero ? STATE_HOLE_ZERO : STATUS_UNKNOWN;
}

/* The block status of disk bytes [offset, offset + length) (whole sectors inside the
 * disk) as VBD.block_status_now answers it: runs of (length, state), neighbours of the
 * same state merged, the first ``max`` of them, written at ``out`` as the reply's
 * payload carries them (big-endian u32 pairs). How many, or -1 if a byte of the range is
 * the Python path's (or a run would not end on a sector boundary). */
static long status_runs(const struct disk *d, uint64_t offset, uint64_t length, long max,
                        unsigned char *out)
{
    uint64_t pos = offset, end = offset + length, run = 0;
    int state = STATUS_UNKNOWN;
    long n = 0;
    while (pos < end) {
        uint64_t room;
        int here = status_at(d, pos, end - pos, &room);
        if (here == STATUS_UNKNOWN)
            return -1;
        uint64_t step = room < end - pos ? room : end - pos;
        if (step & SECTOR_MASK)
            return -1;
        if (here != state) {
            if (state != STATUS_UNKNOWN) {
                put32(out + 8 * n, (uint32_t)run);
                put32(out + 8 * n + 4, (uint32_t)state);
                if (++n == max)
                    return n;
            }
            state = here;
            run = 0;
        }
        run += step;
        pos += step;
    }
    if (state != STATUS_UNKNOWN) {
        put32(out + 8 * n, (uint32_t)run);
        put32(out + 8 * n + 4, (uint32_t)state);
        n++;
    }
    return n;
}

/* Fill dst with a read that take() took (TAKE_DATA): disk_rw into one buffer. */
static int read_fill(const struct disk *d, unsigned char *dst, uint64_t length,
                     uint64_t offset)
{
    struct iovec iov = { dst, (size_t)length };
    return disk_rw(d, &iov, 1, length, offset, 0, 0);
}

/* The first request at rb[start:end] if it is whole (a write with all its payload) and
 * one the pass may take by its header (READ or WRITE of at most max_length, or, with a
 * ``status_id``, BLOCK_STATUS, its length cut to MAX_STATUS_LENGTH as connection.py
 * does; sectors inside the disk): its command, offset and length, and its size in the
 * buffer; else 0. */
static Py_ssize_t next_request(const unsigned char *rb, Py_ssize_t start, Py_ssize_t end,
                               uint64_t size, uint64_t max_length, uint32_t status_id,
                               uint32_t *cmd, uint64_t *offset, uint64_t *length)
{
    Py_ssize_t avail = end - start;
    if (avail < REQUEST_SIZE)
        return 0;
    const unsigned char *req = rb + start;
    *cmd = get16(req + 6);
    *offset = get64(req + 16);
    *length = get32(req + 24);
    if (get32(req) != REQUEST_MAGIC || *length == 0
            || ((*offset | *length) & SECTOR_MASK) || *offset > size
            || *length > size - *offset)
        return 0;
    if (*cmd == CMD_BLOCK_STATUS) {
        if (!status_id || (get16(req + 4) & ~(CMD_FLAG_FUA | CMD_FLAG_REQ_ONE)))
            return 0;
        if (*length > MAX_STATUS_LENGTH)
            *length = MAX_STATUS_LENGTH;
        return REQUEST_SIZE;
    }
    if (*length > max_length)
        return 0;
    if (*cmd == CMD_READ)
        return REQUEST_SIZE;
    if (*cmd == CMD_WRITE && (uint64_t)(avail - REQUEST_SIZE) >= *length)
        return REQUEST_SIZE + (Py_ssize_t)*length;
    return 0;
}


/* The requests at rb[start:end] a pass may take (up to ``left``), as disk ranges for
 * disk_open_for. */
struct requests {
    const struct disk *d;
    const unsigned char *rb;
    Py_ssize_t start, end;
    uint64_t max_length;
    uint32_t status_id;
    long left;
};

static int next_request_range(void *ctx, uint64_t *offset, uint64_t *length)
{
    struct requests *q = ctx;
    uint32_t cmd;
    if (q->left <= 0)
        return 0;
    Py_ssize_t took = next_request(q->rb, q->start, q->end, q->d->layer[0].size,
                                   q->max_length, q->status_id, &cmd, offset, length);
    q->start += took;
    q->left--;
    return took != 0;
}

/* Whether the first request at rb[start:end] is one a pass would take (a block status
 * as far as its header and its first byte tell: its answer is worked out once, in the
 * pass). */
static int servable(const struct disk *d, const unsigned char *rb, Py_ssize_t start,
                    Py_ssize_t end, uint64_t max_length, uint32_t status_id, int structured)
{
    uint32_t cmd;
    uint64_t offset, length, place;
    if (next_request(rb, start, end, d->layer[0].size, max_length, status_id, &cmd, &offset,
                     &length) == 0)
        return 0;
    if (cmd == CMD_BLOCK_STATUS)
        return status_at(d, offset, length, &place) != STATUS_UNKNOWN;
    return take(d, rb + start, cmd, offset, length, structured, &place) != TAKE_NOT;
}

#include "_inline_async.h"  /* AsyncPass: the pass for a disk that answers later */

PyDoc_STRVAR(nbd_pump_doc,
"nbd_pump(sock, rbuf, start, end, scratch, target, structured, max_requests, max_length,\n"
"         status_id=0)\n"
"--\n\n"
"Serve the READ and WRITE requests at rbuf[start:end] that the disk ``target`` (an\n"
"InlineTarget: its file, or its layers' files, and where its bytes are in them) can\n"
"serve now, up to ``max_requests`` of at most ``max_length`` bytes, sending their\n"
"replies on ``sock`` from ``scratch`` (structured replies if ``structured``; with a\n"
"``sock`` of -1 they are left in the scratch, for the caller to queue). With a\n"
"``status_id`` (base:allocation's context id, the only context of the session), the\n"
"BLOCK_STATUS requests whose answer the layers' maps tell too. The\n"
"caller holds target.guard, if any. Returns (start, reads, read_bytes, writes,\n"
"write_bytes, unsent, used, error, statuses): the position of the first request not\n"
"taken, what was served, the replies not sent because the socket was full\n"
"(scratch[unsent:used], for the caller to queue), the errno that broke the connection\n"
"(0: none) and the block status requests answered. The sectors each layer served to\n"
"reads are added to target.hits, if any.");

static PyObject *nbd_pump(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 9 && nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "nbd_pump takes 9 or 10 arguments");
        return NULL;
    }
    int sock = PyLong_AsLong(args[0]);
    Py_ssize_t start = PyLong_AsSsize_t(args[2]);
    Py_ssize_t end = PyLong_AsSsize_t(args[3]);
    int structured = PyObject_IsTrue(args[6]);
    long max_requests = PyLong_AsLong(args[7]);
    unsigned long max_length = PyLong_AsUnsignedLong(args[8]);
    unsigned long status_id = nargs == 10 ? PyLong_AsUnsignedLong(args[9]) : 0;
    if (PyErr_Occurred())
        return NULL;

    Py_buffer rbuf, scratch;
    struct disk disk;
    if (PyObject_GetBuffer(args[1], &rbuf, PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[4], &scratch, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&rbuf);
        return NULL;
    }
    if (start < 0 || end < start || end > rbuf.len) {
        PyErr_SetString(PyExc_ValueError, "start and end must lie within rbuf");
        goto fail;
    }
    if (!structured)
        status_id = 0;  /* (no context without structured replies) */
    struct requests ahead = { &disk, rbuf.buf, start, end, max_length, (uint32_t)status_id,
                              max_requests };
    if (disk_open_for(&disk, args[5], next_request_range, &ahead) < 0)
        goto fail;

    const unsigned char *rb = rbuf.buf;
    unsigned char *sb = scratch.buf;
    size_t cap = (size_t)scratch.len;
    size_t used = 0, sent = 0;
    unsigned long long reads = 0, read_bytes = 0, writes = 0, write_bytes = 0, statuses = 0;
    int error = 0, full = 0;
    const uint64_t size = disk.layer[0].size;
    const int fd = disk.layer[0].fd;
    const size_t read_header = structured ? DATA_CHUNK_SIZE : SIMPLE_REPLY_SIZE;

    /* Nothing to do for the first request (the Python path's): back at once, without
     * letting go of the interpreter lock (which costs the engine threads' turn). */
    if (!servable(&disk, rb, start, end, max_length, (uint32_t)status_id, structured)) {
        disk_close(&disk);
        PyBuffer_Release(&scratch);
        PyBuffer_Release(&rbuf);
        return Py_BuildValue("nKKKKnniK", start, 0ULL, 0ULL, 0ULL, 0ULL, (Py_ssize_t)0,
                             (Py_ssize_t)0, 0, 0ULL);
    }

    Py_BEGIN_ALLOW_THREADS
    for (long served = 0; served < max_requests; served++) {
        uint32_t cmd;
        uint64_t offset, length, place = 0;
        if (next_request(rb, start, end, size, max_length, (uint32_t)status_id, &cmd,
                         &offset, &length) == 0)
            break;
        const unsigned char *req = rb + start;
        int how = TAKE_DATA;
        long max_runs = 0;
        if (cmd == CMD_BLOCK_STATUS) {
            max_runs = get16(req + 4) & CMD_FLAG_REQ_ONE ? 1 : MAX_STATUS_EXTENTS;
        } else {
            how = take(&disk, req, cmd, offset, length, structured, &place);
            if (how == TAKE_NOT)
                break;
        }
        /* (a block status: room for the longest answer; it takes what it needs) */
        size_t need = cmd == CMD_BLOCK_STATUS ? STATUS_CHUNK_SIZE + 8 * (size_t)max_runs
                      : cmd == CMD_WRITE ? SIMPLE_REPLY_SIZE
                      : how == TAKE_HOLE ? HOLE_CHUNK_SIZE : read_header + length;
        if (need > cap)
            break;
        if (used + need > cap) {  /* the scratch is full: its replies leave first */
            if (sock < 0)
                break;  /* they are the caller's to queue */
            int rc = send_now(sock, sb, &sent, used);
            if (rc) {
                if (rc < 0)
                    error = -rc;
                else
                    full = 1;
                break;
            }
            used = sent = 0;
        }
        unsigned char *reply = sb + used;
        if (cmd == CMD_BLOCK_STATUS) {
            long runs = status_runs(&disk, offset, length, max_runs, reply + STATUS_CHUNK_SIZE);
            if (runs < 0)
                break;
            put32(reply, STRUCTURED_REPLY_MAGIC);
            put16(reply + 4, REPLY_FLAG_DONE);
            put16(reply + 6, REPLY_TYPE_BLOCK_STATUS);
            memcpy(reply + 8, req + 8, 8);
            put32(reply + 16, (uint32_t)(4 + 8 * runs));
            put32(reply + 20, (uint32_t)status_id);
            need = STATUS_CHUNK_SIZE + 8 * (size_t)runs;
            statuses++;
            start += REQUEST_SIZE;
        } else if (cmd == CMD_READ) {
            if (how == TAKE_DATA && read_fill(&disk, reply + read_header, length, offset) < 0)
                break;
            if (how == TAKE_HOLE) {  /* zeros from end to end: one hole chunk, no data */
                put32(reply, STRUCTURED_REPLY_MAGIC);
                put16(reply + 4, REPLY_FLAG_DONE);
                put16(reply + 6, REPLY_TYPE_OFFSET_HOLE);
                memcpy(reply + 8, req + 8, 8);
                put32(reply + 16, 12);
                put64(reply + 20, offset);
                put32(reply + 28, (uint32_t)length);
            } else if (structured) {
                put_data_chunk(reply, req + 8, offset, length);
            } else {
                put_simple_reply(reply, req + 8);
            }
            reads++;
            read_bytes += length;
            start += REQUEST_SIZE;
        } else {
            struct iovec payload = { (void *)(req + REQUEST_SIZE), (size_t)length };
            if (file_writev(fd, &payload, 1, length, place, get16(req + 4) & CMD_FLAG_FUA) < 0)
                break;  /* the Python path writes it again and reports what fails */
            put_simple_reply(reply, req + 8);
            writes++;
            write_bytes += length;
            start += REQUEST_SIZE + (Py_ssize_t)length;
        }
        used += need;
    }
    if (!error && !full && sock >= 0 && used > sent) {
        int rc = send_now(sock, sb, &sent, used);
        if (rc < 0)
            error = -rc;
    }
    Py_END_ALLOW_THREADS

    count_hits(&disk);
    disk_close(&disk);
    PyBuffer_Release(&scratch);
    PyBuffer_Release(&rbuf);
    return Py_BuildValue("nKKKKnniK", start, reads, read_bytes, writes, write_bytes,
                         (Py_ssize_t)sent, (Py_ssize_t)used, error, statuses);

fail:
    PyBuffer_Release(&scratch);
    PyBuffer_Release(&rbuf);
    return NULL;
}

static PyMethodDef methods[] = {
    {"nbd_pump", (PyCFunction)(void (*)(void))nbd_pump, METH_FASTCALL, nbd_pump_doc},
    {"reap", (PyCFunction)(void (*)(void))async_reap, METH_FASTCALL, async_reap_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "blktap.transport.nbd._inline",
    "The NBD transport's inline path, compiled (see inline.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__inline(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* AsyncPass is a hook of the selector's wait (a linked pass serves its connection
     * there): without io._poll (not built), it is a plain type, never linked. */
    PyTypeObject *hook_type = PyCapsule_Import(HOOK_CAPSULE, 0);
    if (hook_type == NULL)
        PyErr_Clear();
    else
        AsyncPassType.tp_base = hook_type;
    if (PyType_Ready(&AsyncPassType) < 0
            || PyModule_AddObjectRef(m, "AsyncPass", (PyObject *)&AsyncPassType) < 0
            || PyModule_AddIntConstant(m, "HOOKS", hook_type != NULL) < 0
            || PyModule_AddIntConstant(m, "LINK_BUFFER", LINK_BUFFER) < 0
            || PyModule_AddIntConstant(m, "BACK_NONE", BACK_NONE) < 0
            || PyModule_AddIntConstant(m, "BACK_REQUEST", BACK_REQUEST) < 0
            || PyModule_AddIntConstant(m, "BACK_STREAM", BACK_STREAM) < 0
            || PyModule_AddIntConstant(m, "BACK_FAILED", BACK_FAILED) < 0
            || PyModule_AddIntConstant(m, "BACK_SOCKET_FULL", BACK_SOCKET_FULL) < 0
            || PyModule_AddIntConstant(m, "BACK_BROKEN", BACK_BROKEN) < 0
            || disk_add_constants(m) < 0
            || PyModule_AddIntConstant(m, "MAX_STATUS_LENGTH", (long)MAX_STATUS_LENGTH) < 0
            || PyModule_AddIntConstant(m, "MAX_STATUS_EXTENTS", MAX_STATUS_EXTENTS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
