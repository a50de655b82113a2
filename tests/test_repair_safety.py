"""vhd-util repair on corrupt images (issue 21, item 5): it repairs what it can prove and
refuses the rest, never damaging an image.

Each mutant class is either repaired (then ``vhd-util check`` passes and the disk reads
back what it held before the corruption) or refused (a nonzero exit, the reason on stderr,
and the file byte-identical). Before the fix, repair exited 0 on most of the refused
classes, leaving the image invalid, grown to a terabyte, or cut through blocks in use.
A property test mutates random bytes of the metadata and holds repair to: exit 0 implies
``check`` passes and the content is unchanged; the file never shrinks below a block in
use nor grows by more than a block and a footer; nothing but the footers (and a batmap
failing its checksum, emptied) changes; a refusal changes nothing.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import corrupt as c
from blktap.errors import EncryptionError, FormatError
from blktap.image import Chain
from blktap.image.vhd import VhdImage, create, snapshot
from blktap.image.vhd import check as vhd_check
from blktap.image.vhd import repair as repair_mod
from blktap.image.vhd import structs as s
from blktap.image.vhd.repair import repair
from conftest import run, tool
from faults import count_mutations, crash_after

MB = 1 << 20
SIZE = 16 * MB
BLOCK = 2 * MB + 512  # a 2 MiB block and its one-sector bitmap


def vu(*args: str) -> subprocess.CompletedProcess:
    return run([tool("vhd-util"), *args], text=True)


def _write(path: str, writes: list[tuple[int, bytes]]) -> None:
    with Chain.open(f"vhd:{path}", writable=True) as chain:
        for off, data in writes:
            chain.pwrite(off, data)


def content(path: str) -> str:
    """SHA-256 of the whole virtual disk, the chain resolved."""
    digest = hashlib.sha256()
    with Chain.open(f"vhd:{path}") as chain:
        for off in range(0, chain.size, 4 * MB):
            digest.update(chain.pread(off, min(4 * MB, chain.size - off)))
    return digest.hexdigest()


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MB):
            h.update(chunk)
    return h.hexdigest()


def restore(path: str, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(data)


class Pristine(dict):
    """The bytes of each pristine image, by name (a short repr for hypothesis)."""

    def __repr__(self) -> str:
        return f"Pristine({sorted(self)})"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    """A dynamic base with data in blocks 0, 2 and 3 (block 3 full, so its batmap bit is
    set), and a differencing child with data in blocks 0, 4 and 5 (full)."""
    root = tmp_path_factory.mktemp("repair-safety")
    base = str(root / "base.vhd")
    create(base, SIZE)
    _write(base, [(0, b"a" * 8192), (5 * MB, b"b" * 4096), (6 * MB, b"f" * (2 * MB))])
    child = str(root / "child.vhd")
    snapshot(child, base)
    _write(child, [(4096, b"c" * 1024), (9 * MB, b"d" * 4096), (10 * MB, b"g" * (2 * MB))])
    return Pristine({"base.vhd": Path(base).read_bytes(),
                     "child.vhd": Path(child).read_bytes()})


@pytest.fixture
def folder(tmp_path: Path, images: Pristine) -> Path:
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


# ----------------------------------------------------------------------- mutants
def _primary_checksum(p: str) -> None:
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.seek(size - 512 + 64)
        f.write(b"\x12\x34\x56\x78")


def _backup_garbage(p: str) -> None:
    with open(p, "r+b") as f:
        f.write(b"garbage!")


def _backup_differs(p: str) -> None:
    """A valid copy at 0 that is not the primary footer (another hidden value)."""
    foot = c.read_footer(p)
    foot.hidden = 1
    c.write_footers(p, foot)  # both
    foot.hidden = 0
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.seek(size - 512)
        f.write(foot.sealed().pack())


def _writer_crash(p: str) -> None:
    """The footer killed (0xC7) and the file grown past it: a writer killed while
    appending a block."""
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.seek(size - 512)
        f.write(b"\xc7" * 512)
        f.truncate(size + 2 * MB + 4096)


def _table_offset_zero(p: str) -> None:
    c.set_header_fields(p, table_offset=0)


def _same_block(p: str) -> None:
    used = c.allocated(p)
    c.write_bat_entry(p, used[1][0], used[0][1])


def _bat_last_far_past_eof(p: str) -> None:
    """The last block's entry at sector 0x7FFFFFFF: the old repair grew the file to 1 TiB."""
    c.write_bat_entry(p, c.allocated(p)[-1][0], 0x7FFFFFFF)


def _bat_into_header(p: str) -> None:
    c.write_bat_entry(p, c.allocated(p)[0][0], c.read_footer(p).data_offset // 512)


def _geometry(p: str) -> None:
    c.set_footer_fields(p, geometry=0xFFFFFFFF)


def _curr_size_past_bat(p: str) -> None:
    c.set_footer_fields(p, curr_size=c.read_footer(p).curr_size * 64)


def _timestamp_future(p: str) -> None:
    c.set_footer_fields(p, timestamp=0xFFFFFFF0)


def _truncated_in_last_block(p: str) -> None:
    """Cut inside the last block's data, where its bitmap says sectors were written."""
    _, sector = c.allocated(p)[-1]
    os.truncate(p, sector * 512 + 512 + 512)


def _truncated_two_blocks(p: str) -> None:
    used = c.allocated(p)
    os.truncate(p, used[-2][1] * 512 + 1024)


def _primary_and_table(p: str) -> None:
    """The classic repairable damage plus one that is not: nothing may be written."""
    _table_offset_zero(p)
    _primary_checksum(p)


def _batmap_over_bat(p: str) -> None:
    """The batmap's offset pointed at the BAT (its checksum then fails): rebuilding that
    "batmap" would zero the BAT."""
    off, bh, _ = c.read_batmap(p)
    bh.batmap_offset = c.read_header(p).table_offset
    c._pwrite(p, bh.pack(), off)


def _batmap_over_block(p: str) -> None:
    off, bh, _ = c.read_batmap(p)
    bh.batmap_offset = c.allocated(p)[-1][1] * 512 + 4096
    c._pwrite(p, bh.pack(), off)


REFUSED: dict[str, Callable[[str], None]] = {
    "table offset 0": _table_offset_zero,
    "table offset past EOF": c.damage_table_offset,
    "max_table_entries huge": c.damage_max_bat_size,
    "BAT entry past EOF": c.damage_bat_entry_past_eof,
    "BAT entry far past EOF": _bat_last_far_past_eof,
    "two BAT entries, one block": _same_block,
    "overlapping blocks": c.damage_bat_overlap,
    "block over the BAT": c.damage_bat_entry_into_metadata,
    "block over the header": _bat_into_header,
    "current size past the BAT": _curr_size_past_bat,
    "geometry too large": _geometry,
    "creation time in future": _timestamp_future,
    "both footers": c.damage_footer_checksum,
    "truncated": c.truncate,
    "truncated in the last block": _truncated_in_last_block,
    "truncated through two blocks": _truncated_two_blocks,
    "batmap offset": c.damage_batmap_offset,
    "batmap over the BAT": _batmap_over_bat,
    "batmap over a block": _batmap_over_block,
    "header checksum": c.damage_header_checksum,
    "block size": c.damage_block_size,
    "primary footer and table offset": _primary_and_table,
}

# What the old repair did with some of them (exit 0 each time): the file's size after.
# A reminder of why the refusals matter; the tests assert the size never changes.
#   table offset 0            -> ~1 TB (a BAT read from the footer copy)
#   BAT entry far past EOF    -> 1 TiB
#   two BAT entries, one block, overlapping blocks -> cut through blocks in use


@pytest.mark.parametrize("target", ["base.vhd", "child.vhd"])
@pytest.mark.parametrize("mutant", list(REFUSED))
def test_refused_mutants_are_left_untouched(folder: Path, target: str, mutant: str) -> None:
    path = str(folder / target)
    REFUSED[mutant](path)
    assert vu("check", "-n", path).returncode != 0
    size, before = os.path.getsize(path), file_digest(path)
    proc = vu("repair", "-n", path)
    assert proc.returncode != 0, (mutant, proc.stdout)
    assert proc.stdout in (f"error opening {path}: {-proc.returncode}\n",
                           f"error writing footer: {-proc.returncode}\n")
    if proc.stdout.startswith("error writing footer"):
        # one line saying why, and that nothing was written
        assert proc.stderr.count("\n") == 1 and "nothing written" in proc.stderr
    assert os.path.getsize(path) == size
    assert file_digest(path) == before
    assert vu("repair", "-b", "-n", path).returncode != 0
    assert file_digest(path) == before


@pytest.mark.parametrize("mutant,field", [
    ("table offset 0", "invalid table offset"),
    ("two BAT entries, one block", "clobbers block"),
    ("overlapping blocks", "clobbers block"),
    ("block over the BAT", "clobbers headers"),
    ("geometry too large", "geometry too large"),
    ("BAT entry past EOF", "BAT entry of block"),
    ("BAT entry far past EOF", "BAT entry of block"),
    ("truncated in the last block", "written sectors past the end"),
    ("truncated through two blocks", "BAT entries of 2 blocks"),
])
def test_refusal_names_the_fault(folder: Path, mutant: str, field: str) -> None:
    path = str(folder / "base.vhd")
    REFUSED[mutant](path)
    proc = vu("repair", "-n", path)
    assert (proc.returncode, proc.stdout) == (errno.EINVAL, "error writing footer: -22\n")
    assert field in proc.stderr, proc.stderr


def _reference_marker_bug(p: str) -> None:
    """What the reference's ``set -f marker -v 1`` does: 1024 bytes over the batmap
    header, the second 512 of them zeroing the map's first sector, its checksum stale."""
    off, bh, data = c.read_batmap(p)
    assert bh.batmap_offset == off + 512 and any(data[:512])
    bh.marker = 1
    c._pwrite(p, bh.pack() + bytes(512), off)


REPAIRED: dict[str, Callable[[str], None]] = {
    "primary footer damaged, backup good": _primary_checksum,
    "backup damaged, primary good": _backup_garbage,
    "footers differ": _backup_differs,
    "writer killed while appending": _writer_crash,
    "batmap checksum": c.damage_batmap_checksum,
    "batmap and primary footer": lambda p: (c.damage_batmap_checksum(p),
                                            _primary_checksum(p)),
    "reference's set -f marker": _reference_marker_bug,
}


@pytest.mark.parametrize("target", ["base.vhd", "child.vhd"])
@pytest.mark.parametrize("mutant", list(REPAIRED))
def test_repairable_mutants_are_repaired(folder: Path, target: str, mutant: str) -> None:
    path = str(folder / target)
    before, size = content(path), os.path.getsize(path)
    REPAIRED[mutant](path)
    assert vu("check", "-n", path).returncode != 0
    proc = vu("repair", "-n", path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert vu("check", "-n", path).stdout == f"{path} is valid\n"
    assert os.path.getsize(path) == size
    assert content(path) == before


def test_batmap_rebuilt_keeps_marker_and_crash_safety(folder: Path) -> None:
    """A batmap failing its checksum is replaced by an empty one (the marker and key hash
    kept) before the footers are written; killed at any write, the disk reads the same
    and a second repair finishes the job."""
    path = str(folder / "child.vhd")
    before = content(path)
    _reference_marker_bug(path)
    _primary_checksum(path)
    damaged = Path(path).read_bytes()
    total = count_mutations(lambda: repair(path))
    assert total == 3  # the batmap (header and map in one write), the copy at 0, the end
    for n in range(total + 1):
        restore(path, damaged)
        crash_after(lambda: repair(path), n)
        assert content(path) == before, n
        repair(path)
        assert vhd_check.check_image(path).ok and content(path) == before, n
    assert vu("query", "-n", path, "-m").stdout == "marker: 1\n"
    _, bh, data = c.read_batmap(path)
    assert not any(data) and bh.checksum == s.batmap_checksum(data, SIZE)


def _sparse_writer_crash(path: str, keep: int) -> int:
    """Write 64 KiB at the start of a new block (block 7), then leave the file as a writer
    appending that block in pieces leaves it when killed: the footer never written back,
    the file ending ``keep`` bytes into the block's data. Returns the block's offset."""
    _write(path, [(14 * MB, b"x" * 65536)])
    start = dict(c.allocated(path))[7] * 512
    os.truncate(path, start + 512 + keep)
    return start


def test_repair_grows_a_block_whose_unwritten_tail_is_missing(folder: Path) -> None:
    """The one growth repair allows: the last block's tail, when its bitmap says nothing
    there was written. The reference does the same."""
    path = str(folder / "base.vhd")
    _write(path, [(14 * MB, b"x" * 65536)])
    before = content(path)
    start = _sparse_writer_crash(path, 65536)
    assert vu("check", "-i", "-n", path).returncode != 0
    proc = vu("repair", "-n", path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert vu("check", "-n", path).stdout == f"{path} is valid\n"
    assert os.path.getsize(path) == start + BLOCK + 512
    assert content(path) == before


def test_repair_refuses_a_block_whose_written_tail_is_missing(folder: Path) -> None:
    path = str(folder / "base.vhd")
    _sparse_writer_crash(path, 32768)  # half of what the bitmap says was written
    before = file_digest(path)
    proc = vu("repair", "-n", path)
    assert (proc.returncode, proc.stdout) == (errno.EINVAL, "error writing footer: -22\n")
    assert "block 7" in proc.stderr and "written sectors past the end" in proc.stderr
    assert file_digest(path) == before


def test_repair_undoes_its_writes_when_the_check_after_fails(
        folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the repaired image fail its check (the file changed under repair), the bytes
    written are put back and the failure is reported."""
    path = str(folder / "child.vhd")
    _primary_checksum(path)
    before = file_digest(path)

    def failing(p: str, opts: object = None) -> vhd_check.CheckResult:
        return vhd_check.CheckResult(p, errno.EINVAL, ["header is invalid: meddled with"])

    monkeypatch.setattr(repair_mod.vhd_check, "check_image", failing)
    with pytest.raises(FormatError, match="repair undone.*meddled with"):
        repair(path)
    assert file_digest(path) == before


def test_fixed_disk_mutants(tmp_path: Path) -> None:
    fixed = str(tmp_path / "fixed.vhd")
    create(fixed, 4 * MB, fixed=True)
    for damage in (c.damage_fixed_size, _geometry, _primary_checksum):
        shutil.copy(fixed, tmp_path / "f.vhd")
        path = str(tmp_path / "f.vhd")
        damage(path)
        before = file_digest(path)
        proc = vu("repair", "-n", path)
        assert proc.returncode == errno.EINVAL, damage
        assert file_digest(path) == before


# ---------------------------------------------------------------- the property
def _last_block_end(path: str) -> int:
    """The end of the last block the BAT uses and of the BAT itself (read with the
    test's own helpers, not repair's)."""
    h = c.read_header(path)
    ends = [sector * 512 + BLOCK for _, sector in c.allocated(path)]
    return max([h.table_offset + h.max_bat_size * 4, *ends])


mutations = st.lists(st.tuples(st.integers(0, 1 << 30), st.binary(min_size=1, max_size=4)),
                     min_size=1, max_size=6)


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(target=st.sampled_from(["base.vhd", "child.vhd"]), changes=mutations,
       tail=st.booleans())
def test_random_metadata_damage(folder: Path, images: Pristine, target: str,
                                changes: list[tuple[int, bytes]], tail: bool) -> None:
    for name, data in images.items():
        restore(str(folder / name), data)
    path = str(folder / target)
    original = images[target]
    with VhdImage.open(path) as img:
        meta_end = img.end_of_metadata()
    size = len(original)
    in_use = _last_block_end(path)  # the original's blocks: all of the file but its footer
    assert in_use + 512 == size
    before_content = content(path)
    with open(path, "r+b") as f:
        for pos, data in changes:
            # bytes of the metadata (footer copy, header, BAT, batmap, locators) or, with
            # ``tail``, of the primary footer too
            off = size - 512 + pos % 512 if tail and pos & 1 else pos % meta_end
            f.seek(off)
            f.write(data[: size - off])
    damaged = Path(path).read_bytes()
    try:
        repair(path)
    except FormatError:
        event("refused")
        assert Path(path).read_bytes() == damaged  # refused: nothing written
        return
    event("repaired")
    after = os.path.getsize(path)
    assert vhd_check.check_image(path).ok
    assert _last_block_end(path) + 512 <= after
    assert size <= after <= size + BLOCK + 512  # no block cut, at most one grown
    # repair wrote the footers and nothing else, but for a batmap failing its checksum,
    # which it empties
    repaired = bytearray(Path(path).read_bytes())
    expect = bytearray(damaged[: after - 512].ljust(after - 512, b"\0"))
    try:
        off, bh, data = c.read_batmap(path)
    except ValueError:
        pass
    else:
        ranges = ((off, 512), (bh.batmap_offset, len(data)))
        if any(repaired[a : a + n] != expect[a : a + n] for a, n in ranges):
            event("batmap rebuilt")
            assert not any(data)
            assert bh.checksum == s.batmap_checksum(data, c.read_footer(path).curr_size,
                                                    bh.batmap_version)
            for a, n in ranges:
                repaired[a : a + n] = expect[a : a + n] = bytes(n)
    assert repaired[512 : after - 512] == expect[512:]
    try:
        assert content(path) == before_content
    except EncryptionError:
        # The damage set the key-hash cookie in the batmap header, which no checksum
        # covers and check does not judge: the disk now needs a key, before repair as
        # after (repair left those bytes as they were, asserted above).
        event("marked encrypted")


@pytest.mark.parametrize("name", ["data.vhd", "snap2.vhd", "prealloc.vhd", "resized.vhd",
                                  "fixed.vhd"])
def test_reference_images_repaired_to_the_same_bytes(ref_copy: Path, name: str) -> None:
    """The compat promise: on what the reference repairs well (a healthy image, a writer
    killed while appending, a damaged footer at the end) the result is byte for byte the
    image the reference's tools made."""
    path = str(ref_copy / name)
    pristine = Path(path).read_bytes()
    damages: list[Callable[[str], None]] = [lambda p: None]
    if name != "fixed.vhd":  # a fixed disk has no copy of its footer to repair from
        damages += [_primary_checksum, _writer_crash]
    for damage in damages:
        restore(path, pristine)
        damage(path)
        proc = vu("repair", "-n", path)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", ""), damage
        assert Path(path).read_bytes() == pristine, damage


def test_growth_crash_safety(folder: Path) -> None:
    """Killed at any write while growing the last block's tail: the file is as it was (the
    copy at 0 is rewritten with the same bytes) or repaired, and a second repair finishes
    the job."""
    path = str(folder / "base.vhd")
    _write(path, [(14 * MB, b"x" * 65536)])
    before = content(path)
    _sparse_writer_crash(path, 65536)
    damaged = Path(path).read_bytes()
    total = count_mutations(lambda: repair(path))
    assert total == 2  # the copy at 0, the footer at the end (which grows the file)
    for n in range(total + 1):
        restore(path, damaged)
        finished = crash_after(lambda: repair(path), n)
        if finished:
            assert vhd_check.check_image(path).ok
        else:
            assert Path(path).read_bytes() == damaged, n
        repair(path)
        assert vhd_check.check_image(path).ok and content(path) == before, n


def test_child_whose_parent_is_missing_is_refused(folder: Path) -> None:
    """``check`` rejects a differencing image whose parent cannot be found, so repair
    refuses it too (with check's reason), where the reference rewrote its footer: link it
    to its parent first (``modify -p``), then repair."""
    path = str(folder / "child.vhd")
    _primary_checksum(path)
    os.rename(folder / "base.vhd", folder / "elsewhere.vhd")
    before = file_digest(path)
    proc = vu("repair", "-n", path)
    assert (proc.returncode, proc.stdout) == (errno.EINVAL, "error writing footer: -22\n")
    assert "error resolving" in proc.stderr and file_digest(path) == before
    os.rename(folder / "elsewhere.vhd", folder / "base.vhd")
    assert vu("repair", "-n", path).returncode == 0
    assert vu("check", "-n", path).returncode == 0


def test_header_over_the_footer_copy_is_refused(folder: Path) -> None:
    """A header that starts inside the first sector: the copy at 0 would overwrite it."""
    path = str(folder / "base.vhd")
    header = c.read_header(path)
    foot = c.read_footer(path)
    foot.data_offset = 256
    raw = header.sealed().pack()
    with open(path, "r+b") as f:  # the header at 256, the footer copies pointing there
        f.seek(256)
        f.write(raw)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - 512)
        f.write(foot.sealed().pack())
    before = file_digest(path)
    proc = vu("repair", "-n", path)
    assert (proc.returncode, proc.stdout) == (errno.EINVAL, "error writing footer: -22\n")
    assert "overlaps the footer copy at 0" in proc.stderr and file_digest(path) == before
