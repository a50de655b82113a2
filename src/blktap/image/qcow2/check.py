"""qcow2 consistency check and repair, with ``qemu-img check``'s verdicts.

Every reference the image holds (header, L1 and L2 tables of the disk and of each internal
snapshot, data and compressed clusters, the refcount structures, the snapshot table, the
bitmaps) is counted and compared with the stored refcounts: a stored count below the
references is a corruption, one above them a leak. Active L1/L2 entries must carry the
COPIED flag exactly when their cluster's count is one. Repair: ``leaks`` lowers leaked
counts; ``all`` also rebuilds the refcount structure at the end of the file when a count is
too low (or the image is dirty), then sets the COPIED flags right.
"""

from __future__ import annotations

import array
import os
import sys
from dataclasses import dataclass, field

from blktap.errors import BlktapError, FormatError, UsageError
from blktap.image.fileio import pwrite_all
from blktap.image.qcow2 import structs as s
from blktap.image.qcow2.image import Qcow2Image

REPAIR_MODES = (None, "leaks", "all")


@dataclass
class CheckResult:
    path: str
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    messages: list[str] = field(default_factory=list)
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    rebuilt: bool = False

    @property
    def exit_code(self) -> int:
        """qemu-img check's: 0 clean, 1 check failed, 2 corruptions, 3 leaks only."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def summary(self) -> list[str]:
        out = []
        if self.corruptions_fixed or self.leaks_fixed:
            out.append("The following inconsistencies were found and repaired:")
            out.append(f"    {self.leaks_fixed} leaked clusters")
            out.append(f"    {self.corruptions_fixed} corruptions")
            out.append("")
        if self.corruptions:
            out.append(f"{self.corruptions} errors were found on the image.")
            out.append("Data may be corrupted, or further writes to the image may "
                       "corrupt it.")
        if self.leaks:
            out.append(f"{self.leaks} leaked clusters were found on the image.")
            out.append("This means waste of disk space, but no harm to data.")
        if not self.corruptions and not self.leaks and not self.check_errors:
            out.append("No errors were found on the image.")
        if self.total_clusters:
            t = self.total_clusters
            out.append(f"{self.allocated_clusters}/{t} = "
                       f"{100 * self.allocated_clusters / t:.2f}% allocated, "
                       f"{100 * self.fragmented_clusters / max(1, self.allocated_clusters):.2f}"
                       f"% fragmented, "
                       f"{100 * self.compressed_clusters / max(1, self.allocated_clusters):.2f}"
                       f"% compressed clusters")
        out.append(f"Image end offset: {self.image_end_offset}")
        return out


class _Walker:
    """Counts the references of one image."""

    def __init__(self, image: Qcow2Image, result: CheckResult) -> None:
        self.img = image
        self.res = result
        self.cs = image.cluster_size
        self.bits = image.cluster_bits
        self.nb = -(-image.file_size // self.cs)
        self.refs = array.array("Q", bytes(8 * self.nb))
        # References this far past the end of the file are still counted (a writer
        # killed after linking a cluster it had not written yet leaves such).
        self.slack = 1024
        # Active-disk entries to test for COPIED: (kind, index, entry, where).
        self.l1_flags: list[tuple[int, int]] = []
        self.l2_flags: list[tuple[int, int, int]] = []  # (entry, table offset, word)

    def corrupt(self, msg: str) -> None:
        self.res.corruptions += 1
        self.res.messages.append(msg)

    def inc(self, offset: int, length: int) -> bool:
        """Count a reference to the clusters of [offset, offset + length); False when
        it is not counted."""
        if length <= 0:
            return False
        first = offset >> self.bits
        last = (offset + length - 1) >> self.bits
        if last >= self.nb + self.slack:
            # A reference far past the end of the file is damage, not a cluster to count
            # (counting it would size the reference array by a corrupt number).
            self.corrupt(f"ERROR cluster {first} is beyond the end of the image "
                         f"(offset {offset:#x})")
            return False
        if last >= len(self.refs):
            self.refs.extend([0] * (last + 1 - len(self.refs)))
        for c in range(first, last + 1):
            self.refs[c] += 1
        return True

    def walk(self, *, refcount_structures: bool = True) -> None:
        img, h = self.img, self.img.header
        self.inc(0, self.cs)
        self.walk_l1(img.l1 if img.snapshot is None else self._read_l1(
            h.l1_table_offset, h.l1_size), h.l1_table_offset, active=True)
        for snap in img.snapshots:
            self.walk_l1(self._read_l1(snap.l1_table_offset, snap.l1_size),
                         snap.l1_table_offset, active=False)
        if img.snapshots:
            self.inc(h.snapshots_offset, sum(x.entry_size for x in img.snapshots))
        self.walk_bitmaps()
        if refcount_structures:
            self.walk_refcount_structures()

    def _read_l1(self, offset: int, size: int) -> array.array:
        arr = array.array("Q")
        arr.frombytes(os.pread(self.img.fd, size * 8, offset).ljust(size * 8, b"\0"))
        if sys.byteorder == "little":
            arr.byteswap()
        return arr

    def walk_l1(self, l1: array.array, l1_offset: int, *, active: bool) -> None:
        img, cs = self.img, self.cs
        self.inc(l1_offset, len(l1) * 8)
        seen_data = 0
        for i, entry in enumerate(l1):
            off = entry & s.L1_OFFSET_MASK
            if not off:
                continue
            if off % cs:
                self.corrupt(f"ERROR l2_offset={off:x}: Table is not cluster aligned; "
                             f"L1 entry corrupted")
                continue
            if off + cs > img.file_size:
                self.corrupt(f"ERROR l2_offset={off:x}: L2 table lies outside the image")
                continue
            if not self.inc(off, cs):
                continue
            if active:
                self.l1_flags.append((i, entry))
            raw = os.pread(img.fd, cs, off)
            table = array.array("Q")
            table.frombytes(raw)
            if sys.byteorder == "little":
                table.byteswap()
            words = img.l2_entry_words
            # Fragmentation as qemu-img check counts it: within one L2 table, a data
            # cluster not right after the previous one; every compressed cluster.
            prev_end = None
            for k in range(0, len(table), words):
                e = table[k]
                bitmap = table[k + 1] if words == 2 else 0
                if not e and not bitmap:
                    continue
                if e & s.OFLAG_COMPRESSED:
                    if e & s.OFLAG_COPIED:
                        self.corrupt(f"ERROR: coffset=0x{e & ((1 << 62) - 1):x}: copied "
                                     f"flag must never be set for compressed clusters")
                    if words == 2 and bitmap:
                        self.corrupt(f"ERROR compressed cluster {i * img.l2_entries + k // 2}"
                                     f" with a non-zero subcluster bitmap")
                    coff, clen = img.compressed_span(e)
                    self.inc(coff & ~511, clen + (coff & 511))
                    if active:
                        self.res.compressed_clusters += 1
                        self.res.allocated_clusters += 1
                        self.res.fragmented_clusters += 1
                    continue
                doff = e & s.L2_OFFSET_MASK
                if words == 2 and bitmap & s.SUBCLUSTER_ALLOC_MASK & (bitmap >> 32):
                    self.corrupt(f"ERROR invalid subcluster bitmap {bitmap:#x} "
                                 f"(l2_entry={e:x})")
                if words == 2 and bitmap & s.SUBCLUSTER_ALLOC_MASK and not doff:
                    self.corrupt(f"ERROR allocated subclusters without a cluster "
                                 f"(l2_entry={e:x} bitmap={bitmap:#x})")
                if not doff:
                    continue
                if doff % cs:
                    self.corrupt(f"ERROR offset={doff:x}: Cluster is not properly aligned; "
                                 f"L2 entry corrupted")
                    continue
                if not self.inc(doff, cs):
                    continue
                if active:
                    self.l2_flags.append((e, off, k))
                    self.res.allocated_clusters += 1
                    if prev_end is not None and doff != prev_end:
                        self.res.fragmented_clusters += 1
                    prev_end = doff + cs
                    seen_data += 1

    def walk_bitmaps(self) -> None:
        img = self.img
        bm = img.bitmaps
        if bm is None or not img.header.autoclear_features & s.AUTOCLEAR_BITMAPS:
            return
        if bm.directory_offset + bm.directory_size > img.file_size:
            self.corrupt("ERROR bitmaps: the directory lies outside the image")
            return
        self.inc(bm.directory_offset, bm.directory_size)
        raw = os.pread(img.fd, bm.directory_size, bm.directory_offset)
        entries = s.unpack_bitmap_directory(raw, bm.nb_bitmaps)
        if isinstance(entries, str):
            self.corrupt(f"ERROR bitmaps: {entries}")
            return
        for ent in entries:
            if ent.table_offset + ent.table_size * 8 > img.file_size:
                self.corrupt(f"ERROR bitmap {ent.name!r}: its table lies outside the image")
                continue
            self.inc(ent.table_offset, ent.table_size * 8)
            table = self._read_l1(ent.table_offset, ent.table_size)
            for e in table:
                off = e & s.BITMAP_TABLE_OFFSET_MASK
                if off:
                    self.inc(off, self.cs)

    def walk_refcount_structures(self) -> None:
        h = self.img.header
        self.inc(h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        for i, entry in enumerate(self.stored_table()):
            off = entry & s.REFTABLE_OFFSET_MASK
            if not off:
                continue
            if off % self.cs or entry & s.REFTABLE_RESERVED_MASK:
                self.corrupt(f"ERROR refcount block {i} is not cluster aligned; refcount "
                             f"table entry corrupted")
                continue
            if off + self.cs > self.img.file_size:
                self.corrupt(f"ERROR refcount block {i} is outside image")
                continue
            self.inc(off, self.cs)

    def stored_table(self) -> array.array:
        h = self.img.header
        return self._read_l1(h.refcount_table_offset,
                             h.refcount_table_clusters * self.cs // 8)

    def stored_refcounts(self, count: int) -> list[int]:
        """The stored count of clusters 0..count-1 (0 where no valid block says)."""
        per_block = (self.cs * 8) >> self.img.header.refcount_order
        rbits = self.img.header.refcount_bits
        out = [0] * count
        for bi, entry in enumerate(self.stored_table()):
            off = entry & s.REFTABLE_OFFSET_MASK
            first = bi * per_block
            if not off or first >= count or off % self.cs or \
                    off + self.cs > self.img.file_size:
                continue
            raw = os.pread(self.img.fd, self.cs, off)
            n = min(per_block, count - first)
            if rbits >= 8:
                step = rbits // 8
                for i in range(n):
                    out[first + i] = int.from_bytes(raw[i * step : i * step + step], "big")
            else:
                mask = (1 << rbits) - 1
                for i in range(n):
                    pos = i * rbits
                    out[first + i] = (raw[pos >> 3] >> (pos & 7)) & mask
        return out


def check(path: str, *, repair: str | None = None) -> CheckResult:
    """Check one qcow2 image (``repair``: None, "leaks" or "all")."""
    if repair not in REPAIR_MODES:
        raise UsageError(f"invalid repair mode {repair!r} (leaks or all)")
    result = CheckResult(path)
    image = Qcow2Image.open(path, writable=repair is not None, for_check=True)
    try:
        _check(image, result, repair)
    finally:
        image.close()
    return result


def _check(image: Qcow2Image, result: CheckResult, repair: str | None) -> None:
    walker = _Walker(image, result)
    walker.walk()
    refs = walker.refs
    stored = walker.stored_refcounts(len(refs))
    leaked, low = [], []
    for c, (want, have) in enumerate(zip(refs, stored, strict=True)):
        if have == want:
            continue
        if have < want:
            low.append(c)
            result.corruptions += 1
            result.messages.append(f"ERROR cluster {c} refcount={have} reference={want}")
        else:
            leaked.append(c)
            result.leaks += 1
            result.messages.append(f"Leaked cluster {c} refcount={have} reference={want}")
    _check_copied(image, walker, stored, result)
    if repair is not None and image.header.incompatible_features & s.INCOMPAT_DIRTY \
            and repair != "all":
        repair = "all"
    if repair is None:
        _fill_summary(image, result, refs, stored)
        return
    if repair == "all" and (low or image.dirty or result.corruptions):
        _rebuild(image, walker, result)
        result.corruptions_fixed = result.corruptions
        result.leaks_fixed = result.leaks
    elif leaked or result.corruptions:
        if leaked:
            rc = image.open_refcounts()
            for c in leaked:
                result.messages.append(f"Repairing cluster {c} refcount={stored[c]} "
                                       f"reference={refs[c]}")
                rc.set(c, refs[c])
                stored[c] = refs[c]
            result.leaks_fixed = len(leaked)
        # As qemu with -r leaks: a missing COPIED flag on a cluster counted once is set
        # (the safe direction; a flag set on a shared cluster needs -r all).
        result.corruptions_fixed = _set_missing_copied(image, walker, stored, result)
        if not result.leaks_fixed and not result.corruptions_fixed:
            _fill_summary(image, result, refs, stored)
            return
    else:
        _fill_summary(image, result, refs, stored)
        return
    os.fsync(image.fd)
    # The verdict after repair is that of a new check.
    after = CheckResult(result.path)
    image2 = Qcow2Image.open(image.path, for_check=True)
    try:
        _check(image2, after, None)
    finally:
        image2.close()
    result.corruptions, result.leaks = after.corruptions, after.leaks
    result.check_errors = after.check_errors
    result.messages.extend(after.messages)
    for name in ("total_clusters", "allocated_clusters", "fragmented_clusters",
                 "compressed_clusters", "image_end_offset"):
        setattr(result, name, getattr(after, name))


def _check_copied(image: Qcow2Image, walker: _Walker, stored: list[int],
                  result: CheckResult) -> None:
    def count(offset: int) -> int:
        c = offset >> image.cluster_bits
        return stored[c] if c < len(stored) else 0

    for i, entry in walker.l1_flags:
        rc = count(entry & s.L1_OFFSET_MASK)
        if (rc == 1) != bool(entry & s.OFLAG_COPIED):
            result.corruptions += 1
            result.messages.append(f"ERROR OFLAG_COPIED L2 cluster: l1_index={i} "
                                   f"l1_entry={entry:x} refcount={rc}")
    for entry, _table, _word in walker.l2_flags:
        rc = count(entry & s.L2_OFFSET_MASK)
        if (rc == 1) != bool(entry & s.OFLAG_COPIED):
            result.corruptions += 1
            result.messages.append(f"ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} "
                                   f"refcount={rc}")


def _set_missing_copied(image: Qcow2Image, walker: _Walker, stored: list[int],
                        result: CheckResult) -> int:
    fixed = 0

    def count(offset: int) -> int:
        c = offset >> image.cluster_bits
        return stored[c] if c < len(stored) else 0

    for i, entry in walker.l1_flags:
        if not entry & s.OFLAG_COPIED and count(entry & s.L1_OFFSET_MASK) == 1:
            pwrite_all(image.fd, (entry | s.OFLAG_COPIED).to_bytes(8, "big"),
                       image.header.l1_table_offset + i * 8)
            result.messages.append(f"Repairing OFLAG_COPIED L2 cluster: l1_index={i} "
                                   f"l1_entry={entry:x} refcount=1")
            fixed += 1
    for entry, table_off, word in walker.l2_flags:
        if not entry & s.OFLAG_COPIED and count(entry & s.L2_OFFSET_MASK) == 1:
            pwrite_all(image.fd, (entry | s.OFLAG_COPIED).to_bytes(8, "big"),
                       table_off + word * 8)
            result.messages.append(f"Repairing OFLAG_COPIED data cluster: l2_entry={entry:x} "
                                   f"refcount=1")
            fixed += 1
    return fixed


def _fill_summary(image: Qcow2Image, result: CheckResult, refs: array.array,
                  stored: list[int]) -> None:
    """The image's end is after the last cluster referenced or counted (qemu-img's: a
    leaked cluster at the end still takes room in the file)."""
    result.total_clusters = -(-image.size // image.cluster_size)
    last = max((c for c in range(len(refs)) if refs[c] or stored[c]), default=0)
    result.image_end_offset = (last + 1) * image.cluster_size


def _rebuild(image: Qcow2Image, walker: _Walker, result: CheckResult) -> None:
    """Write a new refcount structure at the end of the file from the references alone,
    point the header at it, then set every active COPIED flag from it."""
    result.messages.append("Rebuilding refcount structure")
    cs, bits = image.cluster_size, image.cluster_bits
    fresh = _Walker(image, CheckResult(image.path))
    fresh.walk(refcount_structures=False)
    refs = fresh.refs
    order = image.header.refcount_order
    per_block = (cs * 8) >> order
    limit = (1 << (1 << order)) - 1
    if any(r > limit for r in refs):
        raise FormatError(f"{image.path}: a cluster has more references than "
                          f"{1 << order}-bit refcounts can count")
    start = max(len(refs), -(-image.file_size // cs))
    n_tab, n_blk = 1, 1
    while True:
        total = start + n_tab + n_blk
        want_blk = -(-total // per_block)
        want_tab = -(-want_blk * 8 // cs)
        if (want_blk, want_tab) == (n_blk, n_tab):
            break
        n_blk, n_tab = max(n_blk, want_blk), max(n_tab, want_tab)
    counts = list(refs) + [0] * (total - len(refs))
    for c in range(start, total):
        counts[c] = 1
    tab_off = start * cs
    blk_off = tab_off + n_tab * cs
    table = array.array("Q", [0] * (n_tab * cs // 8))
    for b in range(n_blk):
        block = bytearray(cs)
        lo = b * per_block
        for c in range(lo, min(total, lo + per_block)):
            v = counts[c]
            if not v:
                continue
            if (1 << order) >= 8:
                n = (1 << order) // 8
                block[(c - lo) * n : (c - lo) * n + n] = v.to_bytes(n, "big")
            else:
                pos = (c - lo) << order
                block[pos >> 3] |= v << (pos & 7)
        pwrite_all(image.fd, block, blk_off + b * cs)
        table[b] = blk_off + b * cs
    raw = array.array("Q", table)
    if sys.byteorder == "little":
        raw.byteswap()
    pwrite_all(image.fd, raw.tobytes(), tab_off)
    os.fsync(image.fd)
    pwrite_all(image.fd, tab_off.to_bytes(8, "big") + n_tab.to_bytes(4, "big"),
               s.OFF_REFTABLE)
    h = image.header
    h.refcount_table_offset, h.refcount_table_clusters = tab_off, n_tab
    os.fsync(image.fd)
    # COPIED flags of the active disk from the new counts.
    for i, entry in fresh.l1_flags:
        want = entry | s.OFLAG_COPIED if counts[(entry & s.L1_OFFSET_MASK) >> bits] == 1 \
            else entry & ~s.OFLAG_COPIED
        if want != entry:
            pwrite_all(image.fd, want.to_bytes(8, "big"), h.l1_table_offset + i * 8)
    for entry, table_off, word in fresh.l2_flags:
        want = entry | s.OFLAG_COPIED if counts[(entry & s.L2_OFFSET_MASK) >> bits] == 1 \
            else entry & ~s.OFLAG_COPIED
        if want != entry:
            pwrite_all(image.fd, want.to_bytes(8, "big"), table_off + word * 8)
    if h.version >= 3 and h.incompatible_features & (s.INCOMPAT_DIRTY | s.INCOMPAT_CORRUPT):
        os.fsync(image.fd)
        h.incompatible_features &= ~(s.INCOMPAT_DIRTY | s.INCOMPAT_CORRUPT)
        pwrite_all(image.fd, h.incompatible_features.to_bytes(8, "big"), s.OFF_INCOMPAT)


def check_or_error(path: str, repair: str | None = None) -> CheckResult:
    """check(), with an image that cannot be opened reported as a failed check."""
    try:
        return check(path, repair=repair)
    except BlktapError as exc:
        res = CheckResult(path, check_errors=1)
        res.messages.append(str(exc))
        return res
