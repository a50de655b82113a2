"""vhd-util resize (fast and journaled) and revert: the reference's outputs and layout,
content kept, qemu-img agreeing, every kill point recoverable, the journal format, bad
input."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from blktap.errors import BlktapError
from blktap.image import Chain
from blktap.image.vhd import VhdImage, create, snapshot
from blktap.image.vhd import check as vhd_check
from blktap.image.vhd import journal as jn
from blktap.image.vhd import resize as rs
from blktap.image.vhd import structs as s
from conftest import expected, named, need, run, tool
from faults import count_mutations, crash_after
from loopdev import loop_device  # noqa: F401 - a fixture

MB = 1 << 20


# ---------------------------------------------------------------------------- helpers
def vhd_util(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run([tool("vhd-util"), *args], cwd=cwd, text=True)


def digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def disk_hash(path: str | Path, length: int | None = None) -> str:
    """SHA-256 of the virtual disk (through the chain), or of its first ``length``
    bytes."""
    h = hashlib.sha256()
    with Chain.open(named(path)) as disk:
        end = disk.size if length is None else length
        off = 0
        while off < end:
            n = min(16 * MB, end - off)
            h.update(disk.pread(off, n))
            off += n
    return h.hexdigest()


def virtual_size(path: str | Path) -> int:
    with VhdImage.open(str(path)) as img:
        return img.size


def is_valid(path: str | Path) -> bool:
    return vhd_check.check(str(path)).errno == 0


def pattern(seed: int, n: int) -> bytes:
    return (bytes([seed % 251 + 1]) * 511 + b"\n") * (n // 512)


def dynamic_with_data(path: Path, size_mb: int, prealloc_mb: int | None = None) -> Path:
    """A dynamic VHD with data in its first block (so that a growing BAT meets it), in a
    block in the middle, and in its last block."""
    create(str(path), size_mb * MB, prealloc_size=prealloc_mb * MB if prealloc_mb else None)
    with Chain.open(named(path), writable=True) as disk:
        disk.pwrite(0, pattern(1, 64 << 10))
        disk.pwrite(4 * MB, pattern(2, 2 * MB))  # a full block: batmap bit
        disk.pwrite(size_mb * MB - MB, pattern(3, MB))
    return path


def child_with_data(tmp: Path) -> Path:
    base = dynamic_with_data(tmp / "base.vhd", 20)
    child = tmp / "child.vhd"
    snapshot(str(child), str(base))
    with Chain.open(named(child), writable=True) as disk:
        disk.pwrite(512, pattern(7, 8192))
        disk.pwrite(9 * MB, pattern(8, MB))
    return child


def fixed_with_data(path: Path) -> Path:
    create(str(path), 4 * MB, fixed=True)
    with Chain.open(named(path), writable=True) as disk:
        disk.pwrite(MB, pattern(5, 8192))
    return path


def qemu_agrees(path: Path, tmp: Path) -> None:
    """qemu-img reads the same size and content as we do."""
    qemu = need("qemu-img")
    info = run([qemu, "info", "-f", "vpc", "--output=json", str(path)], text=True)
    assert info.returncode == 0, info.stderr
    assert f'"virtual-size": {virtual_size(path)}' in info.stdout
    raw = tmp / f"{path.stem}.raw"
    with Chain.open(named(path)) as disk, open(raw, "wb") as out:
        out.truncate(disk.size)
        for ext in disk.map():
            if ext.depth is None:
                continue
            out.seek(ext.offset)
            out.write(disk.pread(ext.offset, ext.length))
    cmp = run([qemu, "compare", "-f", "vpc", "-F", "raw", str(path), str(raw)], text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    raw.unlink()


# ------------------------------------------------------------ reference fixtures
def _same_query(reference_dir: Path, tmp: Path, name: str) -> None:
    proc = vhd_util("query", "-n", f"{name}.vhd", "-v", "-s", "-p", "-f", "-m", "-d", "-S",
                    "-a", cwd=tmp)
    text = proc.stdout + proc.stderr + (f"rc={proc.returncode}\n" if proc.returncode else "")
    want = expected(reference_dir, f"{name}.query").replace(str(reference_dir), str(tmp))
    assert text == want


def test_prealloc_like_the_reference(reference_dir: Path, tmp_path: Path) -> None:
    proc = vhd_util("create", "-n", "prealloc.vhd", "-s", "20", "-S", "200", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    _same_query(reference_dir, tmp_path, "prealloc")


def _made_like_resized(tmp: Path) -> Path:
    path = tmp / "resized.vhd"
    assert vhd_util("create", "-n", path.name, "-s", "20", cwd=tmp).returncode == 0
    with Chain.open(named(path), writable=True) as disk:
        disk.pwrite(19 * MB, pattern(9, MB))
    return path


def test_resized_like_the_reference(reference_dir: Path, tmp_path: Path) -> None:
    path = _made_like_resized(tmp_path)
    before = disk_hash(path)
    proc = vhd_util("resize", "-n", path.name, "-s", "40", "-j", "J", cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (0, "")
    assert not (tmp_path / "J").exists()
    _same_query(reference_dir, tmp_path, "resized")
    assert vhd_util("check", "-n", path.name, cwd=tmp_path).stdout == "resized.vhd is valid\n"
    assert disk_hash(path, 20 * MB) == before
    # The layout is the reference's, byte for byte: header, BAT, batmap, file length; the
    # footers differ only in their uuid, timestamp and checksum.
    ours = path.read_bytes()
    theirs = (reference_dir / "resized.vhd").read_bytes()
    assert len(ours) == len(theirs)
    assert ours[512:4096] == theirs[512:4096]
    for off in (0, len(ours) - 512):
        mine, ref = bytearray(ours[off : off + 512]), bytearray(theirs[off : off + 512])
        for field in (range(24, 28), range(64, 84)):  # timestamp, checksum + uuid
            mine[field.start : field.stop] = ref[field.start : field.stop]
        assert mine == ref


def test_reference_resized_image_reads(reference_dir: Path) -> None:
    want = (reference_dir / "expect" / "resized.sha256").read_text().split()[0]
    assert disk_hash(reference_dir / "resized.vhd") == want


def test_reference_bug_fast_then_journaled(tmp_path: Path) -> None:
    """create -s 10 -S 100, fast to 50, journaled to 200: 200 MB (the reference: 250)."""
    assert vhd_util("create", "-n", "a.vhd", "-s", "10", "-S", "100", cwd=tmp_path).returncode == 0
    assert vhd_util("resize", "-n", "a.vhd", "-s", "50", "-f", cwd=tmp_path).returncode == 0
    proc = vhd_util("resize", "-n", "a.vhd", "-s", "200", "-j", "J", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert vhd_util("query", "-n", "a.vhd", "-v", "-S", cwd=tmp_path).stdout == "200\n200\n"
    assert is_valid(tmp_path / "a.vhd")
    # Within a preallocated BAT a journaled resize moves nothing.
    assert vhd_util("resize", "-n", "a.vhd", "-s", "100", "-f", cwd=tmp_path).returncode == 22


# ------------------------------------------------------------ content and peers
def test_fast_grow_keeps_content(tmp_path: Path) -> None:
    path = dynamic_with_data(tmp_path / "f.vhd", 20, prealloc_mb=200)
    before, raw_before = disk_hash(path), path.read_bytes()
    proc = vhd_util("resize", "-n", str(path), "-s", "199", "-f")
    assert (proc.returncode, proc.stdout) == (0, "")
    assert virtual_size(path) == 200 * MB  # whole 2 MiB blocks
    assert disk_hash(path, 20 * MB) == before
    # Only the footers changed (the batmap checksum keeps its value here).
    after = path.read_bytes()
    assert len(after) == len(raw_before)
    assert after[512:-512] == raw_before[512:-512]
    with Chain.open(named(path), writable=True) as disk:
        assert disk.pread(20 * MB, 180 * MB) == bytes(180 * MB)
        disk.pwrite(150 * MB, pattern(4, MB))
        disk.pwrite(200 * MB - 4096, pattern(6, 4096))
    with Chain.open(named(path)) as disk:
        assert disk.pread(150 * MB, MB) == pattern(4, MB)
        assert disk.pread(200 * MB - 4096, 4096) == pattern(6, 4096)
    assert is_valid(path)
    qemu_agrees(path, tmp_path)


def test_fast_grow_updates_the_batmap_checksum(tmp_path: Path) -> None:
    """The batmap checksum covers a length computed from the size: crossing 8 GiB with a
    full block past the first sector of the map changes it."""
    path = tmp_path / "big.vhd"
    create(str(path), 8 * 1024 * MB, prealloc_size=16 * 1024 * MB)
    with Chain.open(named(path), writable=True) as disk:
        disk.pwrite(8 * 1024 * MB - 2 * MB, pattern(1, 2 * MB))  # block 4095: full
    rs.resize(str(path), 16 * 1024 * MB)
    with VhdImage.open(str(path)) as img:
        assert img.batmap_valid and img.block_full(4095)
    assert is_valid(path)


def _grow_journaled(path: Path, size_mb: int) -> None:
    jpath = path.with_suffix(".journal")
    proc = vhd_util("resize", "-n", str(path), "-s", str(size_mb), "-j", str(jpath))
    assert (proc.returncode, proc.stdout) == (0, "")
    assert not jpath.exists()


def test_journaled_grow_moves_blocks(tmp_path: Path) -> None:
    path = dynamic_with_data(tmp_path / "d.vhd", 20)
    before = disk_hash(path)
    plan = rs.plan_journaled(rs.load_target(str(path)), 600 * MB)
    assert [m.block for m in plan.moves] == [0]  # the BAT grows into block 0
    _grow_journaled(path, 600)
    assert virtual_size(path) == 600 * MB
    assert disk_hash(path, 20 * MB) == before
    with VhdImage.open(str(path)) as img:
        assert img.header is not None and img.header.max_bat_size == 300
        assert img.bat[0] * 512 >= img.end_of_metadata()
        assert img.block_full(2)  # the batmap kept its bits
    with Chain.open(named(path), writable=True) as disk:
        assert disk.pread(20 * MB, 8 * MB) == bytes(8 * MB)
        disk.pwrite(599 * MB, pattern(9, MB))
        assert disk.pread(599 * MB, MB) == pattern(9, MB)
    assert is_valid(path)
    qemu_agrees(path, tmp_path)


def test_journaled_grow_of_a_child_moves_locators(tmp_path: Path) -> None:
    child = child_with_data(tmp_path)
    before = disk_hash(child)
    with VhdImage.open(str(child)) as img:
        assert img.header is not None
        old_locs = [loc.data_offset for loc in img.header.loc[:3]]
    plan = rs.plan_journaled(rs.load_target(str(child)), 2000 * MB)
    assert [m.block for m in plan.moves] == [0]
    _grow_journaled(child, 2000)
    with VhdImage.open(str(child)) as img:
        assert img.header is not None
        new_locs = [loc.data_offset for loc in img.header.loc[:3]]
        assert all(new > old for new, old in zip(new_locs, old_locs, strict=True))
        assert img.parent_path() == str(tmp_path / "base.vhd")
    assert virtual_size(child) == 2000 * MB
    assert disk_hash(child, 20 * MB) == before
    with Chain.open(named(child)) as disk:  # past the parent's end: zeros
        assert disk.pread(20 * MB, 4 * MB) == bytes(4 * MB)
    proc = vhd_util("check", "-p", "-n", str(child))
    assert proc.returncode == 0, proc.stdout
    assert vhd_util("read", "-p", "-n", str(child)).stdout.count("decoded name : ./base.vhd") == 3


def test_journaled_grow_of_a_fixed_disk(tmp_path: Path) -> None:
    path = fixed_with_data(tmp_path / "x.vhd")
    before = disk_hash(path)
    _grow_journaled(path, 10)
    assert path.stat().st_size == 10 * MB + 512
    assert virtual_size(path) == 10 * MB
    assert disk_hash(path, 4 * MB) == before
    with Chain.open(named(path)) as disk:
        assert disk.pread(4 * MB, 6 * MB) == bytes(6 * MB)
    proc = vhd_util("check", "-n", str(path))
    assert (proc.returncode, proc.stdout) == (0, "")
    qemu_agrees(path, tmp_path)


def test_journaled_grow_to_the_xenserver_limit(tmp_path: Path) -> None:
    """20 GiB to 2040 GiB: the BAT grows by 4 MiB, two blocks move."""
    path = tmp_path / "large.vhd"
    create(str(path), 20 * 1024 * MB)
    with Chain.open(named(path), writable=True) as disk:
        for blk in (0, 1, 2, 5000):
            disk.pwrite(blk * 2 * MB, pattern(blk, 2 * MB))
    before = disk_hash(path, 12 * MB)
    plan = rs.plan_journaled(rs.load_target(str(path)), s.MAX_VHD_SIZE_XENSERVER)
    assert [m.block for m in plan.moves] == [0, 1, 2]
    _grow_journaled(path, s.MAX_VHD_SIZE_XENSERVER >> 20)
    assert virtual_size(path) == s.MAX_VHD_SIZE_XENSERVER
    assert disk_hash(path, 12 * MB) == before
    with Chain.open(named(path)) as disk:
        assert disk.pread(5000 * 2 * MB, 2 * MB) == pattern(5000, 2 * MB)
    assert is_valid(path)


def test_same_size_changes_nothing(tmp_path: Path) -> None:
    path = dynamic_with_data(tmp_path / "d.vhd", 20)
    before = digest(path)
    jpath = str(tmp_path / "J")
    assert vhd_util("resize", "-n", str(path), "-s", "20", "-j", jpath).returncode == 0
    assert vhd_util("resize", "-n", str(path), "-s", "19", "-f").returncode == 0
    assert digest(path) == before
    assert not (tmp_path / "J").exists()


# ------------------------------------------------------------ crash safety
CASES: dict[str, tuple[Callable[[Path], Path], int]] = {
    "no-move": (lambda tmp: dynamic_with_data(tmp / "d.vhd", 20), 40),
    "move": (lambda tmp: dynamic_with_data(tmp / "d.vhd", 20), 600),
    "child-move": (child_with_data, 2000),
    "fixed": (lambda tmp: fixed_with_data(tmp / "x.vhd"), 10),
}


def _settle(path: Path, jpath: Path, original: bytes, old_size: int, new_size: int,
            old_hash: str) -> str:
    """After a kill: either the resize committed (valid at the new size, content kept),
    or revert gives back the original bytes. Returns which."""
    try:
        committed = virtual_size(path) == new_size and is_valid(path)
    except BlktapError:
        committed = False
    if committed:
        assert disk_hash(path, old_size) == old_hash
        if jpath.exists():  # killed before deleting it: the journal still undoes all
            jn.revert(str(path), str(jpath))
            assert path.read_bytes() == original
        return "committed"
    if path.read_bytes() != original:
        # Changed and not committed: disabled, so nobody uses it before the revert.
        assert _disabled(path)
    if jpath.exists():
        jn.revert(str(path), str(jpath))
    assert not jpath.exists()
    assert path.read_bytes() == original
    assert is_valid(path)
    return "reverted"


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_kill_point_is_recoverable(case: str, tmp_path: Path) -> None:
    build, new_mb = CASES[case]
    path = build(tmp_path)
    jpath = tmp_path / "J"
    original = path.read_bytes()
    old_size = virtual_size(path)
    old_hash = disk_hash(path)
    pristine = tmp_path / "pristine"
    shutil.copy(path, pristine)

    def operation() -> None:
        rs.resize(str(path), new_mb * MB, journal=str(jpath))

    total = count_mutations(operation)
    assert not jpath.exists()
    outcomes = []
    for n in range(total + 1):
        shutil.copy(pristine, path)
        finished = crash_after(operation, n)
        outcome = _settle(path, jpath, original, old_size, new_mb * MB, old_hash)
        outcomes.append(outcome)
        assert finished == (n == total)
    # Early kills are undone, late ones find the resize done; never anything else.
    assert outcomes[0] == "reverted" and outcomes[-1] == "committed"
    assert outcomes == sorted(outcomes, key=lambda o: o == "committed")
    assert total >= 7


def _disabled(path: Path) -> bool:
    try:
        VhdImage.open(str(path)).close()
    except BlktapError:
        return True
    return False


def _interrupted(case: str, tmp: Path, which: float) -> tuple[Path, Path, bytes]:
    """An image whose resize was killed while it was disabled: ``which`` picks the kill
    point among those (0: the first, 1: the last)."""
    build, new_mb = CASES[case]
    path = build(tmp)
    jpath = tmp / "J"
    original = path.read_bytes()
    pristine = tmp / "pristine"
    shutil.copy(path, pristine)

    def operation() -> None:
        rs.resize(str(path), new_mb * MB, journal=str(jpath))

    def kill_at(n: int) -> None:
        shutil.copy(pristine, path)
        if jpath.exists():
            jpath.unlink()
        assert not crash_after(operation, n)

    disabled = []
    for n in range(count_mutations(operation)):
        kill_at(n)
        if _disabled(path):
            disabled.append(n)
    assert len(disabled) >= 3
    kill_at(disabled[round(which * (len(disabled) - 1))])
    assert jpath.exists()
    return path, jpath, original


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("which", [0.5, 1.0])
def test_a_killed_revert_can_be_run_again(case: str, which: float, tmp_path: Path) -> None:
    path, jpath, original = _interrupted(case, tmp_path, which)
    assert _disabled(path)  # refused while the resize is unfinished
    broken, saved_journal = tmp_path / "broken", tmp_path / "saved.journal"
    shutil.copy(path, broken)
    shutil.copy(jpath, saved_journal)

    def operation() -> None:
        jn.revert(str(path), str(jpath))

    total = count_mutations(operation)
    assert path.read_bytes() == original
    for n in range(total + 1):
        shutil.copy(broken, path)
        shutil.copy(saved_journal, jpath)
        crash_after(operation, n)
        if path.read_bytes() != original:  # half reverted: still disabled
            assert _disabled(path), n
        if jpath.exists() and n % 4 == 0:  # the command now and then, else the library
            proc = vhd_util("revert", "-n", str(path), "-j", str(jpath))
            assert (proc.returncode, proc.stdout) == (0, "")
        elif jpath.exists():
            jn.revert(str(path), str(jpath))
        assert path.read_bytes() == original, n
        assert not jpath.exists()
    assert total >= 4


def test_an_interrupted_resize_is_visible(tmp_path: Path) -> None:
    path, jpath, original = _interrupted("move", tmp_path, 0.5)
    with pytest.raises(BlktapError, match="interrupted resize"):
        Chain.open(named(path))
    for argv in (["resize", "-n", str(path), "-s", "800", "-j", str(tmp_path / "J2")],
                 ["resize", "-n", str(path), "-s", "30", "-f"],
                 ["check", "-n", str(path)]):
        proc = vhd_util(*argv)
        assert proc.returncode == 22, (argv, proc.stdout)
    proc = vhd_util("resize", "-n", str(path), "-s", "800", "-j", str(tmp_path / "J2"))
    assert proc.stdout.startswith(f"error opening {path}: -22 (")
    assert "revert" in proc.stdout
    proc = vhd_util("revert", "-n", str(path), "-j", str(jpath))
    assert (proc.returncode, proc.stdout) == (0, "")
    assert path.read_bytes() == original


# ------------------------------------------------------------ the journal format
def _parse_journal(raw: bytes) -> tuple[dict, list[tuple[int, int, int, bytes]]]:
    """An independent reader of docs/formats/vhd-journal.md."""
    cookie, uuid, footer_off, data_n, meta_n, data_off, meta_off = \
        struct.unpack_from(">8s16sQIIQQ", raw)
    (eof,) = struct.unpack_from("<Q", raw, 56)
    head = dict(cookie=cookie, uuid=uuid, footer_off=footer_off, data_n=data_n,
                meta_n=meta_n, data_off=data_off, meta_off=meta_off, eof=eof)
    entries = []
    pos = 512
    while pos < len(raw):
        ecookie, etype, size, offset, csum, pad = struct.unpack_from(">QIIQI4s", raw, pos)
        assert ecookie == 0xAAAA12344321AAAA
        payload = raw[pos + 32 : pos + 32 + size]
        zeroed = raw[pos : pos + 24] + b"\0" * 4 + raw[pos + 28 : pos + 32]
        assert csum == ~(sum(zeroed) + sum(payload)) & 0xFFFFFFFF
        entries.append((etype, offset, size, payload))
        pos += 32 + size
    return head, entries


def test_journal_layout(tmp_path: Path) -> None:
    child = child_with_data(tmp_path)
    original = child.read_bytes()
    plan = rs.plan_journaled(rs.load_target(str(child)), 2000 * MB)
    jpath = tmp_path / "J"
    rs.write_resize_journal(plan, str(jpath))
    raw = jpath.read_bytes()
    head, entries = _parse_journal(raw)
    with VhdImage.open(str(child)) as img:
        uuid = img.footer.uuid
    assert head["cookie"] == b"vjournal" and head["uuid"] == uuid
    assert head["footer_off"] == len(original) - 512
    assert head["eof"] == len(raw)  # little-endian, as the reference's x86 builds write
    assert head["meta_off"] == 512 and head["meta_n"] == 9
    kinds = [e[0] for e in entries]
    assert kinds[:9] == [1, 2, 3, 4, 4, 4, 5, 6, 7]
    assert kinds[9:] == [8] * head["data_n"] and head["data_n"] >= 1
    meta_end = 512 + sum(32 + e[2] for e in entries[:9])
    assert head["data_off"] == meta_end
    for _etype, offset, size, payload in entries:  # every payload is the image's bytes
        assert original[offset : offset + size] == payload
    # The data entries cover what the new metadata and the moved block overwrite.
    covered = {(e[1], e[2]) for e in entries[9:]}
    assert sum(size for _, size in covered) >= 2 * MB


def _c_style_journal(path: Path, jpath: Path) -> None:
    """A journal laid out the way the reference's C code writes one: header first,
    stack garbage in the entries' padding (counted in their checksums), the BAT entry as
    long as the current size needs, the moved block as a bitmap entry plus a data
    entry."""
    raw = path.read_bytes()
    with VhdImage.open(str(path)) as img:
        assert img.header is not None and img.batmap_header is not None
        uuid, hdr = img.footer.uuid, img.header
        bh_off = img.batmap_header_offset()
        bm = img.batmap_header
        block0 = img.bat[0] * 512
        locs = [(loc.data_offset, 512) for loc in hdr.loc if loc.code]
        curr_blocks = -(-img.size // (2 * MB))
    metas = [(1, len(raw) - 512, 512), (2, 0, 512), (3, 512, 1024)]
    metas += [(4, off, n) for off, n in locs]
    metas += [(5, hdr.table_offset, -(-curr_blocks * 4 // 512) * 512),
              (6, bh_off, 512), (7, bm.batmap_offset, bm.batmap_size * 512)]
    datas = [(8, block0, 512), (8, block0 + 512, 2 * MB)]
    body = b""
    for etype, offset, size in metas + datas:
        payload = raw[offset : offset + size]
        head = struct.pack(">QIIQI4s", 0xAAAA12344321AAAA, etype, size, offset, 0,
                           b"\xde\xad\xbe\xef")
        csum = ~(sum(head) + sum(payload)) & 0xFFFFFFFF
        body += struct.pack(">QIIQI4s", 0xAAAA12344321AAAA, etype, size, offset, csum,
                            b"\xde\xad\xbe\xef") + payload
    meta_len = sum(32 + size for _, _, size in metas)
    header = struct.pack(">8s16sQIIQQ", b"vjournal", uuid, len(raw) - 512, len(datas),
                         len(metas), 512 + meta_len, 512)
    header += struct.pack("<Q", 512 + len(body))
    jpath.write_bytes(header.ljust(512, b"\0") + body)


def test_reverts_a_journal_left_by_the_reference(tmp_path: Path) -> None:
    child = child_with_data(tmp_path)
    original = child.read_bytes()
    jpath = tmp_path / "J"
    _c_style_journal(child, jpath)
    # What the C resize does before it dies: footers poisoned (the primary at the end of
    # the data, the file cut there), block 0 copied away and zeroed, metadata shifted.
    with VhdImage.open(str(child)) as img:
        block0 = img.bat[0] * 512
        poisoned = jn.footer_poisoned(img.footer)
    with open(child, "r+b") as f:
        f.seek(0)
        f.write(poisoned)
        f.seek(len(original))
        f.write(original[block0 : block0 + 2 * MB + 512] + poisoned)
        f.seek(block0)
        f.write(bytes(2 * MB + 512))
        f.seek(1536)  # the old BAT, batmap and locators (the C journal holds no more)
        f.write(b"\xff" * (4608 - 1536))
    proc = vhd_util("revert", "-n", str(child), "-j", str(jpath))
    assert (proc.returncode, proc.stdout) == (0, "")
    assert child.read_bytes() == original
    assert not jpath.exists()


def test_committed_reference_journal_is_not_reverted(tmp_path: Path) -> None:
    path = dynamic_with_data(tmp_path / "d.vhd", 20)
    with VhdImage.open(str(path)) as img:
        uuid = img.footer.uuid
    jpath = tmp_path / "J"
    header = struct.pack(">8s16sQIIQQ", b"vjournal", uuid, path.stat().st_size - 512,
                         0, 0, 0, 0) + struct.pack("<Q", 4096)
    jpath.write_bytes(header.ljust(512, b"\0"))
    before = digest(path)
    proc = vhd_util("revert", "-n", str(path), "-j", str(jpath))
    assert proc.returncode == 22
    assert proc.stdout.startswith("opening journal failed: -22 (") and "committed" in proc.stdout
    assert digest(path) == before and jpath.exists()


# ------------------------------------------------------------ bad input
def _one_line(proc: subprocess.CompletedProcess, code: int, start: str) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith(start), proc.stdout
    assert proc.stderr == ""


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return dynamic_with_data(tmp_path / "d.vhd", 20)


@pytest.mark.parametrize(("args", "code", "start"), [
    (["-s", "40", "-j", "{J}"], 2, "error opening {missing}: -2 ("),
])
def test_missing_image(args: list[str], code: int, start: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope.vhd"
    fill = {"J": str(tmp_path / "J"), "missing": str(missing)}
    proc = vhd_util("resize", "-n", str(missing), *[a.format(**fill) for a in args])
    _one_line(proc, code, start.format(**fill))
    assert not (tmp_path / "J").exists()


def test_not_a_vhd(tmp_path: Path) -> None:
    junk = tmp_path / "junk.vhd"
    junk.write_bytes(os.urandom(64 << 10))
    before = digest(junk)
    for mode in (["-j", str(tmp_path / "J")], ["-f"]):
        proc = vhd_util("resize", "-n", str(junk), "-s", "40", *mode)
        _one_line(proc, 22, f"error opening {junk}: -22 (")
    empty = tmp_path / "empty.vhd"
    empty.write_bytes(b"")
    _one_line(vhd_util("resize", "-n", str(empty), "-s", "40", "-f"), 32,
              f"error opening {empty}: -32 (")
    assert digest(junk) == before and not (tmp_path / "J").exists()


def test_not_made_by_blktap(tmp_path: Path) -> None:
    qemu = need("qemu-img")
    path = tmp_path / "q.vhd"
    assert run([qemu, "create", "-f", "vpc", str(path), "20M"]).returncode == 0
    before = digest(path)
    proc = vhd_util("resize", "-n", str(path), "-s", "40", "-j", str(tmp_path / "J"))
    _one_line(proc, 22, f"{path} not created by xen; resize not supported")
    assert digest(path) == before


@pytest.mark.parametrize(("size", "mode", "code", "lines"), [
    ("0", "-j", 38, ["dynamic shrink not fully implemented", "resize failed: -38"]),
    ("abc", "-j", 38, ["dynamic shrink not fully implemented", "resize failed: -38"]),
    ("10", "-j", 38, ["dynamic shrink not fully implemented", "resize failed: -38"]),
    ("0", "-f", 22, ["{name}: size (0) < curr size (20971520)"]),
    ("10", "-f", 22, ["{name}: size (10485760) < curr size (20971520)"]),
    ("2088962", "-j", 22, ["resize failed: -22 ("]),
    ("99999999999999", "-j", 22, ["resize failed: -22 ("]),
    ("300", "-f", 22, ["resize failed: -22 ("]),  # past the BAT: needs a journal
])
def test_bad_sizes(size: str, mode: str, code: int, lines: list[str], image: Path,
                   tmp_path: Path) -> None:
    before = digest(image)
    jpath = tmp_path / "J"
    extra = [str(jpath)] if mode == "-j" else []
    proc = vhd_util("resize", "-n", str(image), "-s", size, mode, *extra)
    assert proc.returncode == code, proc.stdout
    got = proc.stdout.splitlines()
    assert len(got) == len(lines)
    for line, want in zip(got, lines, strict=True):
        assert line.startswith(want.format(name=image)), proc.stdout
    assert "Traceback" not in proc.stderr
    assert digest(image) == before and not jpath.exists()


def test_fast_resize_of_a_fixed_disk(tmp_path: Path) -> None:
    path = fixed_with_data(tmp_path / "x.vhd")
    before = digest(path)
    _one_line(vhd_util("resize", "-n", str(path), "-s", "10", "-f"), 22, "resize failed: -22 (")
    proc = vhd_util("resize", "-n", str(path), "-s", "2", "-j", str(tmp_path / "J"))
    assert proc.returncode == 38
    assert proc.stdout == "fixed shrink not fully implemented\nresize failed: -38\n"
    assert digest(path) == before


@pytest.mark.parametrize("argv", [
    ["-n", "{img}", "-s", "40"],  # neither -j nor -f
    ["-n", "{img}", "-s", "40", "-f", "-j", "{J}"],  # both
    ["-n", "{img}", "-j", "{J}"],  # no size
    ["-s", "40", "-f"],  # no name
    ["-n", "{img}", "-s", "40", "-f", "extra"],
    ["-h"],
])
def test_usage(argv: list[str], image: Path, tmp_path: Path) -> None:
    before = digest(image)
    fill = {"img": str(image), "J": str(tmp_path / "J")}
    proc = vhd_util("resize", *[a.format(**fill) for a in argv])
    assert proc.returncode == 22
    assert proc.stdout.startswith("options: <-n name> <-s size (in MB)> (<-j journal>|<-f fast>)")
    assert digest(image) == before and not (tmp_path / "J").exists()
    proc = vhd_util("revert", "-n", str(image))
    assert (proc.returncode, proc.stdout) == (22, "options: <-n name> <-j journal> [-h help]\n")


def test_journal_already_exists(image: Path, tmp_path: Path) -> None:
    jpath = tmp_path / "J"
    jpath.write_bytes(b"keep me")
    before = digest(image)
    proc = vhd_util("resize", "-n", str(image), "-s", "600", "-j", str(jpath))
    _one_line(proc, 17, "creating journal failed: -17 (")
    assert jpath.read_bytes() == b"keep me" and digest(image) == before


def test_unwritable_journal_folder(image: Path, tmp_path: Path) -> None:
    before = digest(image)
    # A folder that is a file, and one that does not exist.
    (tmp_path / "file").write_bytes(b"")
    for jpath, code in ((tmp_path / "file" / "J", errno.ENOTDIR),
                        (tmp_path / "none" / "J", errno.ENOENT)):
        proc = vhd_util("resize", "-n", str(image), "-s", "600", "-j", str(jpath))
        _one_line(proc, code, f"creating journal failed: {-code} (")
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o555)
        want = errno.EACCES
    else:  # root writes anywhere: an immutable folder it cannot
        if shutil.which("chattr") is None or \
                run(["chattr", "+i", str(locked)]).returncode != 0:
            pytest.skip("cannot make an unwritable folder as root here")
        want = errno.EPERM
    try:
        proc = vhd_util("resize", "-n", str(image), "-s", "600", "-j", str(locked / "J"))
        _one_line(proc, want, f"creating journal failed: {-want} (")
    finally:
        if os.geteuid() == 0:
            run(["chattr", "-i", str(locked)])
        locked.chmod(0o755)
    assert digest(image) == before and not (locked / "J").exists()


def test_revert_bad_journals(image: Path, tmp_path: Path) -> None:
    before = digest(image)
    missing = tmp_path / "missing.journal"
    _one_line(vhd_util("revert", "-n", str(image), "-j", str(missing)), 2,
              "opening journal failed: -2 (")
    corrupt = tmp_path / "corrupt.journal"
    corrupt.write_bytes(os.urandom(8192))
    _one_line(vhd_util("revert", "-n", str(image), "-j", str(corrupt)), 22,
              "opening journal failed: -22 (")
    # A real journal, damaged in one payload byte: its checksum catches it.
    other = dynamic_with_data(tmp_path / "other.vhd", 20)
    plan = rs.plan_journaled(rs.load_target(str(other)), 600 * MB)
    good = tmp_path / "other.journal"
    rs.write_resize_journal(plan, str(good))
    damaged = tmp_path / "damaged.journal"
    data = bytearray(good.read_bytes())
    data[-100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    proc = vhd_util("revert", "-n", str(other), "-j", str(damaged))
    _one_line(proc, 22, "opening journal failed: -22 (")
    assert "checksum" in proc.stdout
    # The journal of another image.
    proc = vhd_util("revert", "-n", str(image), "-j", str(good))
    _one_line(proc, 22, "opening journal failed: -22 (")
    assert "journal of image" in proc.stdout
    # A missing image.
    proc = vhd_util("revert", "-n", str(tmp_path / "gone.vhd"), "-j", str(good))
    _one_line(proc, 2, "opening journal failed: -2 (")
    assert digest(image) == before and good.exists() and corrupt.exists()


def test_incomplete_journal_is_dropped(image: Path, tmp_path: Path) -> None:
    """A journal whose writer died before its header: the image was never touched."""
    before = digest(image)
    jpath = tmp_path / "J"
    jpath.write_bytes(bytes(4096))
    proc = vhd_util("revert", "-n", str(image), "-j", str(jpath))
    assert (proc.returncode, proc.stdout) == (0, "")
    assert digest(image) == before and not jpath.exists()


# ------------------------------------------------------------ failures while resizing
def test_a_failing_resize_is_undone(image: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """An I/O error half way (here: the disk fills up while a block moves) leaves the
    image as it was and no journal, with the reference's messages."""
    from blktap.cli.vhd_util import run as vhd_util_main
    from blktap.cli.vhd_util.options import Output

    original = image.read_bytes()
    jpath = tmp_path / "J"

    def no_space(*_args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rs, "copy_range", no_space)
    with pytest.raises(BlktapError) as info:
        rs.resize(str(image), 600 * MB, journal=str(jpath))
    assert info.value.errno == errno.ENOSPC and "image restored" in str(info.value)
    assert image.read_bytes() == original and not jpath.exists()

    out = Output()
    code = vhd_util_main(["vhd-util", "resize", "-n", str(image), "-s", "600", "-j",
                          str(jpath)], out)
    out.close()
    assert code == errno.ENOSPC
    assert capsys.readouterr().out.startswith("resize failed: -28 (")
    assert image.read_bytes() == original and not jpath.exists()


@pytest.mark.parametrize("signal_like", [KeyboardInterrupt, "Terminated"])
def test_an_interrupted_resize_is_undone(image: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         signal_like: object) -> None:
    """Ctrl-C, or the SIGTERM/SIGHUP the CLIs turn into an exception, half way: the
    image is put back and the journal removed (nothing left beside the image)."""
    from blktap.cli.common import Terminated

    exc_type = Terminated if signal_like == "Terminated" else signal_like
    original = image.read_bytes()
    jpath = tmp_path / "J"

    def interrupted(*_args: object) -> None:
        raise exc_type()  # type: ignore[operator]

    monkeypatch.setattr(rs, "copy_range", interrupted)
    with pytest.raises(exc_type):  # type: ignore[call-overload]
        rs.resize(str(image), 600 * MB, journal=str(jpath))
    assert image.read_bytes() == original and not jpath.exists()


# ------------------------------------------------------------ block devices
def test_journal_on_a_block_device(image: Path, tmp_path: Path,
                                   loop_device: Callable[[Path], str]) -> None:  # noqa: F811
    """XenServer keeps resize journals in logical volumes: the device is reused, its
    header zeroed when the journal is done."""
    backing = tmp_path / "journal.lv"
    backing.write_bytes(b"\xaa" * (8 * MB))  # stale bytes, as a reused volume has
    dev = loop_device(backing)
    before = disk_hash(image)
    proc = vhd_util("resize", "-n", str(image), "-s", "600", "-j", dev)
    assert (proc.returncode, proc.stdout) == (0, "")
    assert virtual_size(image) == 600 * MB and disk_hash(image, 20 * MB) == before
    with open(dev, "rb") as f:
        assert f.read(512) == bytes(512)  # no longer a journal
    # Interrupted, then reverted from the device.
    image2 = dynamic_with_data(tmp_path / "e.vhd", 20)
    original = image2.read_bytes()
    total = count_mutations(lambda: rs.resize(str(image2), 600 * MB, journal=dev))
    image2.write_bytes(original)
    assert not crash_after(lambda: rs.resize(str(image2), 600 * MB, journal=dev), total - 3)
    assert _disabled(image2)
    proc = vhd_util("revert", "-n", str(image2), "-j", dev)
    assert (proc.returncode, proc.stdout) == (0, "")
    assert image2.read_bytes() == original
    # A device too small for the journal.
    tiny = tmp_path / "tiny.lv"
    tiny.write_bytes(bytes(4096))
    proc = vhd_util("resize", "-n", str(image2), "-s", "600", "-j", loop_device(tiny))
    _one_line(proc, errno.ENOSPC, "creating journal failed: -28 (")
    assert image2.read_bytes() == original


def test_image_on_a_block_device(tmp_path: Path,
                                 loop_device: Callable[[Path], str]) -> None:  # noqa: F811
    """A VHD on a volume keeps its footer at the end of the device (the storage manager
    grows the volume and moves the footer there before the resize)."""
    path = dynamic_with_data(tmp_path / "d.vhd", 20)
    before = disk_hash(path)
    assert vhd_util("modify", "-n", str(path), "-s", str(16 * MB)).returncode == 0
    assert path.stat().st_size == 16 * MB
    dev = loop_device(path)
    proc = vhd_util("resize", "-n", dev, "-s", "600", "-j", str(tmp_path / "J"))
    assert (proc.returncode, proc.stdout) == (0, "")
    assert virtual_size(dev) == 600 * MB
    assert disk_hash(dev, 20 * MB) == before
    assert is_valid(dev)
    assert path.stat().st_size == 16 * MB  # nothing past the device
    # Moving a block past what the device holds: refused before anything changes.
    small = dynamic_with_data(tmp_path / "s.vhd", 20)
    assert vhd_util("modify", "-n", str(small), "-s", str(8 * MB)).returncode == 0
    snap = small.read_bytes()
    proc = vhd_util("resize", "-n", loop_device(small), "-s", "600", "-j", str(tmp_path / "J"))
    _one_line(proc, errno.ENOSPC, "resize failed: -28 (")
    assert small.read_bytes() == snap and not (tmp_path / "J").exists()


def test_fixed_disk_whose_data_starts_like_a_poisoned_footer(tmp_path: Path) -> None:
    """Offset 0 of a fixed disk is the guest's: a poisoned footer there is just data."""
    path = fixed_with_data(tmp_path / "x.vhd")
    with VhdImage.open(str(path)) as img:
        fake = jn.footer_poisoned(img.footer)
    with Chain.open(named(path), writable=True) as disk:
        disk.pwrite(0, fake)
    _grow_journaled(path, 8)
    with Chain.open(named(path)) as disk:
        assert disk.pread(0, 512) == fake


def test_flags_survive(image: Path) -> None:
    """The hidden flag (footers) and the marker (batmap header) come through a resize
    that grows the batmap and moves its header."""
    assert vhd_util("set", "-n", str(image), "-f", "hidden", "-v", "1").returncode == 0
    assert vhd_util("set", "-n", str(image), "-f", "marker", "-v", "5").returncode == 0
    _grow_journaled(image, 40 * 1024)  # the batmap grows to 5 sectors
    with VhdImage.open(str(image)) as img:
        assert img.batmap_header is not None and img.batmap_header.batmap_size == 5
    proc = vhd_util("query", "-n", str(image), "-v", "-f", "-m")
    assert proc.stdout == "40960\nhidden: 1\nmarker: 5\n"
    assert is_valid(image)


def test_unwritable_image(image: Path, tmp_path: Path) -> None:
    """An image that cannot be opened for writing gets no journal."""
    before = digest(image)
    jpath = tmp_path / "J"
    if os.geteuid() != 0:
        image.chmod(0o444)
        want = errno.EACCES
    else:
        if shutil.which("chattr") is None or run(["chattr", "+i", str(image)]).returncode:
            pytest.skip("cannot make an unwritable file as root here")
        want = errno.EPERM
    try:
        proc = vhd_util("resize", "-n", str(image), "-s", "600", "-j", str(jpath))
        _one_line(proc, want, f"creating journal failed: {-want} (")
    finally:
        if os.geteuid() == 0:
            run(["chattr", "-i", str(image)])
        image.chmod(0o644)
    assert digest(image) == before and not jpath.exists()
