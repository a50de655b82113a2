/*
 * blktap.transport.xen._ring: the blkif ring's inline path, compiled.
 *
 * One call consumes the requests waiting on a ring that the disk can serve without
 * waiting (a disk whose bytes sit in files in memory or in the page cache: the same
 * InlineTarget as the NBD pass's, tapdisk/_inline_disk.h), reads or writes them straight
 * between the files and the guest's pages (persistent grants: pages the backend holds
 * mapped, found by grant reference in ``pages``), writes their responses, publishes them
 * and, when the ring is empty, asks for an event on the next request
 * (RING_FINAL_CHECK_FOR_REQUESTS). It stops at the first request it does not take,
 * consuming nothing of it: any operation but READ and WRITE (direct or INDIRECT), a
 * segment or range the Python path would refuse, a grant not mapped yet, a write the top
 * layer does not hold, a read out of the page cache, an error. The Python path
 * (blkif.py) takes that request from the ring, decides what is wrong with it, and answers
 * it; so this pass never answers an error and never decides a policy.
 *
 * Everything it reads of the ring is the guest's, and the guest may change it at any
 * time: a slot is copied before it is decoded, the segments of an indirect page are
 * copied before they are checked, and each index is loaded once per use.
 * The interpreter lock is released while it serves: the ring, the table of pages and the
 * disk's maps are pinned by the buffer protocol, and the guest's pages stay mapped until
 * the ring stops, which only the event loop's thread (ours, in this call) can do.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <sys/ioctl.h>

#include "_inline_disk.h"  /* the disk: layers, maps, reads and writes (tapdisk/) */

/* The event channel device (linux include/uapi/xen/evtchn.h; evtchn.py): a port that
 * fired is read from the descriptor (a u32 each) and unmasked by writing it back;
 * IOCTL_EVTCHN_NOTIFY takes {u32 port}. */
#define IOCTL_EVTCHN_NOTIFY 0x00044504u
#define EVTCHN_READ_PORTS 64

/* ring.h and blkif.h (guests-formats-filters.md §1e); structs.py declares the same. */
#define RING_HEADER 64
#define REQ_PROD 0
#define REQ_EVENT 4
#define RSP_PROD 8
#define RSP_EVENT 12
#define PAGE 4096u
#define SECTOR 512u
#define SECTORS_PER_PAGE 8u
#define MAX_SEGMENTS 11u
#define SEGMENT_SIZE 8u     /* gref u32, first_sect u8, last_sect u8, pad */
#define SEGMENTS_PER_INDIRECT_PAGE (PAGE / SEGMENT_SIZE)
#define MAX_INDIRECT_SEGMENTS 256u  /* one indirect page (structs.MAX_INDIRECT_SEGMENTS) */
#define OP_READ 0
#define OP_WRITE 1
#define OP_INDIRECT 6
#define MAX_SLOT 112u

/* Where the fields are in a slot: x86_64 aligns u64 naturally (id at 8), x86_32 on 4
 * (id at 4). The sector follows the id, the segments or the indirect request's handle
 * follow the sector; an indirect request's grant references follow its handle and pad. */
struct abi {
    unsigned slot;       /* distance between slots: sizeof the request/response union */
    unsigned id;         /* u64 id (in a response: at 0) */
    unsigned sector;     /* u64 sector_number */
    unsigned segments;   /* segment[11] of a READ/WRITE */
    unsigned indirect_grefs;  /* indirect_grefs[8] of an INDIRECT */
};
static const struct abi X86_64 = { 112, 8, 16, 24, 28 };
static const struct abi X86_32 = { 108, 4, 12, 20, 24 };

/* Pass status: why it returned. */
#define PASS_IDLE 0     /* the ring is empty and asked for an event on the next request */
#define PASS_PYTHON 1   /* stopped at a request the Python path must take */
#define PASS_BUDGET 2   /* served max_requests */
#define PASS_CORRUPT 3  /* req_prod is not within the ring's size: the Python path says so */

static inline uint32_t load_index(const unsigned char *ring, unsigned at)
{
    return __atomic_load_n((const uint32_t *)(ring + at), __ATOMIC_ACQUIRE);
}

static inline void store_index(unsigned char *ring, unsigned at, uint32_t value)
{
    __atomic_store_n((uint32_t *)(ring + at), value, __ATOMIC_RELEASE);
}

static inline uint64_t get_u64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t get_u32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint16_t get_u16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }

/* The ring a pass works on, and its private indices (BackRing's, handed over and back). */
struct ring {
    unsigned char *mem;
    const struct abi *abi;
    uint32_t size;
    uint32_t req_cons, rsp_prod_pvt, published;
};

/* Requests published and not consumed; -1 if req_prod is not within the ring's size of
 * the oldest unanswered request (RING_REQUEST_PROD_OVERFLOW, or gone backwards). */
static int64_t waiting(const struct ring *r)
{
    uint32_t prod = load_index(r->mem, REQ_PROD);
    uint32_t n = prod - r->req_cons, outstanding = r->req_cons - r->rsp_prod_pvt;
    if (n > r->size - outstanding)
        return -1;
    return n;
}

/* The guest's pages the backend holds mapped: address by grant reference (0: not mapped). */
struct pages {
    const uint64_t *addr;
    size_t count;
};

static inline unsigned char *page_of(const struct pages *p, uint32_t gref)
{
    return gref < p->count ? (unsigned char *)(uintptr_t)p->addr[gref] : NULL;
}

/* One request the pass takes: a READ or WRITE of whole sectors in the guest's mapped
 * pages. */
struct job {
    int write;
    int indirect;
    uint64_t offset, length;
    int nseg;
    struct iovec iov[MAX_INDIRECT_SEGMENTS];
};

/* Decode the request in ``slot`` (a private copy) into ``job`` if the pass may take it by
 * its contents, as blkif.py's _prepare would take it to the side door: READ or WRITE with
 * 1 to 11 segments, or INDIRECT of one of them with 1 to max_indirect segments, each
 * segment in a page that is mapped and of sectors first <= last < 8; inside the disk.
 * 0 if it does not (the Python path takes it, and answers what is wrong with it). */
static int decode(const unsigned char *slot, const struct abi *abi, const struct pages *pages,
                  uint64_t size, unsigned max_indirect, struct job *job)
{
    unsigned op = slot[0], nseg;
    unsigned char segs[MAX_INDIRECT_SEGMENTS * SEGMENT_SIZE];
    const unsigned char *seg;
    if (op == OP_READ || op == OP_WRITE) {
        nseg = slot[1];
        if (nseg < 1 || nseg > MAX_SEGMENTS)
            return 0;
        seg = slot + abi->segments;
        job->indirect = 0;
    } else if (op == OP_INDIRECT) {
        op = slot[1];
        nseg = get_u16(slot + 2);
        if ((op != OP_READ && op != OP_WRITE) || nseg < 1 || nseg > max_indirect
                || nseg > MAX_INDIRECT_SEGMENTS)
            return 0;
        /* One indirect page holds them all (256 <= 512 per page). */
        const unsigned char *list = page_of(pages, get_u32(slot + abi->indirect_grefs));
        if (list == NULL)
            return 0;
        memcpy(segs, list, (size_t)nseg * SEGMENT_SIZE);  /* the guest may change it */
        seg = segs;
        job->indirect = 1;
    } else {
        return 0;
    }
    uint64_t total = 0;
    for (unsigned i = 0; i < nseg; i++, seg += SEGMENT_SIZE) {
        unsigned first = seg[4], last = seg[5];
        unsigned char *page = page_of(pages, get_u32(seg));
        if (page == NULL || first > last || last >= SECTORS_PER_PAGE)
            return 0;
        job->iov[i].iov_base = page + first * SECTOR;
        job->iov[i].iov_len = (last - first + 1) * SECTOR;
        total += job->iov[i].iov_len;
    }
    uint64_t sector = get_u64(slot + abi->sector);
    if (sector > size / SECTOR || total > size - sector * SECTOR)
        return 0;
    job->write = op == OP_WRITE;
    job->offset = sector * SECTOR;
    job->length = total;
    job->nseg = (int)nseg;
    return 1;
}

/* The bytes of the disk a waiting request may touch at most (its sector, and a page per
 * segment): for pinning the qcow2 tables before the pass. 0 if it names nothing. */
static uint64_t reach(const unsigned char *slot, const struct abi *abi, uint64_t *offset)
{
    unsigned op = slot[0];
    uint64_t nseg = op == OP_INDIRECT ? get_u16(slot + 2)
                    : op == OP_READ || op == OP_WRITE ? slot[1] : 0;
    *offset = get_u64(slot + abi->sector) * SECTOR;
    return nseg * PAGE;
}

/* The requests waiting on the ring (up to ``left``), as disk ranges for disk_open_for. */
struct waiting_requests {
    const struct ring *r;
    const struct disk *d;
    uint32_t next;
    int64_t left;
};

static int next_waiting_range(void *ctx, uint64_t *offset, uint64_t *length)
{
    struct waiting_requests *w = ctx;
    unsigned char slot[MAX_SLOT];
    const struct ring *r = w->r;
    uint64_t size = w->d->layer[0].size;
    if (w->left-- <= 0)
        return 0;
    uint32_t idx = (r->req_cons + w->next++) & (r->size - 1);
    memcpy(slot, r->mem + RING_HEADER + (size_t)idx * r->abi->slot, r->abi->slot);
    *length = reach(slot, r->abi, offset);
    if (*offset >= size)
        return 0;
    if (*length > size - *offset)
        *length = size - *offset;
    return 1;
}

static void respond(struct ring *r, const unsigned char *slot, unsigned op)
{
    unsigned char *rsp = r->mem + RING_HEADER
                         + (size_t)(r->rsp_prod_pvt & (r->size - 1)) * r->abi->slot;
    memcpy(rsp, slot + r->abi->id, 8);  /* the id, as the guest wrote it */
    rsp[8] = (unsigned char)op;
    rsp[9] = 0;
    memset(rsp + 10, 0, 2);  /* status BLKIF_RSP_OKAY */
    r->rsp_prod_pvt++;
}

/* RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: 1 if the frontend asked to be told. */
static int push(struct ring *r)
{
    uint32_t old = r->published, new = r->rsp_prod_pvt;
    if (old == new)
        return 0;
    store_index(r->mem, RSP_PROD, new);  /* after the responses (release) */
    r->published = new;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return (uint32_t)(new - load_index(r->mem, RSP_EVENT)) < (uint32_t)(new - old);
}

struct counts {
    unsigned long long reads, read_bytes, writes, write_bytes, segments, indirect;
    unsigned long max_segments;
};

/* Serve what the ring holds: see the module's comment. */
static int serve(struct ring *r, const struct disk *d, const struct pages *pages,
                 unsigned max_indirect, long max_requests, struct counts *c, int *notify)
{
    struct job job;  /* (4 KiB of iovecs: on the stack, as disk_rw's) */
    long served = 0;
    const uint64_t size = d->layer[0].size;
    for (;;) {
        int64_t n = waiting(r);
        if (n < 0)
            return PASS_CORRUPT;
        if (n == 0) {
            /* Published, then (FINAL_CHECK) an event asked for and a last look. */
            *notify |= push(r);
            store_index(r->mem, REQ_EVENT, r->req_cons + 1);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            n = waiting(r);
            if (n < 0)
                return PASS_CORRUPT;
            if (n == 0)
                return PASS_IDLE;
        }
        for (; n > 0; n--) {
            unsigned char slot[MAX_SLOT];
            if (served == max_requests)
                return PASS_BUDGET;
            memcpy(slot, r->mem + RING_HEADER
                   + (size_t)(r->req_cons & (r->size - 1)) * r->abi->slot, r->abi->slot);
            if (!decode(slot, r->abi, pages, size, max_indirect, &job))
                return PASS_PYTHON;
            if (disk_rw(d, job.iov, job.nseg, job.length, job.offset, job.write, 0) < 0)
                return PASS_PYTHON;  /* (which reads or writes it all again, or refuses it) */
            if (job.write) {
                c->writes++;
                c->write_bytes += job.length;
            } else {
                c->reads++;
                c->read_bytes += job.length;
            }
            c->segments += (unsigned)job.nseg;
            if ((unsigned long)job.nseg > c->max_segments)
                c->max_segments = (unsigned long)job.nseg;
            c->indirect += job.indirect;
            r->req_cons++;
            respond(r, slot, job.write ? OP_WRITE : OP_READ);
            served++;
        }
    }
}

/* The event channel a pass answers on itself (``doorbell``: its descriptor and local
 * port), or fd -1: the caller's Notifier clears and notifies. */
struct doorbell {
    int fd;
    uint32_t port;
};

/* Consume the notifications pending on the descriptor and unmask the port (as
 * EventChannel.clear): 0, or an errno. */
static int doorbell_clear(const struct doorbell *b)
{
    uint32_t ports[EVTCHN_READ_PORTS];
    for (;;) {
        ssize_t n = read(b->fd, ports, sizeof ports);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : errno;
        }
        if (n == 0)
            return 0;
        size_t whole = (size_t)n - (size_t)n % sizeof ports[0];
        if (whole && write(b->fd, ports, whole) < 0)
            return errno;
        if ((size_t)n < sizeof ports)
            return 0;  /* all it had (no read just to hear EAGAIN: a system call is dear) */
    }
}

static int doorbell_ring(const struct doorbell *b)
{
    uint32_t port = b->port;
    return ioctl(b->fd, IOCTL_EVTCHN_NOTIFY, &port) < 0 ? errno : 0;
}

PyDoc_STRVAR(blkif_pump_doc,
"blkif_pump(ring, x86_32, size, req_cons, rsp_prod_pvt, published, pages, target,\n"
"           max_indirect, max_requests, doorbell)\n"
"--\n\n"
"Serve the READ and WRITE requests (direct or indirect) waiting on the shared ring\n"
"``ring`` (its pages, ``size`` slots of the x86_64 or, if ``x86_32``, the x86_32 layout;\n"
"our private indices req_cons, rsp_prod_pvt and the rsp_prod we last published) that\n"
"the disk ``target`` (an InlineTarget) can serve now, in the guest's pages found in\n"
"``pages`` (an array of 'Q': the address of the mapped page of each grant reference, 0\n"
"for none), up to ``max_requests``; indirect requests of at most ``max_indirect``\n"
"segments. With a ``doorbell`` (the event channel device's descriptor and the ring's\n"
"local port; None: the caller does both) it consumes the pending notifications and\n"
"unmasks the port first, and notifies the frontend itself when it asks. The caller\n"
"holds target.guard, if any. Returns (req_cons, rsp_prod_pvt, published, notify,\n"
"status, reads, read_bytes, writes, write_bytes, segments, max_segments, indirect,\n"
"error): the new indices, whether the frontend asked for an event for the responses\n"
"published (notified already with a doorbell), why it stopped (0: the ring is empty\n"
"and asked for an event\n"
"on the next request; 1: at a request for the Python path; 2: max_requests served;\n"
"3: req_prod is not within the ring's size), what it served, and the errno of the\n"
"doorbell (0: none; the caller fails the ring). The sectors each layer served to\n"
"reads are added to target.hits, if any.");

static PyObject *blkif_pump(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "blkif_pump takes 11 arguments");
        return NULL;
    }
    struct doorbell bell = { -1, 0 };
    if (args[10] != Py_None) {
        unsigned long port;
        if (!PyArg_ParseTuple(args[10], "ik", &bell.fd, &port))
            return NULL;
        bell.port = (uint32_t)port;
    }
    int x86_32 = PyObject_IsTrue(args[1]);
    unsigned long size = PyLong_AsUnsignedLong(args[2]);
    unsigned long req_cons = PyLong_AsUnsignedLong(args[3]);
    unsigned long rsp_prod_pvt = PyLong_AsUnsignedLong(args[4]);
    unsigned long published = PyLong_AsUnsignedLong(args[5]);
    unsigned long max_indirect = PyLong_AsUnsignedLong(args[8]);
    long max_requests = PyLong_AsLong(args[9]);
    if (PyErr_Occurred())
        return NULL;
    if (size == 0 || (size & (size - 1)) || size > 4096) {
        PyErr_SetString(PyExc_ValueError, "size must be a power of two, at most 4096");
        return NULL;
    }
    struct ring r = { NULL, x86_32 ? &X86_32 : &X86_64, (uint32_t)size, (uint32_t)req_cons,
                      (uint32_t)rsp_prod_pvt, (uint32_t)published };
    Py_buffer ring, table;
    struct disk disk;
    if (PyObject_GetBuffer(args[0], &ring, PyBUF_WRITABLE) < 0)
        return NULL;
    if ((size_t)ring.len < RING_HEADER + (size_t)size * r.abi->slot) {
        PyBuffer_Release(&ring);
        PyErr_SetString(PyExc_ValueError, "the ring's pages cannot hold that many slots");
        return NULL;
    }
    r.mem = ring.buf;
    if (PyObject_GetBuffer(args[6], &table, PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&ring);
        return NULL;
    }
    if (table.itemsize != 8 || table.format == NULL || strcmp(table.format, "Q") != 0) {
        PyErr_SetString(PyExc_TypeError, "pages must be an array of 'Q'");
        goto fail;
    }
    int64_t ahead = waiting(&r);
    struct waiting_requests pin = { &r, &disk, 0, ahead < max_requests ? ahead : max_requests };
    if (disk_open_for(&disk, args[7], next_waiting_range, &pin) < 0)
        goto fail;
    struct pages pages = { table.buf, (size_t)table.len / 8 };
    struct counts c = { 0 };
    int notify = 0, status, error = 0;
    Py_BEGIN_ALLOW_THREADS
    if (bell.fd >= 0)
        error = doorbell_clear(&bell);
    status = serve(&r, &disk, &pages, (unsigned)max_indirect, max_requests, &c, &notify);
    if (notify && bell.fd >= 0 && !error)
        error = doorbell_ring(&bell);
    Py_END_ALLOW_THREADS
    count_hits(&disk);
    disk_close(&disk);
    PyBuffer_Release(&table);
    PyBuffer_Release(&ring);
    return Py_BuildValue("kkkiiKKKKKkKi", (unsigned long)r.req_cons,
                         (unsigned long)r.rsp_prod_pvt, (unsigned long)r.published, notify,
                         status, c.reads, c.read_bytes, c.writes, c.write_bytes, c.segments,
                         c.max_segments, c.indirect, error);

fail:
    PyBuffer_Release(&table);
    PyBuffer_Release(&ring);
    return NULL;
}

static PyMethodDef methods[] = {
    {"blkif_pump", (PyCFunction)(void (*)(void))blkif_pump, METH_FASTCALL, blkif_pump_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "blktap.transport.xen._ring",
    "The blkif ring's inline path, compiled (see blkif.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ring(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (disk_add_constants(m) < 0
            || PyModule_AddIntConstant(m, "MAX_INDIRECT_SEGMENTS", MAX_INDIRECT_SEGMENTS) < 0
            || PyModule_AddIntConstant(m, "MAX_SEGMENTS", MAX_SEGMENTS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
