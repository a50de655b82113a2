"""Validation rules for qcow2 metadata: every number read from disk is checked here before
the image code uses it. Each function returns the reason a structure is invalid, or None."""

from __future__ import annotations

from blktap.image.qcow2 import structs as s


def header_problem(h: s.Header, file_size: int) -> str | None:
    """What makes the header unusable (a corrupt or foreign file), or None."""
    if h.magic != s.MAGIC:
        return "bad magic"
    if h.version not in (2, 3):
        return f"unsupported version {h.version}"
    if not s.MIN_CLUSTER_BITS <= h.cluster_bits <= s.MAX_CLUSTER_BITS:
        return f"cluster_bits {h.cluster_bits} out of range " \
               f"({s.MIN_CLUSTER_BITS}..{s.MAX_CLUSTER_BITS})"
    cs = h.cluster_size
    if h.version >= 3:
        if h.header_length < s.V3_HEADER_SIZE or h.header_length % 8:
            return f"header_length {h.header_length} invalid (at least 104, a multiple of 8)"
        if h.header_length > cs:
            return f"header_length {h.header_length} larger than a cluster"
        if h.refcount_order > s.MAX_REFCOUNT_ORDER:
            return f"refcount_order {h.refcount_order} out of range (0..6)"
        if h.extended_l2 and h.cluster_bits < s.MIN_CLUSTER_BITS_EXTENDED_L2:
            return f"extended L2 entries need clusters of at least 16 KiB " \
                   f"(cluster_bits {h.cluster_bits})"
    if h.backing_file_offset:
        if h.backing_file_size > s.MAX_BACKING_NAME:
            return f"backing file name of {h.backing_file_size} bytes (at most 1023)"
        if h.backing_file_offset + h.backing_file_size > cs:
            return "backing file name does not lie in the first cluster"
    if h.size >= 1 << 63 or h.size < 0:
        return f"virtual size {h.size} out of range"
    entries = cs // l2_entry_size(h)
    need_l1 = -(-h.size // (cs * entries))
    if h.l1_size < need_l1:
        return f"L1 table of {h.l1_size} entries cannot map {h.size} bytes (needs {need_l1})"
    if h.l1_size * 8 > s.MAX_L1_BYTES:
        return f"L1 table of {h.l1_size} entries is too large"
    for what, off, length in tables(h):
        if off % cs:
            return f"{what} offset {off} is not cluster aligned"
        if length and off == 0:
            return f"{what} at offset 0 overlaps the header"
        if off + length > file_size:
            return f"{what} ({length} bytes at {off}) lies past the end of the file " \
                   f"({file_size} bytes)"
    if h.refcount_table_clusters == 0:
        return "refcount table has no cluster"
    if h.refcount_table_clusters * cs > s.MAX_REFTABLE_BYTES:
        return f"refcount table of {h.refcount_table_clusters} clusters is too large"
    if h.nb_snapshots > s.MAX_SNAPSHOTS:
        return f"{h.nb_snapshots} snapshots (at most {s.MAX_SNAPSHOTS})"
    overlap = overlapping(tables(h), cs)
    if overlap:
        return overlap
    return None


def l2_entry_size(h: s.Header) -> int:
    return s.l2_entry_bytes(h.extended_l2)


def tables(h: s.Header) -> list[tuple[str, int, int]]:
    """The fixed metadata areas the header points at: (name, offset, bytes)."""
    out = [("L1 table", h.l1_table_offset, h.l1_size * 8),
           ("refcount table", h.refcount_table_offset,
            h.refcount_table_clusters * h.cluster_size)]
    if h.nb_snapshots:
        # The size of the snapshot table is not in the header; one entry's worth is the
        # least it takes.
        out.append(("snapshot table", h.snapshots_offset, 40))
    return out


def overlapping(areas: list[tuple[str, int, int]], cluster_size: int) -> str | None:
    """Name two metadata areas that share a cluster (the header's cluster included)."""
    spans = [("header", 0, cluster_size)]
    for what, off, length in areas:
        if length <= 0:
            continue
        first = off // cluster_size * cluster_size
        last = -(-(off + length) // cluster_size) * cluster_size
        spans.append((what, first, last))
    spans.sort(key=lambda x: x[1])
    for (a, _a0, a1), (b, b0, _b1) in zip(spans, spans[1:], strict=False):
        if b0 < a1:
            return f"{b} overlaps the {a}"
    return None


def unsupported_features(h: s.Header, names: dict[tuple[int, int], str]) -> str | None:
    """Incompatible feature bits we do not know, named from the image's own table."""
    unknown = h.incompatible_features & ~s.INCOMPAT_KNOWN
    if unknown:
        labels = []
        for bit in range(64):
            if unknown >> bit & 1:
                name = names.get((s.FEATURE_TYPE_INCOMPAT, bit))
                labels.append(f"bit {bit} ({name})" if name else f"bit {bit}")
        return "unknown incompatible features: " + ", ".join(labels)
    if h.crypt_method != s.CRYPT_NONE:
        return "encrypted qcow2 images are not supported"
    if h.version >= 3 and h.incompatible_features & s.INCOMPAT_COMPRESSION \
            and h.compression_type not in (s.COMPRESSION_ZLIB, s.COMPRESSION_ZSTD):
        return f"unknown compression type {h.compression_type}"
    return None
