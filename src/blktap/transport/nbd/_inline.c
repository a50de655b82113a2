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

#include <endian.h>
#include <errno.h>
#include <stddef.h>
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


static inline uint16_t get16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static inline uint32_t get32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static inline uint64_t get64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }
static inline void put16(unsigned char *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static inline void put32(unsigned char *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static inline void put64(unsigned char *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }

/* The disk, as nbd_pump's ``target`` describes it (an InlineTarget, tapdisk/driver.py,
 * whose fields are read by position: T_*). Its bytes are in a stack of layers, the top
 * first: each a file descriptor whose bytes are at their own offsets (MAP_PLAIN: a raw
 * file, a fixed VHD), in blocks placed by a BAT (MAP_VHD: a dynamic VHD), or in clusters
 * placed by L2 tables (MAP_QCOW2). Only the top is written.
 *
 * A dynamic VHD: a block's data is at (bat[block] + data_secs) sectors, when the block is
 * allocated (bat[block] is not 0xffffffff) and its bit in the batmap (most significant bit
 * first) says every sector of it is held. A block not allocated at all is the next
 * layer's (the parent's), or zeros below the last layer when the disk has no parent
 * (holes_zero); one allocated but not full is the Python path's (it merges sectors of
 * several layers). Engine threads allocate blocks of the top layer while a pass runs
 * without the interpreter lock: they store the BAT entry before the batmap bit, after the
 * data, so the bit is loaded first. The layers below are read-only: only reads go there.
 * A parent smaller than the disk reads as zeros past its end, as Driver.forward_read
 * makes it.
 *
 * A qcow2 image (without extended L2 entries): cluster c's L2 table is the one L1 entry
 * c / l2_entries points at, and its entry there says where the cluster is. Plain data
 * clusters are served: a host offset, cluster aligned, no zero, compressed or reserved
 * bit; a write only to a cluster the image owns alone (COPIED). An L1 entry without a
 * table and an L2 entry without a cluster are the next layer's, as a VHD block without a
 * BAT entry is; a zero cluster reads as zeros where the flag means that (zero_flag:
 * version 3).
 * The tables are the driver's cache (native-endian arrays of 64-bit words, keyed by their
 * offset in the file); the ones a pass needs are found and pinned before the interpreter
 * lock is let go (QCOW2_TABLES at most: a request whose table is not among them is the
 * Python path's). Engine threads change entries while a pass runs: a new cluster's entry
 * is stored after its data, and a cluster is only freed after its entry changed and under
 * the target's guard, which the caller holds for the whole pass. */
enum {
    T_FD, T_SIZE, T_MEMORY, T_WRITES, T_BAT, T_BATMAP, T_BLOCK_BYTES, T_DATA_SECS, T_L1,
    T_L2_TABLES, T_CLUSTER_BITS, T_L2_ENTRIES, T_GUARD, T_HOLES_ZERO, T_ZERO_FLAG, T_BELOW,
    T_HITS, T_FIELDS
};
#define MAP_PLAIN 0
#define MAP_VHD 1
#define MAP_QCOW2 2
#define MAX_LAYERS 256
#define QCOW2_TABLES 16
#define MAX_QCOW2_LAYERS 16  /* qcow2 layers of one disk the inline path reads through */
#define QCOW2_COPIED (1ull << 63)
#define QCOW2_COMPRESSED (1ull << 62)
#define QCOW2_ZERO 1ull
#define QCOW2_OFFSET_MASK 0x00fffffffffffe00ull
#define QCOW2_RESERVED_MASK 0x3f000000000001feull
#define AT_PYTHON (-1)  /* locate: the Python path's */
#define AT_ZEROS (-2)   /* locate: reads as zeros */

/* A qcow2 layer's L2 tables pinned for one pass: by L1 index, NULL for an L1 entry that
 * points at no table (all holes). */
struct qcow2_tables {
    int count;
    uint64_t l1i[QCOW2_TABLES];
    const uint64_t *words[QCOW2_TABLES];
    Py_buffer views[QCOW2_TABLES];
};

struct layer {
    int kind;
    int fd;
    int memory;  /* in memory: reads never wait, a short read is the end of the file */
    uint64_t size;
    /* MAP_VHD */
    const uint32_t *bat;
    size_t entries;
    const unsigned char *batmap;
    size_t batmap_len;
    uint64_t block_bytes;
    uint64_t data_secs;
    Py_buffer bat_view, batmap_view;
    /* MAP_QCOW2 */
    unsigned cluster_bits;
    uint64_t l2_entries;
    int zero_flag;  /* the zero flag means zeros (version 3) */
    PyObject *l1, *l2_tables;  /* borrowed from the target, for pinning */
    struct qcow2_tables tables;  /* last: layer_open clears what comes before it only */
};

#define FEW_LAYERS 4  /* a disk of at most this many layers needs no allocation per pass */

struct disk {
    int writes;      /* writes may be done (to the top layer) */
    int holes_zero;  /* no parent below the last layer */
    int layers;
    struct layer *layer;  /* layer[0]: the top (few, or allocated for a deeper chain) */
    uint64_t *read_secs;  /* sectors of this pass's reads each layer served */
    Py_buffer hits;       /* the target's hits, if any (obj NULL: none) */
    struct layer few[FEW_LAYERS];
    uint64_t few_secs[FEW_LAYERS];
};

#define AT_HOLE (-3)  /* locate_qcow2: not in this layer (the next one's) */

/* Where a qcow2 layer has disk offset ``off``: its offset in the file, AT_HOLE (the
 * layer below's), AT_ZEROS or AT_PYTHON; *room: the bytes to the end of the cluster. */
static int64_t locate_qcow2(const struct layer *l, uint64_t off, uint64_t *room, int write)
{
    uint64_t cluster = off >> l->cluster_bits;
    uint64_t cs = 1ull << l->cluster_bits;
    uint64_t l1i = cluster / l->l2_entries;
    uint64_t within = off & (cs - 1);
    const struct qcow2_tables *t = &l->tables;
    int slot = -1;
    for (int i = 0; i < t->count; i++) {
        if (t->l1i[i] == l1i) {
            slot = i;
            break;
        }
    }
    if (slot < 0)
        return AT_PYTHON;
    *room = cs - within;
    const uint64_t *table = t->words[slot];
    if (table == NULL)
        return AT_HOLE;
    uint64_t entry = __atomic_load_n(&table[cluster % l->l2_entries], __ATOMIC_ACQUIRE);
    uint64_t host = entry & QCOW2_OFFSET_MASK;
    if (entry & (QCOW2_COMPRESSED | QCOW2_RESERVED_MASK))
        return AT_PYTHON;
    if (entry & QCOW2_ZERO)
        return l->zero_flag && !write ? AT_ZEROS : AT_PYTHON;
    if (host == 0)
        return AT_HOLE;
    if ((host & (cs - 1)) || (write && !(entry & QCOW2_COPIED)))
        return AT_PYTHON;
    return (int64_t)(host + within);
}

/* Where disk offset ``off`` is: its offset in the file of layer *at, and in *room the bytes
 * from there on that stay in the same place (to the end of a block or cluster, or of a
 * parent smaller than the disk); AT_ZEROS if it reads as zeros (never for a ``write``);
 * AT_PYTHON if the Python path must serve it. */
static int64_t locate(const struct disk *d, uint64_t off, uint64_t *room, int write, int *at)
{
    uint64_t left = UINT64_MAX, here;
    for (int i = 0; i < d->layers; i++) {
        const struct layer *l = &d->layer[i];
        *at = i;
        if (i > 0) {
            if (write)
                return AT_PYTHON;  /* only the top is written, and only where it holds */
            if (off >= l->size) {  /* past a smaller parent's end: zeros */
                *at = i - 1;
                *room = left;
                return AT_ZEROS;
            }
            if (l->size - off < left)
                left = l->size - off;
        }
        if (l->kind == MAP_PLAIN) {
            *room = left;
            return (int64_t)off;
        }
        if (l->kind == MAP_QCOW2) {
            int64_t where = locate_qcow2(l, off, &here, write);
            if (where == AT_PYTHON)
                return AT_PYTHON;
            if (here < left)
                left = here;
            if (where == AT_HOLE)
                continue;
            *room = left;
            return where;
        }
        uint64_t blk = off / l->block_bytes, within = off % l->block_bytes;
        if (blk >= l->entries || (blk >> 3) >= l->batmap_len)
            return AT_PYTHON;
        if (l->block_bytes - within < left)
            left = l->block_bytes - within;
        unsigned char bits = __atomic_load_n(&l->batmap[blk >> 3], __ATOMIC_ACQUIRE);
        uint32_t entry = __atomic_load_n(&l->bat[blk], __ATOMIC_RELAXED);
        if (bits & (0x80u >> (blk & 7))) {
            if (entry == 0xffffffffu)
                return AT_PYTHON;
            *room = left;
            return (int64_t)((entry + l->data_secs) * 512u + within);
        }
        if (entry != 0xffffffffu)
            return AT_PYTHON;  /* partly held: sectors of several layers */
    }
    *room = left;  /* below every layer: zeros if the disk has no parent */
    return d->holes_zero && !write ? AT_ZEROS : AT_PYTHON;
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
        if (where < 0 || room < length)
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

/* Fill dst with a read that take() took (TAKE_DATA), each piece from its place; the
 * sectors each layer served are added to d->read_secs. -1: a piece was not all there
 * now (out of the page cache, an error, a map that changed): the Python path's. */
static int read_fill(const struct disk *d, unsigned char *dst, uint64_t length,
                     uint64_t offset)
{
    uint64_t room;
    int at;
    for (uint64_t pos = 0; pos < length;) {
        int64_t where = locate(d, offset + pos, &room, 0, &at);
        uint64_t n = room < length - pos ? room : length - pos;
        if (where == AT_ZEROS)
            memset(dst + pos, 0, n);
        else if (where < 0 || read_now(d->layer[at].fd, dst + pos, n, (uint64_t)where,
                                       d->layer[at].memory) < 0)
            return -1;
        d->read_secs[at] += n / 512;
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

/* Pin a qcow2 layer's L2 table of L1 index l1i (the interpreter lock held): 1 if it is
 * pinned (NULL for an L1 entry that points at none: all holes), 0 if it is not in the
 * cache (or there is no room left), -1 with an exception set if the table is not an
 * array of 64-bit words. */
static int pin_table(struct layer *l, const uint64_t *l1, size_t l1_len, uint64_t l1i)
{
    struct qcow2_tables *t = &l->tables;
    for (int i = 0; i < t->count; i++)
        if (t->l1i[i] == l1i)
            return 1;
    if (l1i >= l1_len || t->count == QCOW2_TABLES)
        return 0;
    uint64_t at = l1[l1i] & QCOW2_OFFSET_MASK;
    if (at == 0) {
        t->l1i[t->count] = l1i;
        t->words[t->count] = NULL;
        t->count++;
        return 1;
    }
    PyObject *key = PyLong_FromUnsignedLongLong(at);
    if (key == NULL)
        return -1;
    PyObject *table = PyDict_GetItemWithError(l->l2_tables, key);  /* borrowed */
    Py_DECREF(key);
    if (table == NULL)
        return PyErr_Occurred() ? -1 : 0;
    Py_buffer *view = &t->views[t->count];
    if (PyObject_GetBuffer(table, view, PyBUF_FORMAT) < 0)
        return -1;
    if (view->itemsize != 8 || view->format == NULL || strcmp(view->format, "Q") != 0
            || (uint64_t)view->len < l->l2_entries * 8) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_TypeError, "an L2 table must be an array of 'Q' of l2_entries");
        return -1;
    }
    t->l1i[t->count] = l1i;
    t->words[t->count] = view->buf;
    t->count++;
    return 1;
}

/* Pin the L2 tables of the qcow2 layers the requests at rb[start:end] touch, in order,
 * until one is missing. */
static int pin_tables(struct disk *d, const unsigned char *rb, Py_ssize_t start,
                      Py_ssize_t end, uint64_t max_length, long max_requests)
{
    Py_buffer l1s[MAX_QCOW2_LAYERS];
    int have = 0, rc = 0, done = 0;
    for (int i = 0; i < d->layers && rc == 0; i++) {
        struct layer *l = &d->layer[i];
        if (l->kind != MAP_QCOW2)
            continue;
        Py_buffer *v = &l1s[have];
        if (PyObject_GetBuffer(l->l1, v, PyBUF_FORMAT) < 0) {
            rc = -1;
            break;
        }
        have++;
        if (v->itemsize != 8 || v->format == NULL || strcmp(v->format, "Q") != 0) {
            PyErr_SetString(PyExc_TypeError, "l1 must be an array of 'Q'");
            rc = -1;
        } else if (!PyDict_Check(l->l2_tables)) {
            PyErr_SetString(PyExc_TypeError, "l2_tables must be a dict");
            rc = -1;
        }
    }
    for (long n = 0; n < max_requests && rc == 0 && !done; n++) {
        uint32_t cmd;
        uint64_t offset, length;
        Py_ssize_t took = next_request(rb, start, end, d->layer[0].size, max_length, &cmd,
                                       &offset, &length);
        if (took == 0)
            break;
        int k = 0;
        for (int i = 0; i < d->layers && !done; i++) {
            struct layer *l = &d->layer[i];
            if (l->kind != MAP_QCOW2)
                continue;
            const uint64_t *words = l1s[k].buf;
            size_t l1_len = (size_t)l1s[k].len / 8;
            k++;
            uint64_t per_table = l->l2_entries << l->cluster_bits;
            uint64_t first = offset / per_table, last = (offset + length - 1) / per_table;
            for (uint64_t l1i = first; l1i <= last; l1i++) {
                int ok = pin_table(l, words, l1_len, l1i);
                if (ok < 0)
                    rc = -1;
                if (ok != 1) {
                    done = 1;
                    break;
                }
            }
        }
        start += took;
    }
    for (int k = 0; k < have; k++)
        PyBuffer_Release(&l1s[k]);
    return rc;
}

/* One layer from a target (the top, or one of its ``below``), the interpreter lock held:
 * its descriptor, size and place in memory, and its BAT and batmap (pinned) or its qcow2
 * geometry. */
static PyObject **target_fields(PyObject *target)
{
    if (!PyTuple_Check(target) || PyTuple_GET_SIZE(target) < T_FIELDS) {
        PyErr_Format(PyExc_TypeError, "a target must be an InlineTarget (a tuple of %d)",
                     T_FIELDS);
        return NULL;
    }
    return &PyTuple_GET_ITEM(target, 0);
}

static int layer_open(struct layer *l, PyObject *target, int top)
{
    memset(l, 0, offsetof(struct layer, tables));
    l->tables.count = 0;
    PyObject **f = target_fields(target);
    if (f == NULL)
        return -1;
    l->fd = PyLong_AsLong(f[T_FD]);
    l->size = PyLong_AsUnsignedLongLong(f[T_SIZE]);
    l->memory = PyObject_IsTrue(f[T_MEMORY]);
    if (PyErr_Occurred())
        return -1;
    if (!top && f[T_BELOW] != Py_None && PyObject_IsTrue(f[T_BELOW])) {
        PyErr_SetString(PyExc_ValueError, "a layer below is one file, alone");
        return -1;
    }
    if (f[T_BAT] != Py_None && f[T_L1] != Py_None) {
        PyErr_SetString(PyExc_ValueError, "a disk has a BAT or an L1 table, not both");
        return -1;
    }
    if (f[T_L1] != Py_None) {
        unsigned long bits = PyLong_AsUnsignedLong(f[T_CLUSTER_BITS]);
        l->l2_entries = PyLong_AsUnsignedLongLong(f[T_L2_ENTRIES]);
        l->zero_flag = PyObject_IsTrue(f[T_ZERO_FLAG]);
        if (PyErr_Occurred())
            return -1;
        if (bits < 9 || bits > 21 || l->l2_entries == 0 || l->l2_entries > (1ull << bits) / 8) {
            PyErr_SetString(PyExc_ValueError, "cluster_bits must be 9 to 21, l2_entries "
                            "positive and at most a cluster's 64-bit words");
            return -1;
        }
        l->kind = MAP_QCOW2;
        l->cluster_bits = (unsigned)bits;
        l->l1 = f[T_L1];
        l->l2_tables = f[T_L2_TABLES];
        return 0;
    }
    if (f[T_BAT] == Py_None)
        return 0;
    l->block_bytes = PyLong_AsUnsignedLongLong(f[T_BLOCK_BYTES]);
    l->data_secs = PyLong_AsUnsignedLongLong(f[T_DATA_SECS]);
    if (PyErr_Occurred())
        return -1;
    if (l->block_bytes == 0 || l->block_bytes % 512) {
        PyErr_SetString(PyExc_ValueError, "block_bytes must be a positive multiple of 512");
        return -1;
    }
    if (PyObject_GetBuffer(f[T_BAT], &l->bat_view, PyBUF_FORMAT) < 0)
        return -1;
    if (l->bat_view.itemsize != 4 || l->bat_view.format == NULL
            || strcmp(l->bat_view.format, "I") != 0) {
        PyBuffer_Release(&l->bat_view);
        PyErr_SetString(PyExc_TypeError, "bat must be an array of 'I'");
        return -1;
    }
    if (PyObject_GetBuffer(f[T_BATMAP], &l->batmap_view, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&l->bat_view);
        return -1;
    }
    l->kind = MAP_VHD;
    l->bat = l->bat_view.buf;
    l->entries = (size_t)l->bat_view.len / 4;
    l->batmap = l->batmap_view.buf;
    l->batmap_len = (size_t)l->batmap_view.len;
    return 0;
}

static void layer_close(struct layer *l)
{
    if (l->kind == MAP_VHD) {
        PyBuffer_Release(&l->batmap_view);
        PyBuffer_Release(&l->bat_view);
    }
    if (l->kind == MAP_QCOW2) {
        for (int i = 0; i < l->tables.count; i++)
            if (l->tables.words[i] != NULL)
                PyBuffer_Release(&l->tables.views[i]);
        l->tables.count = 0;
    }
    l->kind = MAP_PLAIN;
}

static void disk_close(struct disk *d)
{
    for (int i = 0; i < d->layers; i++)
        layer_close(&d->layer[i]);
    d->layers = 0;
    if (d->hits.obj != NULL)
        PyBuffer_Release(&d->hits);
    if (d->layer != d->few) {
        PyMem_Free(d->layer);
        PyMem_Free(d->read_secs);
    }
    d->layer = NULL;
    d->read_secs = NULL;
}

/* The disk of a target, the interpreter lock held; the qcow2 tables the requests at
 * rb[start:end] need pinned. */
static int disk_open(struct disk *d, PyObject *target, const unsigned char *rb,
                     Py_ssize_t start, Py_ssize_t end, uint64_t max_length, long max_requests)
{
    d->layers = 0;
    d->layer = NULL;
    d->read_secs = NULL;
    d->hits.obj = NULL;
    PyObject **f = target_fields(target);
    if (f == NULL)
        return -1;
    PyObject *below = f[T_BELOW];
    Py_ssize_t n_below = 0;
    if (below != Py_None) {
        if (!PyTuple_Check(below)) {
            PyErr_SetString(PyExc_TypeError, "below must be a tuple of InlineTargets");
            return -1;
        }
        n_below = PyTuple_GET_SIZE(below);
        if (n_below >= MAX_LAYERS) {
            PyErr_SetString(PyExc_ValueError, "too many layers for the inline path");
            return -1;
        }
    }
    d->writes = PyObject_IsTrue(f[T_WRITES]);
    d->holes_zero = PyObject_IsTrue(f[T_HOLES_ZERO]);
    if (PyErr_Occurred())
        return -1;
    if (n_below < FEW_LAYERS) {
        d->layer = d->few;
        d->read_secs = d->few_secs;
        memset(d->few_secs, 0, sizeof d->few_secs);
    } else {
        d->layer = PyMem_Malloc(((size_t)n_below + 1) * sizeof *d->layer);
        d->read_secs = PyMem_Calloc((size_t)n_below + 1, sizeof *d->read_secs);
        if (d->layer == NULL || d->read_secs == NULL) {
            disk_close(d);
            PyErr_NoMemory();
            return -1;
        }
    }
    int qcow2_layers = 0;
    for (Py_ssize_t i = 0; i <= n_below; i++) {
        if (layer_open(&d->layer[i], i ? PyTuple_GET_ITEM(below, i - 1) : target, i == 0) < 0) {
            d->layers++;  /* (what it holds is released) */
            disk_close(d);
            return -1;
        }
        d->layers++;
        if (d->layer[i].kind == MAP_QCOW2 && ++qcow2_layers > MAX_QCOW2_LAYERS) {
            disk_close(d);
            PyErr_SetString(PyExc_ValueError, "too many qcow2 layers for the inline path");
            return -1;
        }
    }
    if (f[T_HITS] != Py_None) {
        Py_buffer *v = &d->hits;
        if (PyObject_GetBuffer(f[T_HITS], v, PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
            v->obj = NULL;
            disk_close(d);
            return -1;
        }
        if (v->itemsize != 8 || v->format == NULL || strcmp(v->format, "Q") != 0
                || v->len < (Py_ssize_t)(8 * d->layers)) {
            disk_close(d);
            PyErr_SetString(PyExc_TypeError, "hits must be an array of 'Q', one per layer");
            return -1;
        }
    }
    if (qcow2_layers && pin_tables(d, rb, start, end, max_length, max_requests) < 0) {
        disk_close(d);
        return -1;
    }
    return 0;
}

/* Add the sectors each layer served to the target's ``hits`` (pinned and checked by
 * disk_open, before anything was served: nothing can fail here), the interpreter lock
 * held: the driver folds them into the layers' counters. */
static void count_hits(const struct disk *d)
{
    if (d->hits.obj == NULL)
        return;
    uint64_t *counts = d->hits.buf;
    for (int i = 0; i < d->layers; i++)
        counts[i] += d->read_secs[i];
}

/* Whether the first request at rb[start:end] is one a pass would take. */
static int servable(const struct disk *d, const unsigned char *rb, Py_ssize_t start,
                    Py_ssize_t end, uint64_t max_length, int structured)
{
    uint32_t cmd;
    uint64_t offset, length, place;
    return next_request(rb, start, end, d->layer[0].size, max_length, &cmd, &offset,
                        &length) != 0
        && take(d, rb + start, cmd, offset, length, structured, &place) != TAKE_NOT;
}

PyDoc_STRVAR(nbd_pump_doc,
"nbd_pump(sock, rbuf, start, end, scratch, target, structured, max_requests, max_length)\n"
"--\n\n"
"Serve the READ and WRITE requests at rbuf[start:end] that the disk ``target`` (an\n"
"InlineTarget: its file, or its layers' files, and where its bytes are in them) can\n"
"serve now, up to ``max_requests`` of at most ``max_length`` bytes, sending their\n"
"replies on ``sock`` from ``scratch`` (structured replies if ``structured``; with a\n"
"``sock`` of -1 they are left in the scratch, for the caller to queue). The\n"
"caller holds target.guard, if any. Returns (start, reads, read_bytes, writes,\n"
"write_bytes, unsent, used, error): the position of the first request not taken, what\n"
"was served, the replies not sent because the socket was full (scratch[unsent:used],\n"
"for the caller to queue) and the errno that broke the connection (0: none). The\n"
"sectors each layer served to reads are added to target.hits, if any.");

static PyObject *nbd_pump(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "nbd_pump takes 9 arguments");
        return NULL;
    }
    int sock = PyLong_AsLong(args[0]);
    Py_ssize_t start = PyLong_AsSsize_t(args[2]);
    Py_ssize_t end = PyLong_AsSsize_t(args[3]);
    int structured = PyObject_IsTrue(args[6]);
    long max_requests = PyLong_AsLong(args[7]);
    unsigned long max_length = PyLong_AsUnsignedLong(args[8]);
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
    if (disk_open(&disk, args[5], rbuf.buf, start, end, max_length, max_requests) < 0)
        goto fail;

    const unsigned char *rb = rbuf.buf;
    unsigned char *sb = scratch.buf;
    size_t cap = (size_t)scratch.len;
    size_t used = 0, sent = 0;
    unsigned long long reads = 0, read_bytes = 0, writes = 0, write_bytes = 0;
    int error = 0, full = 0;
    const uint64_t size = disk.layer[0].size;
    const int fd = disk.layer[0].fd;
    const size_t read_header = structured ? DATA_CHUNK_SIZE : SIMPLE_REPLY_SIZE;

    /* Nothing to do for the first request (the Python path's): back at once, without
     * letting go of the interpreter lock (which costs the engine threads' turn). */
    if (!servable(&disk, rb, start, end, max_length, structured)) {
        disk_close(&disk);
        PyBuffer_Release(&scratch);
        PyBuffer_Release(&rbuf);
        return Py_BuildValue("nKKKKnni", start, 0ULL, 0ULL, 0ULL, 0ULL, (Py_ssize_t)0,
                             (Py_ssize_t)0, 0);
    }

    Py_BEGIN_ALLOW_THREADS
    for (long served = 0; served < max_requests; served++) {
        uint32_t cmd;
        uint64_t offset, length, place = 0;
        if (next_request(rb, start, end, size, max_length, &cmd, &offset, &length) == 0)
            break;
        const unsigned char *req = rb + start;
        int how = take(&disk, req, cmd, offset, length, structured, &place);
        if (how == TAKE_NOT)
            break;
        size_t need = cmd == CMD_WRITE ? SIMPLE_REPLY_SIZE
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
        if (cmd == CMD_READ) {
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
            if (write_all(fd, req + REQUEST_SIZE, length, place,
                          get16(req + 4) & CMD_FLAG_FUA) < 0)
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
    return Py_BuildValue("nKKKKnni", start, reads, read_bytes, writes, write_bytes,
                         (Py_ssize_t)sent, (Py_ssize_t)used, error);

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
    /* The InlineTarget fields read by position, in order (a test holds the NamedTuple to
     * them). */
    PyObject *fields = Py_BuildValue("(sssssssssssssssss)", "fd", "size", "memory",
                                     "writes", "bat", "batmap", "block_bytes", "data_secs",
                                     "l1", "l2_tables", "cluster_bits", "l2_entries",
                                     "guard", "holes_zero", "zero_flag", "below", "hits");
    if (fields == NULL || PyModule_AddObject(m, "TARGET_FIELDS", fields) < 0) {
        Py_XDECREF(fields);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "MAX_LAYERS", MAX_LAYERS) < 0
            || PyModule_AddIntConstant(m, "MAX_QCOW2_LAYERS", MAX_QCOW2_LAYERS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
