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
#define HOLE_CHUNK_SIZE 32     /* magic, flags, type, handle, length; offset, hole size */
#define CMD_READ 0
#define CMD_WRITE 1
#define CMD_FLAG_FUA (1u << 0)
#define CMD_FLAG_DF (1u << 2)
#define REPLY_FLAG_DONE 1u
#define REPLY_TYPE_OFFSET_DATA 1u
#define REPLY_TYPE_OFFSET_HOLE 2u
#define SECTOR_MASK 511u

/* nbd_pump's mode bits (the module exports them: inline.mode). */
#define MODE_STRUCTURED 1u  /* the session negotiated structured replies */
#define MODE_MEMORY 2u      /* the file is in memory: reads never wait, writes are copies */
#define MODE_WRITABLE 4u    /* writes may be done here (a writable export, a file in memory) */
#define MODE_HOLES_ZERO 8u  /* what the map leaves unallocated reads as zeros (no parent) */
#define MODE_ZERO_FLAG 16u  /* a qcow2 L2 entry's zero flag means zeros (version 3) */

static inline uint16_t get16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static inline uint32_t get32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static inline uint64_t get64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }
static inline void put16(unsigned char *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static inline void put32(unsigned char *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static inline void put64(unsigned char *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }

/* How a disk offset finds its place in the file: at its own offset (no map), through a
 * dynamic VHD's BAT, or through a qcow2 image's L2 tables.
 *
 * A dynamic VHD: a block's data is at (bat[block] + data_secs) sectors, when the block is
 * allocated (bat[block] is not 0xffffffff) and its bit in the batmap (most significant bit
 * first) says every sector of it is held. Anything else (unallocated: the parent's or
 * zeros; partly held) is the Python path's. Engine threads allocate blocks while a pass
 * runs without the interpreter lock: they store the BAT entry before the batmap bit,
 * after the data, so the bit is loaded first.
 *
 * A qcow2 image (without extended L2 entries): cluster c's L2 table is the one L1 entry
 * c / l2_entries points at, and its entry there says where the cluster is. Only plain
 * data clusters are served: a host offset, cluster aligned, no zero, compressed or
 * reserved bit; a write only to a cluster the image owns alone (COPIED). The tables are
 * the driver's cache (native-endian arrays of 64-bit words, keyed by their offset in the
 * file); the ones a pass needs are found and pinned before the interpreter lock is let go
 * (QCOW2_TABLES at most: a request whose table is not among them is the Python path's).
 * Engine threads change entries while a pass runs: a new cluster's entry is stored after
 * its data, and a cluster is only freed after its entry changed and under the target's
 * guard, which the caller holds for the whole pass.
 *
 * Where the disk has no parent (MODE_HOLES_ZERO), what is not allocated (a VHD block
 * without a BAT entry; a qcow2 L1 entry without a table, an L2 entry without a cluster)
 * reads as zeros, and so does a qcow2 cluster with the zero flag (MODE_ZERO_FLAG): such
 * reads are served too, without touching the file. */
#define MAP_PLAIN 0
#define MAP_VHD 1
#define MAP_QCOW2 2
#define QCOW2_TABLES 16
#define QCOW2_COPIED (1ull << 63)
#define QCOW2_COMPRESSED (1ull << 62)
#define QCOW2_ZERO 1ull
#define QCOW2_OFFSET_MASK 0x00fffffffffffe00ull
#define QCOW2_RESERVED_MASK 0x3f000000000001feull
#define AT_PYTHON (-1)  /* map_offset: the Python path's */
#define AT_ZEROS (-2)   /* map_offset: reads as zeros */

struct block_map {
    int kind;
    int holes_zero;  /* MODE_HOLES_ZERO */
    int zero_flag;   /* MODE_ZERO_FLAG */
    /* MAP_VHD */
    const uint32_t *bat;
    size_t entries;
    const unsigned char *batmap;
    size_t batmap_len;
    uint64_t block_bytes;
    uint64_t data_secs;
    /* MAP_QCOW2 */
    unsigned cluster_bits;
    uint64_t l2_entries;
    int tables;
    uint64_t table_l1[QCOW2_TABLES];         /* the L1 index each pinned table serves */
    const uint64_t *table_words[QCOW2_TABLES];  /* NULL: no table (holes, zeros) */
};

/* The file offset of disk offset ``off``, and in *room the bytes from there to the end of
 * its block (or cluster); AT_ZEROS if it reads as zeros (never for a write: ``write``);
 * AT_PYTHON if the Python path must serve it. */
static int64_t map_offset(const struct block_map *m, uint64_t off, uint64_t *room, int write)
{
    if (m->kind == MAP_PLAIN) {
        *room = UINT64_MAX;
        return (int64_t)off;
    }
    if (m->kind == MAP_QCOW2) {
        uint64_t cluster = off >> m->cluster_bits;
        uint64_t cs = 1ull << m->cluster_bits;
        uint64_t l1i = cluster / m->l2_entries;
        uint64_t within = off & (cs - 1);
        int slot = -1;
        for (int i = 0; i < m->tables; i++) {
            if (m->table_l1[i] == l1i) {
                slot = i;
                break;
            }
        }
        if (slot < 0)
            return AT_PYTHON;
        *room = cs - within;
        const uint64_t *table = m->table_words[slot];
        if (table == NULL)  /* pinned as a hole: only where holes read as zeros */
            return write ? AT_PYTHON : AT_ZEROS;
        uint64_t entry = __atomic_load_n(&table[cluster % m->l2_entries], __ATOMIC_ACQUIRE);
        uint64_t host = entry & QCOW2_OFFSET_MASK;
        if (entry & (QCOW2_COMPRESSED | QCOW2_RESERVED_MASK))
            return AT_PYTHON;
        if (entry & QCOW2_ZERO)
            return m->zero_flag && !write ? AT_ZEROS : AT_PYTHON;
        if (host == 0)
            return m->holes_zero && !write ? AT_ZEROS : AT_PYTHON;
        if ((host & (cs - 1)) || (write && !(entry & QCOW2_COPIED)))
            return AT_PYTHON;
        return (int64_t)(host + within);
    }
    uint64_t blk = off / m->block_bytes, within = off % m->block_bytes;
    if (blk >= m->entries || (blk >> 3) >= m->batmap_len)
        return AT_PYTHON;
    *room = m->block_bytes - within;
    unsigned char bits = __atomic_load_n(&m->batmap[blk >> 3], __ATOMIC_ACQUIRE);
    uint32_t entry = __atomic_load_n(&m->bat[blk], __ATOMIC_RELAXED);
    if (!(bits & (0x80u >> (blk & 7))))  /* not wholly held: zeros if not allocated at all */
        return entry == 0xffffffffu && m->holes_zero && !write ? AT_ZEROS : AT_PYTHON;
    if (entry == 0xffffffffu)
        return AT_PYTHON;
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

/* A read through the map: every block it touches must be wholly held or read as zeros
 * (checked before anything is read), each piece read from its place in the file.
 * Returns 0 (dst filled), 1 (all of it reads as zeros and ``hole_reply``: dst left
 * alone, for a hole chunk to say so) or -1 (the Python path's). With ``hole_reply`` (a
 * structured reply), a read partly of zeros is the Python path's too: it answers it in a
 * chunk per run. */
static int read_mapped(const struct block_map *m, int fd, unsigned char *dst, uint64_t length,
                       uint64_t offset, int memory, int hole_reply)
{
    uint64_t pos = 0, room, zeros = 0;
    while (pos < length) {
        int64_t at = map_offset(m, offset + pos, &room, 0);
        uint64_t n = room < length - pos ? room : length - pos;
        if (at == AT_PYTHON)
            return -1;
        if (at == AT_ZEROS)
            zeros += n;
        pos += n;
    }
    if (hole_reply && zeros == length)
        return 1;
    if (hole_reply && zeros)
        return -1;
    for (pos = 0; pos < length;) {
        int64_t at = map_offset(m, offset + pos, &room, 0);
        uint64_t n = room < length - pos ? room : length - pos;
        if (at == AT_ZEROS)
            memset(dst + pos, 0, n);
        else if (at < 0 || read_now(fd, dst + pos, n, (uint64_t)at, memory) < 0)
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

/* The first request at rb[start:end] if it is whole (a write with all its payload) and
 * one the pass may take by its header (READ or WRITE, sectors inside the disk, at most
 * max_length): its command, offset and length, and its size in the buffer; else 0. */
static Py_ssize_t next_request(const unsigned char *rb, Py_ssize_t start, Py_ssize_t end,
                               uint64_t size, uint64_t max_length, uint32_t *cmd,
                               uint64_t *offset, uint64_t *length)
{
    Py_ssize_t avail = end - start;
    if (avail < REQUEST_SIZE)
        return 0;
    const unsigned char *req = rb + start;
    *cmd = get16(req + 6);
    *offset = get64(req + 16);
    *length = get32(req + 24);
    if (get32(req) != REQUEST_MAGIC || *length == 0 || *length > max_length
            || ((*offset | *length) & SECTOR_MASK) || *offset > size
            || *length > size - *offset)
        return 0;
    if (*cmd == CMD_READ)
        return REQUEST_SIZE;
    if (*cmd == CMD_WRITE && (uint64_t)(avail - REQUEST_SIZE) >= *length)
        return REQUEST_SIZE + (Py_ssize_t)*length;
    return 0;
}

/* Pin the L2 table of L1 index l1i (the interpreter lock held): 1 if it is pinned, 0 if
 * it is not in the cache (or the L1 entry points at none, or there is no room left),
 * -1 with an exception set if the table is not an array of 64-bit words. */
static int pin_table(struct block_map *m, Py_buffer *pinned, const uint64_t *l1,
                     size_t l1_len, PyObject *cache, uint64_t l1i)
{
    for (int i = 0; i < m->tables; i++)
        if (m->table_l1[i] == l1i)
            return 1;
    if (l1i >= l1_len || m->tables == QCOW2_TABLES)
        return 0;
    uint64_t at = l1[l1i] & QCOW2_OFFSET_MASK;
    if (at == 0) {  /* no table: all holes, which only a disk without a parent serves */
        if (!m->holes_zero)
            return 0;
        m->table_l1[m->tables] = l1i;
        m->table_words[m->tables] = NULL;
        pinned[m->tables].obj = NULL;
        m->tables++;
        return 1;
    }
    PyObject *key = PyLong_FromUnsignedLongLong(at);
    if (key == NULL)
        return -1;
    PyObject *table = PyDict_GetItemWithError(cache, key);  /* borrowed */
    Py_DECREF(key);
    if (table == NULL)
        return PyErr_Occurred() ? -1 : 0;
    Py_buffer *view = &pinned[m->tables];
    if (PyObject_GetBuffer(table, view, PyBUF_FORMAT) < 0)
        return -1;
    if (view->itemsize != 8 || view->format == NULL || strcmp(view->format, "Q") != 0
            || (uint64_t)view->len < m->l2_entries * 8) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_TypeError, "an L2 table must be an array of 'Q' of l2_entries");
        return -1;
    }
    m->table_l1[m->tables] = l1i;
    m->table_words[m->tables] = view->buf;
    m->tables++;
    return 1;
}

/* Pin the L2 tables the requests at rb[start:end] touch, in order, until one is missing. */
static int pin_tables(struct block_map *m, Py_buffer *pinned, PyObject *l1_obj,
                      PyObject *cache, const unsigned char *rb, Py_ssize_t start,
                      Py_ssize_t end, uint64_t size, uint64_t max_length, long max_requests)
{
    Py_buffer l1;
    if (PyObject_GetBuffer(l1_obj, &l1, PyBUF_FORMAT) < 0)
        return -1;
    if (l1.itemsize != 8 || l1.format == NULL || strcmp(l1.format, "Q") != 0) {
        PyBuffer_Release(&l1);
        PyErr_SetString(PyExc_TypeError, "l1 must be an array of 'Q'");
        return -1;
    }
    if (!PyDict_Check(cache)) {
        PyBuffer_Release(&l1);
        PyErr_SetString(PyExc_TypeError, "l2_tables must be a dict");
        return -1;
    }
    const uint64_t *words = l1.buf;
    size_t l1_len = (size_t)l1.len / 8;
    int rc = 0;
    for (long n = 0; n < max_requests; n++) {
        uint32_t cmd;
        uint64_t offset, length;
        Py_ssize_t took = next_request(rb, start, end, size, max_length, &cmd, &offset,
                                       &length);
        if (took == 0)
            break;
        uint64_t per_table = m->l2_entries << m->cluster_bits;
        uint64_t first = offset / per_table, last = (offset + length - 1) / per_table;
        int ok = 1;
        for (uint64_t l1i = first; l1i <= last && ok == 1; l1i++)
            ok = pin_table(m, pinned, words, l1_len, cache, l1i);
        if (ok < 0)
            rc = -1;
        if (ok != 1)
            break;
        start += took;
    }
    PyBuffer_Release(&l1);
    return rc;
}

static void unpin_tables(struct block_map *m, Py_buffer *pinned)
{
    for (int i = 0; i < m->tables; i++)
        if (m->table_words[i] != NULL)
            PyBuffer_Release(&pinned[i]);
    m->tables = 0;
}

PyDoc_STRVAR(nbd_pump_doc,
"nbd_pump(sock, rbuf, start, end, scratch, fd, size, mode, max_requests, max_length\n"
"         [, bat, batmap, block_bytes, data_secs[, l1, l2_tables, cluster_bits,\n"
"         l2_entries]])\n"
"--\n\n"
"Serve the READ and WRITE requests at rbuf[start:end] that a file descriptor ``fd`` of\n"
"``size`` bytes can serve now, up to ``max_requests`` of at most ``max_length`` bytes,\n"
"sending their replies on ``sock`` from ``scratch``. With ``bat`` (uint32 entries, in\n"
"sectors) and ``batmap``, the disk's bytes are in blocks of ``block_bytes`` (a dynamic\n"
"VHD's), only those of blocks the batmap says are full are served, and a write only\n"
"within one block. With ``l1`` (an array of 'Q') and ``l2_tables`` (a dict of arrays of\n"
"'Q' by their offset in the file), the disk is a qcow2 image's of clusters of\n"
"2**cluster_bits bytes: only its plain data clusters are served, a write only within\n"
"one cluster it owns (the caller holds the guard that keeps clusters from being freed).\n"
"Returns (start, reads, read_bytes, writes, write_bytes, unsent, used, error): the\n"
"position of the first request not taken, what was served, the replies not sent because\n"
"the socket was full (scratch[unsent:used], for the caller to queue) and the errno that\n"
"broke the connection (0: none).");

static PyObject *nbd_pump(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 10 && nargs != 14 && nargs != 18) {
        PyErr_SetString(PyExc_TypeError, "nbd_pump takes 10, 14 or 18 arguments");
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

    struct block_map map;
    memset(&map, 0, sizeof map);
    map.holes_zero = (mode & MODE_HOLES_ZERO) != 0;
    map.zero_flag = (mode & MODE_ZERO_FLAG) != 0;
    Py_buffer rbuf, scratch, bat = { 0 }, batmap = { 0 };
    Py_buffer pinned[QCOW2_TABLES];
    int have_bat = nargs >= 14 && args[10] != Py_None;
    int have_l1 = nargs == 18 && args[14] != Py_None;
    if (have_bat && have_l1) {
        PyErr_SetString(PyExc_ValueError, "a disk has a BAT or an L1 table, not both");
        return NULL;
    }
    if (have_bat) {
        map.kind = MAP_VHD;
        map.block_bytes = PyLong_AsUnsignedLongLong(args[12]);
        map.data_secs = PyLong_AsUnsignedLongLong(args[13]);
        if (PyErr_Occurred())
            return NULL;
        if (map.block_bytes == 0 || map.block_bytes % 512) {
            PyErr_SetString(PyExc_ValueError, "block_bytes must be a positive multiple of 512");
            return NULL;
        }
    }
    if (have_l1) {
        map.kind = MAP_QCOW2;
        unsigned long bits = PyLong_AsUnsignedLong(args[16]);
        map.l2_entries = PyLong_AsUnsignedLongLong(args[17]);
        if (PyErr_Occurred())
            return NULL;
        if (bits < 9 || bits > 21 || map.l2_entries == 0
                || map.l2_entries > (1ull << bits) / 8) {
            PyErr_SetString(PyExc_ValueError, "cluster_bits must be 9 to 21, l2_entries "
                            "positive and at most a cluster's 64-bit words");
            return NULL;
        }
        map.cluster_bits = (unsigned)bits;
    }
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
    if (have_bat) {
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
    if (have_l1 && pin_tables(&map, pinned, args[14], args[15], rbuf.buf, start, end, size,
                              max_length, max_requests) < 0) {
        unpin_tables(&map, pinned);
        goto fail;
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
        uint32_t cmd;
        uint64_t offset, length;
        if (next_request(rb, start, end, size, max_length, &cmd, &offset, &length) == 0)
            break;
        const unsigned char *req = rb + start;
        uint32_t flags = get16(req + 4);
        size_t need = cmd == CMD_READ ? read_header + length : SIMPLE_REPLY_SIZE;
        if (cmd == CMD_READ ? (flags & ~read_flags) != 0
                : !(mode & MODE_WRITABLE) || (flags & ~CMD_FLAG_FUA))
            break;
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
            int got = read_mapped(&map, fd, reply + read_header, length, offset, memory,
                                  structured);
            if (got < 0)
                break;
            if (got == 1) {  /* zeros from end to end: one hole chunk, no data */
                put32(reply, STRUCTURED_REPLY_MAGIC);
                put16(reply + 4, REPLY_FLAG_DONE);
                put16(reply + 6, REPLY_TYPE_OFFSET_HOLE);
                memcpy(reply + 8, req + 8, 8);
                put32(reply + 16, 12);
                put64(reply + 20, offset);
                put32(reply + 28, (uint32_t)length);
                need = HOLE_CHUNK_SIZE;
            } else if (structured) {
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
            int64_t at = map_offset(&map, offset, &room, 1);
            if (at < 0 || room < length)
                break;  /* not all in one held block (or owned cluster): the Python path's */
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

    if (have_bat) {
        PyBuffer_Release(&batmap);
        PyBuffer_Release(&bat);
    }
    unpin_tables(&map, pinned);
    PyBuffer_Release(&scratch);
    PyBuffer_Release(&rbuf);
    return Py_BuildValue("nKKKKnni", start, reads, read_bytes, writes, write_bytes,
                         (Py_ssize_t)sent, (Py_ssize_t)used, error);

fail:
    if (have_bat && bat.obj != NULL) {
        PyBuffer_Release(&batmap);
        PyBuffer_Release(&bat);
    }
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
            || PyModule_AddIntConstant(m, "MODE_WRITABLE", MODE_WRITABLE) < 0
            || PyModule_AddIntConstant(m, "MODE_HOLES_ZERO", MODE_HOLES_ZERO) < 0
            || PyModule_AddIntConstant(m, "MODE_ZERO_FLAG", MODE_ZERO_FLAG) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
