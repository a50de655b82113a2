/*
 * blktap.transport.nbd._inline: the NBD transport's inline path, compiled.
 *
 * One call takes the complete READ and WRITE requests at the front of a connection's
 * receive buffer that the kernel can serve without waiting (a raw file whose bytes sit at
 * their own offsets, in memory or in the page cache), does them with pread/pwrite,
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

#include <endian.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef RWF_DSYNC
#define RWF_DSYNC 0x00000002
#endif
#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

/* The wire (the NBD protocol's doc/proto.md); every number is big-endian. */
#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_REPLY_MAGIC 0x67446698u
#define STRUCTURED_REPLY_MAGIC 0x668e33efu
#define REQUEST_SIZE 28        /* magic, flags, type, handle, offset, length */
#define SIMPLE_REPLY_SIZE 16   /* magic, error, handle */
#define DATA_CHUNK_SIZE 28     /* magic, flags, type, handle, length; offset */
#define CMD_READ 0
#define CMD_WRITE 1
#define CMD_FLAG_FUA (1u << 0)
#define CMD_FLAG_DF (1u << 2)
#define REPLY_FLAG_DONE 1u
#define REPLY_TYPE_OFFSET_DATA 1u
#define SECTOR_MASK 511u

/* nbd_pump's mode bits (the module exports them: inline.mode). */
#define MODE_STRUCTURED 1u  /* the session negotiated structured replies */
#define MODE_MEMORY 2u      /* the file is in memory: reads never wait, writes are copies */
#define MODE_WRITABLE 4u    /* writes may be done here (a writable export, a file in memory) */

static inline uint16_t get16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static inline uint32_t get32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static inline uint64_t get64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }
static inline void put16(unsigned char *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static inline void put32(unsigned char *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static inline void put64(unsigned char *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }

/* A disk whose bytes sit in blocks of the file (a dynamic VHD): a block's data is at
 * (bat[block] + data_secs) sectors, when the block is allocated (bat[block] is not
 * 0xffffffff) and its bit in the batmap (most significant bit first) says every sector of
 * it is held. Anything else (unallocated: the parent's or zeros; partly held) is the Python
 * path's. Engine threads allocate blocks while a pass runs without the interpreter lock:
 * they store the BAT entry before the batmap bit, after the data, so the bit is loaded
 * first. No map: every byte at its own offset. */
struct block_map {
    const uint32_t *bat;
    size_t entries;
    const unsigned char *batmap;
    size_t batmap_len;
    uint64_t block_bytes;
    uint64_t data_secs;
};

/* The file offset of disk offset ``off``, and in *room the bytes from there to the end of
 * its block; -1 if the block is not wholly held. */
static int64_t map_offset(const struct block_map *m, uint64_t off, uint64_t *room)
{
    if (m->bat == NULL) {
        *room = UINT64_MAX;
        return (int64_t)off;
    }
    uint64_t blk = off / m->block_bytes, within = off % m->block_bytes;
    if (blk >= m->entries || (blk >> 3) >= m->batmap_len)
        return -1;
    unsigned char bits = __atomic_load_n(&m->batmap[blk >> 3], __ATOMIC_ACQUIRE);
    if (!(bits & (0x80u >> (blk & 7))))
        return -1;
    uint32_t entry = __atomic_load_n(&m->bat[blk], __ATOMIC_RELAXED);
    if (entry == 0xffffffffu)
        return -1;
    *room = m->block_bytes - within;
    return (int64_t)((entry + m->data_secs) * 512u + within);
}

/* Read all of [offset, offset + length) into dst. A file in memory never waits: a short
 * read is its end, and the rest reads as zeros (the Python path does the same). Otherwise
 * RWF_NOWAIT: anything not wholly in the page cache is left to the Python path (-1). */
static int read_now(int fd, unsigned char *dst, size_t length, uint64_t offset, int memory)
{
    size_t done = 0;
    while (done < length) {
        struct iovec iov = { dst + done, length - done };
        ssize_t n = preadv2(fd, &iov, 1, (off_t)(offset + done), memory ? 0 : RWF_NOWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0) {
            if (!memory)
                return -1;
            memset(dst + done, 0, length - done);
            return 0;
        }
        if (!memory && (size_t)n < length - done)
            return -1;  /* part of it is not cached */
        done += (size_t)n;
    }
    return 0;
}

static int write_all(int fd, const unsigned char *src, size_t length, uint64_t offset, int fua)
{
    size_t done = 0;
    while (done < length) {
        struct iovec iov = { (void *)(src + done), length - done };
        ssize_t n = pwritev2(fd, &iov, 1, (off_t)(offset + done), fua ? RWF_DSYNC : 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0)
            return -1;
        done += (size_t)n;
    }
    return 0;
}

/* A read through the map: every block it touches must be wholly held (checked before
 * anything is read), each piece read from its place in the file. */
static int read_mapped(const struct block_map *m, int fd, unsigned char *dst, uint64_t length,
                       uint64_t offset, int memory)
{
    uint64_t pos = 0, room;
    while (pos < length) {
        if (map_offset(m, offset + pos, &room) < 0)
            return -1;
        pos += room < length - pos ? room : length - pos;
    }
    for (pos = 0; pos < length;) {
        int64_t at = map_offset(m, offset + pos, &room);
        uint64_t n = room < length - pos ? room : length - pos;
        if (at < 0 || read_now(fd, dst + pos, n, (uint64_t)at, memory) < 0)
            return -1;
        pos += n;
    }
    return 0;
}

/* Send scratch[*sent:end] without waiting. 0: all of it left; 1: the socket is full (what
 * is left is the caller's to queue); -errno: the connection broke. */
static int send_now(int sock, const unsigned char *buf, size_t *sent, size_t end)
{
    while (*sent < end) {
        ssize_t n = send(sock, buf + *sent, end - *sent, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 1;
            return -errno;
        }
        *sent += (size_t)n;
    }
    return 0;
}

PyDoc_STRVAR(nbd_pump_doc,
"nbd_pump(sock, rbuf, start, end, scratch, fd, size, mode, max_requests, max_length\n"
"         [, bat, batmap, block_bytes, data_secs])\n"
"--\n\n"
"Serve the READ and WRITE requests at rbuf[start:end] that a file descriptor ``fd`` of\n"
"``size`` bytes can serve now, up to ``max_requests`` of at most ``max_length`` bytes,\n"
"sending their replies on ``sock`` from ``scratch``. With ``bat`` (uint32 entries, in\n"
"sectors) and ``batmap``, the disk's bytes are in blocks of ``block_bytes`` (a dynamic\n"
"VHD's), only those of blocks the batmap says are full are served, and a write only\n"
"within one block. Returns (start, reads, read_bytes,\n"
"writes, write_bytes, unsent, used, error): the position of the first request not taken,\n"
"what was served, the replies not sent because the socket was full (scratch[unsent:used],\n"
"for the caller to queue) and the errno that broke the connection (0: none).");

static PyObject *nbd_pump(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 10 && nargs != 14) {
        PyErr_SetString(PyExc_TypeError, "nbd_pump takes 10 or 14 arguments");
        return NULL;
    }
    int sock = PyLong_AsLong(args[0]);
    Py_ssize_t start = PyLong_AsSsize_t(args[2]);
    Py_ssize_t end = PyLong_AsSsize_t(args[3]);
    int fd = PyLong_AsLong(args[5]);
    unsigned long long size = PyLong_AsUnsignedLongLong(args[6]);
    unsigned long mode = PyLong_AsUnsignedLong(args[7]);
    long max_requests = PyLong_AsLong(args[8]);
    unsigned long max_length = PyLong_AsUnsignedLong(args[9]);
    if (PyErr_Occurred())
        return NULL;

    struct block_map map = { NULL, 0, NULL, 0, 0, 0 };
    Py_buffer rbuf, scratch, bat = { 0 }, batmap = { 0 };
    int have_map = nargs == 14 && args[10] != Py_None;
    if (have_map) {
        map.block_bytes = PyLong_AsUnsignedLongLong(args[12]);
        map.data_secs = PyLong_AsUnsignedLongLong(args[13]);
        if (PyErr_Occurred())
            return NULL;
        if (map.block_bytes == 0 || map.block_bytes % 512) {
            PyErr_SetString(PyExc_ValueError, "block_bytes must be a positive multiple of 512");
            return NULL;
        }
    }
    if (PyObject_GetBuffer(args[1], &rbuf, PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[4], &scratch, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&rbuf);
        return NULL;
    }
    if (have_map) {
        if (PyObject_GetBuffer(args[10], &bat, PyBUF_FORMAT) < 0)
            goto fail;
        if (bat.itemsize != 4 || bat.format == NULL || strcmp(bat.format, "I") != 0) {
            PyBuffer_Release(&bat);
            PyErr_SetString(PyExc_TypeError, "bat must be an array of 'I'");
            goto fail;
        }
        if (PyObject_GetBuffer(args[11], &batmap, PyBUF_SIMPLE) < 0) {
            PyBuffer_Release(&bat);
            goto fail;
        }
        map.bat = bat.buf;
        map.entries = (size_t)bat.len / 4;
        map.batmap = batmap.buf;
        map.batmap_len = (size_t)batmap.len;
    }
    if (start < 0 || end < start || end > rbuf.len) {
        PyErr_SetString(PyExc_ValueError, "start and end must lie within rbuf");
        goto fail_map;
    }

    const unsigned char *rb = rbuf.buf;
    unsigned char *sb = scratch.buf;
    size_t cap = (size_t)scratch.len;
    size_t used = 0, sent = 0;
    unsigned long long reads = 0, read_bytes = 0, writes = 0, write_bytes = 0;
    int error = 0, full = 0;
    const int structured = (mode & MODE_STRUCTURED) != 0;
    const int memory = (mode & MODE_MEMORY) != 0;
    const uint32_t read_flags = CMD_FLAG_FUA | (structured ? CMD_FLAG_DF : 0);
    const size_t read_header = structured ? DATA_CHUNK_SIZE : SIMPLE_REPLY_SIZE;

    Py_BEGIN_ALLOW_THREADS
    for (long served = 0; served < max_requests; served++) {
        Py_ssize_t avail = end - start;
        if (avail < REQUEST_SIZE)
            break;
        const unsigned char *req = rb + start;
        uint32_t flags = get16(req + 4);
        uint32_t cmd = get16(req + 6);
        uint64_t offset = get64(req + 16);
        uint64_t length = get32(req + 24);
        if (get32(req) != REQUEST_MAGIC || length == 0 || length > max_length
                || ((offset | length) & SECTOR_MASK) || offset > size || length > size - offset)
            break;
        size_t need = cmd == CMD_READ ? read_header + length : SIMPLE_REPLY_SIZE;
        if (cmd == CMD_READ) {
            if (flags & ~read_flags)
                break;
        } else if (cmd == CMD_WRITE) {
            if (!(mode & MODE_WRITABLE) || (flags & ~CMD_FLAG_FUA)
                    || (uint64_t)(avail - REQUEST_SIZE) < length)
                break;
        } else {
            break;
        }
        if (need > cap)
            break;
        if (used + need > cap) {  /* the scratch is full: its replies leave first */
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
        if (cmd == CMD_READ) {
            if (read_mapped(&map, fd, reply + read_header, length, offset, memory) < 0)
                break;
            if (structured) {
                put32(reply, STRUCTURED_REPLY_MAGIC);
                put16(reply + 4, REPLY_FLAG_DONE);
                put16(reply + 6, REPLY_TYPE_OFFSET_DATA);
                memcpy(reply + 8, req + 8, 8);  /* the handle, as the client sent it */
                put32(reply + 16, (uint32_t)(length + 8));
                put64(reply + 20, offset);
            } else {
                put32(reply, SIMPLE_REPLY_MAGIC);
                put32(reply + 4, 0);
                memcpy(reply + 8, req + 8, 8);
            }
            reads++;
            read_bytes += length;
            start += REQUEST_SIZE;
        } else {
            uint64_t room;
            int64_t at = map_offset(&map, offset, &room);
            if (at < 0 || room < length)
                break;  /* not all in one held block: the Python path's */
            if (write_all(fd, req + REQUEST_SIZE, length, (uint64_t)at, flags & CMD_FLAG_FUA) < 0)
                break;  /* the Python path writes it again and reports what fails */
            put32(reply, SIMPLE_REPLY_MAGIC);
            put32(reply + 4, 0);
            memcpy(reply + 8, req + 8, 8);
            writes++;
            write_bytes += length;
            start += REQUEST_SIZE + (Py_ssize_t)length;
        }
        used += need;
    }
    if (!error && !full && used > sent) {
        int rc = send_now(sock, sb, &sent, used);
        if (rc < 0)
            error = -rc;
    }
    Py_END_ALLOW_THREADS

    if (have_map) {
        PyBuffer_Release(&batmap);
        PyBuffer_Release(&bat);
    }
    PyBuffer_Release(&scratch);
    PyBuffer_Release(&rbuf);
    return Py_BuildValue("nKKKKnni", start, reads, read_bytes, writes, write_bytes,
                         (Py_ssize_t)sent, (Py_ssize_t)used, error);

fail_map:
    if (have_map) {
        PyBuffer_Release(&batmap);
        PyBuffer_Release(&bat);
    }
fail:
    PyBuffer_Release(&scratch);
    PyBuffer_Release(&rbuf);
    return NULL;
}

static PyMethodDef methods[] = {
    {"nbd_pump", (PyCFunction)(void (*)(void))nbd_pump, METH_FASTCALL, nbd_pump_doc},
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
    if (PyModule_AddIntConstant(m, "MODE_STRUCTURED", MODE_STRUCTURED) < 0
            || PyModule_AddIntConstant(m, "MODE_MEMORY", MODE_MEMORY) < 0
            || PyModule_AddIntConstant(m, "MODE_WRITABLE", MODE_WRITABLE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
