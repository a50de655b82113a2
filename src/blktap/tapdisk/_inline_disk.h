/*
 * blktap/tapdisk/_inline_disk.h: a disk as the compiled inline paths see it.
 *
 * Shared by the transports' compiled passes (transport/nbd/_inline.c, transport/xen/
 * _ring.c), each a separate extension that includes it: where a disk's bytes are (a raw
 * file, a chain of VHDs and qcow2s over one), read from the driver stack's cached
 * metadata that an InlineTarget (tapdisk/driver.py) hands over, and the system calls that
 * read and write them without waiting. The interpreter lock is held to open a disk, pin
 * its tables and close it; everything else runs without it.
 */
#ifndef BLKTAP_INLINE_DISK_H
#define BLKTAP_INLINE_DISK_H

#include <Python.h>

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef RWF_DSYNC
#define RWF_DSYNC 0x00000002
#endif
#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

/* The disk, as a pass's ``target`` describes it (an InlineTarget, tapdisk/driver.py,
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
 * the target's guard, which the caller holds for the whole pass. The fields' names, in
 * this order, are each module's TARGET_FIELDS (disk_add_constants). */
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
    int writes;        /* writes may be done (to the top layer: file_write_now) */
    int qcow2_layers;  /* of d->layers */
    int holes_zero;  /* no parent below the last layer */
    int layers;
    struct layer *layer;  /* layer[0]: the top (few, or allocated for a deeper chain) */
    uint64_t *read_secs;  /* sectors of this pass's reads each layer served */
    Py_buffer hits;       /* the target's hits, if any (obj NULL: none) */
    struct layer few[FEW_LAYERS];
    uint64_t few_secs[FEW_LAYERS];
};

#define AT_HOLE (-3)  /* locate_qcow2: not in this layer (the next one's) */

/* Whether a qcow2 layer's L2 table of L1 index l1i is pinned for this pass (*table: its
 * words, NULL for an L1 entry without a table: all holes). */
static inline int pinned_table(const struct layer *l, uint64_t l1i, const uint64_t **table)
{
    const struct qcow2_tables *t = &l->tables;
    for (int i = 0; i < t->count; i++) {
        if (t->l1i[i] == l1i) {
            *table = t->words[i];
            return 1;
        }
    }
    return 0;
}

/* What a dynamic VHD layer holds of block ``blk``: 1 all of it (its batmap bit is set,
 * and its BAT entry), AT_HOLE none (no BAT entry: the layer below's), AT_PYTHON part of
 * it (sectors of several layers), or a block past the BAT or batmap. The batmap bit is
 * loaded first: engine threads store the BAT entry before it. */
static inline int vhd_block(const struct layer *l, uint64_t blk)
{
    if (blk >= l->entries || (blk >> 3) >= l->batmap_len)
        return AT_PYTHON;
    unsigned char bits = __atomic_load_n(&l->batmap[blk >> 3], __ATOMIC_ACQUIRE);
    uint32_t entry = __atomic_load_n(&l->bat[blk], __ATOMIC_RELAXED);
    if (bits & (0x80u >> (blk & 7)))
        return entry == 0xffffffffu ? AT_PYTHON : 1;
    return entry == 0xffffffffu ? AT_HOLE : AT_PYTHON;
}

/* Where a qcow2 layer has disk offset ``off``: its offset in the file, AT_HOLE (the
 * layer below's), AT_ZEROS or AT_PYTHON; *room: the bytes to the end of the cluster. */
static int64_t locate_qcow2(const struct layer *l, uint64_t off, uint64_t *room, int write)
{
    uint64_t cluster = off >> l->cluster_bits;
    uint64_t cs = 1ull << l->cluster_bits;
    uint64_t within = off & (cs - 1);
    const uint64_t *table;
    if (!pinned_table(l, cluster / l->l2_entries, &table))
        return AT_PYTHON;
    *room = cs - within;
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
        int held = vhd_block(l, blk);
        if (held == AT_PYTHON)
            return AT_PYTHON;
        if (l->block_bytes - within < left)
            left = l->block_bytes - within;
        if (held == 1) {
            *room = left;
            uint32_t entry = __atomic_load_n(&l->bat[blk], __ATOMIC_RELAXED);
            return (int64_t)((entry + l->data_secs) * 512u + within);
        }
    }
    *room = left;  /* below every layer: zeros if the disk has no parent */
    return d->holes_zero && !write ? AT_ZEROS : AT_PYTHON;
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

/* The disk of a target, the interpreter lock held (no qcow2 table pinned yet: disk_pin). */
static int disk_open(struct disk *d, PyObject *target)
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
    d->qcow2_layers = qcow2_layers;
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

/* Pinning the qcow2 tables a pass will need (the interpreter lock held), for
 * disk_open_for: disk_pin_start, disk_pin for each range in the order the pass takes
 * them, disk_pin_end. */
struct pins {
    Py_buffer l1s[MAX_QCOW2_LAYERS];
    int have;
};

static int disk_pin_start(struct disk *d, struct pins *p)
{
    p->have = 0;
    for (int i = 0; i < d->layers; i++) {
        struct layer *l = &d->layer[i];
        if (l->kind != MAP_QCOW2)
            continue;
        Py_buffer *v = &p->l1s[p->have];
        if (PyObject_GetBuffer(l->l1, v, PyBUF_FORMAT) < 0)
            return -1;
        p->have++;
        if (v->itemsize != 8 || v->format == NULL || strcmp(v->format, "Q") != 0) {
            PyErr_SetString(PyExc_TypeError, "l1 must be an array of 'Q'");
            return -1;
        }
        if (!PyDict_Check(l->l2_tables)) {
            PyErr_SetString(PyExc_TypeError, "l2_tables must be a dict");
            return -1;
        }
    }
    return 0;
}

/* Pin the L2 tables every qcow2 layer has for disk bytes [offset, offset + length): 1 if
 * they all are, 0 if one is missing from the cache or there is no room left (a request
 * there is the Python path's), -1 with an exception set. */
static int disk_pin(struct disk *d, struct pins *p, uint64_t offset, uint64_t length)
{
    int k = 0;
    if (length == 0)
        return 1;
    for (int i = 0; i < d->layers; i++) {
        struct layer *l = &d->layer[i];
        if (l->kind != MAP_QCOW2)
            continue;
        const uint64_t *words = p->l1s[k].buf;
        size_t l1_len = (size_t)p->l1s[k].len / 8;
        k++;
        uint64_t per_table = l->l2_entries << l->cluster_bits;
        uint64_t first = offset / per_table, last = (offset + length - 1) / per_table;
        for (uint64_t l1i = first; l1i <= last; l1i++) {
            int ok = pin_table(l, words, l1_len, l1i);
            if (ok != 1)
                return ok;
        }
    }
    return 1;
}

static void disk_pin_end(struct pins *p)
{
    for (int k = 0; k < p->have; k++)
        PyBuffer_Release(&p->l1s[k]);
    p->have = 0;
}

/* The disk ranges of the requests a pass may take, in the order it takes them: the next
 * one (offset, length) and 1, or 0 at the end. */
typedef int (*next_range)(void *ctx, uint64_t *offset, uint64_t *length);

/* Open the disk of ``target`` and pin the L2 tables its qcow2 layers have for the ranges
 * ``next`` gives, in order, until one is missing (its request and those after it find no
 * table, and are the Python path's). The interpreter lock held; -1 with an exception
 * set, the disk closed. */
static int disk_open_for(struct disk *d, PyObject *target, next_range next, void *ctx)
{
    struct pins pins;
    uint64_t offset, length;
    if (disk_open(d, target) < 0)
        return -1;
    if (!d->qcow2_layers)
        return 0;
    int rc = disk_pin_start(d, &pins);
    while (rc == 0 && next(ctx, &offset, &length)) {
        int ok = disk_pin(d, &pins, offset, length);
        if (ok != 1)
            rc = ok < 0 ? -1 : 1;
    }
    disk_pin_end(&pins);
    if (rc < 0) {
        disk_close(d);
        return -1;
    }
    return 0;
}

/* The target's shape, for the extension's module (a test holds InlineTarget and
 * InlineChain to them): its fields by position (T_*), the deepest chain, the qcow2
 * layers in it. */
static int disk_add_constants(PyObject *m)
{
    PyObject *fields = Py_BuildValue("(sssssssssssssssss)", "fd", "size", "memory",
                                     "writes", "bat", "batmap", "block_bytes", "data_secs",
                                     "l1", "l2_tables", "cluster_bits", "l2_entries",
                                     "guard", "holes_zero", "zero_flag", "below", "hits");
    if (fields == NULL || PyModule_AddObject(m, "TARGET_FIELDS", fields) < 0) {
        Py_XDECREF(fields);
        return -1;
    }
    if (PyModule_AddIntConstant(m, "MAX_LAYERS", MAX_LAYERS) < 0
            || PyModule_AddIntConstant(m, "MAX_QCOW2_LAYERS", MAX_QCOW2_LAYERS) < 0)
        return -1;
    return 0;
}

/* A cursor over a request's buffers, in order. */
struct iov_cursor {
    const struct iovec *iov;
    int cnt;
    int i;
    size_t off;  /* into iov[i] */
};

/* The cursor's next ``n`` bytes as at most ``max`` iovecs in ``out``, advancing it: their
 * count, or -1 if they do not fit (or the buffers end first). */
static int iov_take(struct iov_cursor *c, size_t n, struct iovec *out, int max)
{
    int k = 0;
    while (n) {
        if (c->i >= c->cnt || k == max)
            return -1;
        size_t here = c->iov[c->i].iov_len - c->off;
        size_t take = here < n ? here : n;
        out[k].iov_base = (unsigned char *)c->iov[c->i].iov_base + c->off;
        out[k].iov_len = take;
        k++;
        n -= take;
        c->off += take;
        if (c->off == c->iov[c->i].iov_len) {
            c->i++;
            c->off = 0;
        }
    }
    return k;
}

/* Drop the first ``n`` bytes of iov[0:*cnt] (after a short transfer). */
static struct iovec *iov_skip(struct iovec *iov, int *cnt, size_t n)
{
    while (n && *cnt) {
        if (n < iov->iov_len) {
            iov->iov_base = (unsigned char *)iov->iov_base + n;
            iov->iov_len -= n;
            return iov;
        }
        n -= iov->iov_len;
        iov++;
        (*cnt)--;
    }
    return iov;
}

/* Read all of ``length`` bytes at ``offset`` of a file into iov[0:cnt] (which it
 * consumes). A file in memory never waits: a short read is its end, and the rest reads as
 * zeros (the Python path does the same). Otherwise RWF_NOWAIT: anything not wholly in the
 * page cache is left to the Python path (-1). */
static int file_readv(int fd, struct iovec *iov, int cnt, uint64_t length, uint64_t offset,
                      int memory)
{
    uint64_t done = 0;
    while (done < length) {
        ssize_t n = preadv2(fd, iov, cnt, (off_t)(offset + done), memory ? 0 : RWF_NOWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0) {
            if (!memory)
                return -1;
            for (int i = 0; i < cnt; i++)
                memset(iov[i].iov_base, 0, iov[i].iov_len);
            return 0;
        }
        if (!memory && (uint64_t)n < length - done)
            return -1;  /* part of it is not cached */
        done += (uint64_t)n;
        iov = iov_skip(iov, &cnt, (size_t)n);
    }
    return 0;
}

/* Write all of iov[0:cnt] (``length`` bytes, which it consumes) at ``offset``. */
static int file_writev(int fd, struct iovec *iov, int cnt, uint64_t length, uint64_t offset,
                       int fua)
{
    uint64_t done = 0;
    while (done < length) {
        ssize_t n = pwritev2(fd, iov, cnt, (off_t)(offset + done), fua ? RWF_DSYNC : 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0)
            return -1;
        done += (uint64_t)n;
        iov = iov_skip(iov, &cnt, (size_t)n);
    }
    return 0;
}

#define PAGE_MASK 4095u

/* Whether a write of ``length`` bytes at ``where`` in the top layer's file may be done
 * now: anything in memory; in the page cache, whole pages only (nothing to read first)
 * and not ``fua`` (RWF_DSYNC waits for the device), as the engine's try_pwritev. */
static inline int file_write_now(const struct disk *d, uint64_t where, uint64_t length,
                                 int fua)
{
    return d->layer[0].memory || (!fua && !((where | length) & PAGE_MASK));
}

#define PIECE_IOVS 260  /* iovecs of one piece of a request: its segments, and a split */

/* Read the disk's ``length`` bytes at ``offset`` into the buffers iov[0:cnt], or, with
 * ``write``, write them there, piece by piece (each to the end of a block or cluster):
 * a read from the layer that holds the piece or as zeros, adding the sectors each layer
 * served to d->read_secs; a write to the top layer, where it holds the block or cluster
 * and file_write_now takes it. -1 if a piece cannot be done now (not held, out of the
 * page cache, an error, a map that changed, more pieces than iovecs): the Python path's,
 * which reads again or writes all of it again (a write refused after its first pieces
 * has written those, with the same data). */
static int disk_rw(const struct disk *d, const struct iovec *iov, int cnt, uint64_t length,
                   uint64_t offset, int write, int fua)
{
    struct iov_cursor c = { iov, cnt, 0, 0 };
    struct iovec piece[PIECE_IOVS];
    uint64_t room = 0;  /* (locate sets both: a disk has a layer) */
    int at = 0;
    if (write && !d->writes)
        return -1;
    for (uint64_t pos = 0; pos < length;) {
        int64_t where = locate(d, offset + pos, &room, write, &at);
        uint64_t n = room < length - pos ? room : length - pos;
        int k = iov_take(&c, (size_t)n, piece, PIECE_IOVS);
        if (k < 0)
            return -1;
        if (write) {
            if (where < 0 || !file_write_now(d, (uint64_t)where, n, fua)
                    || file_writev(d->layer[0].fd, piece, k, n, (uint64_t)where, fua) < 0)
                return -1;
        } else if (where == AT_ZEROS) {
            for (int i = 0; i < k; i++)
                memset(piece[i].iov_base, 0, piece[i].iov_len);
            d->read_secs[at] += n / 512;
        } else if (where < 0 || file_readv(d->layer[at].fd, piece, k, n, (uint64_t)where,
                                           d->layer[at].memory) < 0) {
            return -1;
        } else {
            d->read_secs[at] += n / 512;
        }
        pos += n;
    }
    return 0;
}

#endif /* BLKTAP_INLINE_DISK_H */
