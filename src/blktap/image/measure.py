"""How much space a new image needs (``qemu-img measure``).

Two figures for a target format and a virtual size, or for a source disk to be converted:
``required``, the file size the target needs for that data (an upper bound: metadata is
counted for the whole disk, data for every cluster or block the source's map says holds
data, whether or not it reads as zeros); and ``fully_allocated``, the file size once every
block of the disk is written.

- raw: the virtual size for both (its holes count towards the file's size), as qemu-img.
- qcow2: qemu-img's formula (header cluster, L2 and L1 tables for the whole disk, refcount
  blocks and table until they count themselves), so both tools give the same figures.
- vhd (qemu-img cannot measure VHDs): exactly the file ``blktap convert`` writes, whose
  blocks are laid out by this package's allocator (the bitmap before 4 KiB-aligned data).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from blktap.errors import UsageError
from blktap.image.chain import SECTOR_SIZE, Extent
from blktap.image.qcow2.create import DEFAULT_CLUSTER_SIZE
from blktap.image.vhd import structs as s
from blktap.image.vhd.create import _metadata_layout, round_size

FORMATS = ("raw", "qcow2", "vhd")
L1E_SIZE = 8
REFTABLE_ENTRY_SIZE = 8


@dataclass(frozen=True)
class Measurement:
    required: int
    fully_allocated: int


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def data_extents(extents: Iterable[Extent]) -> list[tuple[int, int]]:
    """(offset, length) of the runs a layer holds data for (not holes, not zero runs)."""
    return [(e.offset, e.length) for e in extents if e.depth is not None and not e.zero]


def allocated_in_units(runs: Iterable[tuple[int, int]], unit: int) -> int:
    """Bytes of the ``unit``-sized pieces that the runs touch, each piece counted once
    (qemu-img's walk: a run extended to its piece's end, the next run starting past it)."""
    total = 0
    pos = 0
    for offset, length in runs:
        start = max(offset, pos)
        end = offset + length
        if start >= end:
            continue
        stop = _round_up(end, unit)
        total += stop - (start // unit) * unit
        pos = stop
    return total


# ------------------------------------------------------------------------------ qcow2
def qcow2_refcount_metadata_size(clusters: int, cluster_size: int, refcount_bits: int) -> int:
    """Bytes of refcount blocks and table that count ``clusters`` clusters and themselves
    (the fixed point: adding them needs no more of them)."""
    per_table_cluster = cluster_size // REFTABLE_ENTRY_SIZE
    per_block = cluster_size * 8 // refcount_bits
    table = blocks = 0
    n, last = 0, -1
    while n != last:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
    return (blocks + table) * cluster_size


def qcow2_fully_allocated(size: int, cluster_size: int, refcount_bits: int,
                          extended_l2: bool) -> int:
    """Header, L2 tables, L1 table and refcounts for every cluster, plus the data."""
    total = _round_up(size, cluster_size)
    l2e_size = 16 if extended_l2 else 8
    meta = cluster_size  # the header
    nl2e = _round_up(total // cluster_size, cluster_size // l2e_size)
    meta += nl2e * l2e_size
    nl1e = _round_up(nl2e * l2e_size // cluster_size, cluster_size // L1E_SIZE)
    meta += nl1e * L1E_SIZE
    meta += qcow2_refcount_metadata_size((meta + total) // cluster_size, cluster_size,
                                         refcount_bits)
    return meta + total


def measure_qcow2(size: int, data: list[tuple[int, int]] | None, *,
                  cluster_size: int = DEFAULT_CLUSTER_SIZE, refcount_bits: int = 16,
                  extended_l2: bool = False, preallocation: str = "off") -> Measurement:
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 << 20:
        raise UsageError(f"invalid cluster_size {cluster_size} (a power of two, 512 B to "
                         f"2 MiB)")
    if refcount_bits & (refcount_bits - 1) or not 1 <= refcount_bits <= 64:
        raise UsageError(f"invalid refcount_bits {refcount_bits}")
    virtual = _round_up(size, cluster_size)
    required = 0 if data is None else allocated_in_units(data, cluster_size)
    if preallocation in ("full", "falloc"):
        required = virtual
    full = qcow2_fully_allocated(virtual, cluster_size, refcount_bits, extended_l2)
    return Measurement(full - virtual + required, full)


def qcow2_bitmaps_size(bitmaps: Iterable[tuple[str, int]], size: int,
                       cluster_size: int = DEFAULT_CLUSTER_SIZE) -> int:
    """Room for a qcow2 source's persistent bitmaps ((name, granularity bits) each) in a
    qcow2 target: every bitmap wholly allocated, its table, and the directory (qemu-img
    measure's "bitmaps size")."""
    total = directory = 0
    for name, granularity_bits in bitmaps:
        bits = -(-size // (1 << granularity_bits))
        nbytes = -(-bits // 8)
        clusters = -(-nbytes // cluster_size)
        total += clusters * cluster_size
        total += _round_up(clusters * 8, cluster_size)
        directory += _round_up(24 + len(name.encode()), 8)
    return total + _round_up(directory, cluster_size)


# ------------------------------------------------------------------------------ vhd
def vhd_file_size(size: int, blocks: int, *, fixed: bool = False) -> int:
    """The size of the VHD file ``convert`` writes for a disk of ``size`` bytes (rounded
    up to 2 MiB) with ``blocks`` blocks allocated, one after the other."""
    size = round_size(size)
    if fixed:
        return size + s.FOOTER_SIZE
    block_size = s.DEFAULT_BLOCK_SIZE
    spb = block_size // SECTOR_SIZE
    bm_secs = s.pad_sector(-(-spb // 8)) // SECTOR_SIZE
    _, _, batmap_off, batmap_secs = _metadata_layout(size // block_size)
    end = batmap_off // SECTOR_SIZE + batmap_secs  # sectors of metadata, footer excluded
    if blocks:
        first = end + (-(end + bm_secs)) % 8  # the bitmap sits before 4 KiB-aligned data
        stride = bm_secs + spb + (-bm_secs) % 8
        end = first + bm_secs + spb + (blocks - 1) * stride
    return end * SECTOR_SIZE + s.FOOTER_SIZE


def measure_vhd(size: int, data: list[tuple[int, int]] | None, *,
                fixed: bool = False) -> Measurement:
    size = round_size(size)
    all_blocks = size // s.DEFAULT_BLOCK_SIZE
    full = vhd_file_size(size, all_blocks, fixed=fixed)
    if fixed:
        return Measurement(full, full)
    blocks = 0 if data is None else (
        allocated_in_units(data, s.DEFAULT_BLOCK_SIZE) // s.DEFAULT_BLOCK_SIZE)
    return Measurement(vhd_file_size(size, blocks), full)


# ------------------------------------------------------------------------------ any
def measure(fmt: str, size: int, data: list[tuple[int, int]] | None = None,
            **options: object) -> Measurement:
    """The figures for a new ``fmt`` image of ``size`` bytes; ``data``: the (offset,
    length) runs holding data of the source it would be converted from (None: a new,
    empty image, as ``qemu-img measure --size``)."""
    if size < 0:
        raise UsageError(f"invalid size {size}")
    if fmt == "raw":
        if options:
            raise UsageError(f"raw images take no options ({', '.join(options)})")
        virtual = _round_up(size, SECTOR_SIZE)
        return Measurement(virtual, virtual)
    if fmt == "qcow2":
        known = {"cluster_size", "refcount_bits", "extended_l2", "preallocation"}
        unknown = set(options) - known
        if unknown:
            raise UsageError(f"qcow2 measure takes {', '.join(sorted(known))} "
                             f"(not {', '.join(sorted(unknown))})")
        return measure_qcow2(size, data, **options)  # type: ignore[arg-type]
    if fmt == "vhd":
        unknown = set(options) - {"fixed"}
        if unknown:
            raise UsageError(f"vhd measure takes no options but fixed "
                             f"(not {', '.join(sorted(unknown))})")
        return measure_vhd(size, data, fixed=bool(options.get("fixed", False)))
    raise UsageError(f"unknown format {fmt!r} ({', '.join(FORMATS)})")
