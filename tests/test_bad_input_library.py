"""Bad input at the library level: every corrupt image (tests/corrupt.py) and every
non-image is refused with a BlktapError that names the problem, never with another
exception type, and opening it never changes a byte of it."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corrupt as C
from blktap.errors import (
    BlktapError,
    FormatError,
    ParentLoop,
    ParentNotFound,
)
from blktap.image import Chain, RawImage, VhdImage
from blktap.image.vhd import create, snapshot
from blktap.image.vhd.create import chain_depth
from conftest import named

MiB = 1 << 20
BLOCK = 2 * MiB
SIZE = 24 * MiB  # at least 16 MB, so that the batmap checksum covers the map


def digest_dir(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def make_dynamic(folder: Path) -> str:
    """A dynamic disk with three partially written blocks."""
    path = str(folder / "d.vhd")
    create(path, SIZE)
    with Chain.open(named(path), writable=True) as chain:
        chain.pwrite(0, b"a" * 5000)
        chain.pwrite(5 * MiB, b"b" * 4096)
        chain.pwrite(9 * MiB + 512, b"c" * 512)
    return path


def make_empty_dynamic(folder: Path) -> str:
    path = str(folder / "e.vhd")
    create(path, SIZE)
    return path


def make_fixed(folder: Path) -> str:
    path = str(folder / "f.vhd")
    create(path, 8 * MiB, fixed=True)
    with Chain.open(named(path), writable=True) as chain:
        chain.pwrite(1000, b"f" * 1000)
    return path


def make_base(folder: Path) -> str:
    base = str(folder / "base.vhd")
    create(base, SIZE)
    with Chain.open(named(base), writable=True) as chain:
        chain.pwrite(0, random.Random(1).randbytes(6 * MiB))
    return base


def make_differencing(folder: Path) -> str:
    """A child over a written base, with a partial block of its own."""
    base = make_base(folder)
    child = str(folder / "child.vhd")
    snapshot(child, base)
    with Chain.open(named(child), writable=True) as chain:
        chain.pwrite(1000, b"k" * 3000)
        chain.pwrite(4 * MiB, b"K" * BLOCK)
    return child


def make_pair(folder: Path) -> str:
    """a.vhd over base.vhd and b.vhd over a.vhd (to be turned into a loop)."""
    base = make_base(folder)
    a = str(folder / "a.vhd")
    snapshot(a, base)
    snapshot(str(folder / "b.vhd"), a, skip_empty=False)
    return a


def loop_pair(path: str) -> None:
    C.make_parent_loop(path, os.path.join(os.path.dirname(path), "b.vhd"))


@dataclass
class Case:
    name: str
    build: Callable[[Path], str]
    damage: Callable[[str], None]
    error: type[BlktapError]
    pattern: str  # a regular expression the message must match (case-insensitive)
    cookie_kept: bool = True  # probing (Chain.open without a prefix) still finds a VHD
    chain_only: bool = False  # the image itself is fine, its chain is not


CASES = [
    Case("truncated-dynamic", make_dynamic, C.truncate, FormatError, r"past end of file"),
    Case("truncated-empty", make_empty_dynamic, C.truncate, FormatError,
         r"past end of file"),
    Case("truncated-fixed", make_fixed, C.truncate, FormatError, r"footer",
         cookie_kept=False),
    # The header cookie at 512 still tells a probe that this is a VHD.
    Case("footer-cookie", make_dynamic, C.damage_footer_cookie, FormatError,
         r"footer.*cookie"),
    Case("footer-cookie-fixed", make_fixed, C.damage_footer_cookie, FormatError,
         r"footer.*cookie", cookie_kept=False),
    Case("footer-checksum", make_dynamic, C.damage_footer_checksum, FormatError,
         r"footer.*checksum"),
    Case("footer-checksum-fixed", make_fixed, C.damage_footer_checksum, FormatError,
         r"footer.*checksum"),
    Case("header-cookie", make_dynamic, C.damage_header_cookie, FormatError,
         r"header.*cookie"),
    Case("header-checksum", make_dynamic, C.damage_header_checksum, FormatError,
         r"header.*checksum"),
    Case("bat-past-eof", make_dynamic, C.damage_bat_entry_past_eof, FormatError,
         r"block 0 .*past end of file"),
    Case("bat-past-eof-empty", make_empty_dynamic, C.damage_bat_entry_past_eof, FormatError,
         r"block 0 .*past end of file"),
    Case("bat-into-metadata", make_dynamic, C.damage_bat_entry_into_metadata, FormatError,
         r"block 0 .*metadata"),
    Case("bat-overlap", make_dynamic, C.damage_bat_overlap, FormatError, r"overlap"),
    Case("parent-loop", make_pair, loop_pair, ParentLoop, r"loop", chain_only=True),
    Case("self-loop", make_differencing, C.make_self_loop, ParentLoop, r"loop", chain_only=True),
    Case("missing-parent", make_differencing, C.make_missing_parent, ParentNotFound,
         r"missing-parent\.vhd.*not found", chain_only=True),
    Case("locator-garbage", make_differencing, C.damage_locator_garbage, ParentNotFound,
         r"parent .*not found", chain_only=True),
    Case("locator-length", make_differencing, C.damage_locator_length, FormatError,
         r"locator"),
    Case("locator-offset", make_differencing, C.damage_locator_offset, FormatError,
         r"locator"),
    Case("locator-space", make_differencing, C.damage_locator_space, FormatError,
         r"locator"),
    Case("block-size", make_dynamic, C.damage_block_size, FormatError, r"block size"),
    Case("block-size-zero", make_dynamic, lambda p: C.damage_block_size(p, 0), FormatError,
         r"block size"),
    Case("curr-size-huge", make_dynamic, C.damage_curr_size, FormatError, r"size"),
    Case("curr-size-huge-fixed", make_fixed, C.damage_curr_size, FormatError, r"size"),
    Case("curr-size-unaligned", make_dynamic, C.damage_curr_size_unaligned, FormatError,
         r"size"),
    Case("fixed-size-past-eof", make_fixed, C.damage_fixed_size, FormatError,
         r"shorter|size"),
    Case("max-bat-size-huge", make_dynamic, C.damage_max_bat_size, FormatError, r"BAT"),
    Case("disk-type", make_dynamic, C.damage_disk_type, FormatError, r"type"),
    Case("header-offset", make_dynamic, C.damage_header_offset, FormatError, r"header"),
    Case("table-offset", make_dynamic, C.damage_table_offset, FormatError, r"BAT"),
    Case("batmap-offset", make_dynamic, C.damage_batmap_offset, FormatError, r"batmap"),
]


def openers(case_kept: bool, chain_only: bool = False) -> list[tuple[str, Callable]]:
    out: list[tuple[str, Callable[[str], object]]] = []
    if not chain_only:
        out += [
            ("VhdImage.open", lambda p: VhdImage.open(p)),
            ("VhdImage.open(rw)", lambda p: VhdImage.open(p, writable=True)),
        ]
    out += [
        ("Chain.open(named(vhd:))", lambda p: Chain.open("vhd:" + p)),
        ("Chain.open(named(vhd:),rw)", lambda p: Chain.open("vhd:" + p, writable=True)),
    ]
    if case_kept:
        out.append(("Chain.open", lambda p: Chain.open(named(p))))
    return out


def assert_refused(path: str, opener: Callable[[str], object], error: type[BlktapError],
                   pattern: str, how: str) -> BlktapError:
    try:
        obj = opener(path)
    except BlktapError as exc:
        assert isinstance(exc, error), f"{how}: {type(exc).__name__}: {exc}"
        assert re.search(pattern, str(exc), re.IGNORECASE), f"{how}: message {exc!s}"
        assert isinstance(exc.errno, int) and exc.errno > 0
        return exc
    except Exception as exc:  # noqa: BLE001 - the point is to catch every other type
        pytest.fail(f"{how} raised {type(exc).__name__} (not a BlktapError): {exc}")
    obj.close()  # type: ignore[attr-defined]
    pytest.fail(f"{how} accepted the corrupt image")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corrupt_image_refused(tmp_path: Path, case: Case) -> None:
    path = case.build(tmp_path)
    case.damage(path)
    before = digest_dir(tmp_path)
    for how, opener in openers(case.cookie_kept, case.chain_only):
        assert_refused(path, opener, case.error, case.pattern, how)
    if case.chain_only:
        with VhdImage.open(path) as img:  # the file itself is a valid VHD
            assert img.is_differencing
            with pytest.raises(case.error):
                if case.error is ParentNotFound:
                    img.parent_path()
                else:
                    chain_depth(path)  # how snapshot measures a chain
    assert digest_dir(tmp_path) == before, "opening must not change any file"
    assert sorted(os.listdir(tmp_path)) == sorted(before)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in (
    "footer-checksum", "header-checksum", "bat-overlap", "block-size", "parent-loop",
    "locator-length", "max-bat-size-huge", "truncated-dynamic")], ids=lambda c: c.name)
def test_snapshot_of_corrupt_image_refused(tmp_path: Path, case: Case) -> None:
    path = case.build(tmp_path)
    case.damage(path)
    before = digest_dir(tmp_path)
    new = str(tmp_path / "new-child.vhd")
    try:
        snapshot(new, path)
    except BlktapError:
        pass
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"snapshot raised {type(exc).__name__}: {exc}")
    else:
        pytest.fail("snapshot of a corrupt image succeeded")
    assert digest_dir(tmp_path) == before, "no child, no temporary file, nothing changed"


def test_locator_space_past_eof_refused(tmp_path: Path) -> None:
    """A locator whose reserved space runs past EOF is refused, naming the locator (it
    once was accepted in an empty child, and a write then put a block 4 GiB into the
    file)."""
    base = make_base(tmp_path)
    child = str(tmp_path / "child.vhd")
    snapshot(child, base)  # empty: no block for the BAT check to trip over
    C.damage_locator_space(child)
    before = digest_dir(tmp_path)
    for how, opener in openers(True):
        assert_refused(child, opener, FormatError, r"locator", how)
    assert digest_dir(tmp_path) == before


def test_corrupt_parent_named(tmp_path: Path) -> None:
    """A valid child over a corrupt parent: the error names the parent."""
    child = make_differencing(tmp_path)
    C.damage_header_checksum(str(tmp_path / "base.vhd"))
    before = digest_dir(tmp_path)
    exc = assert_refused(child, lambda p: Chain.open(f"vhd:{p}"), FormatError,
                         r"base\.vhd.*checksum", "Chain.open")
    assert "base.vhd" in str(exc)
    with VhdImage.open(child) as img:  # the child alone is fine
        assert img.is_differencing
    assert digest_dir(tmp_path) == before


# ======================================================================================
# Damage that must be tolerated


def expected_disk(path: str) -> bytes:
    with Chain.open(named(path)) as chain:
        return chain.pread(0, chain.size)


def test_batmap_bad_checksum_is_ignored(tmp_path: Path) -> None:
    """A batmap whose checksum is wrong claims the partial blocks are full; the image must
    open, and reads must use the sector bitmaps (here: the parent shows through the
    child's partial block)."""
    child = make_differencing(tmp_path)
    want = expected_disk(child)
    C.damage_batmap_checksum(child)
    before = digest_dir(tmp_path)
    with VhdImage.open(child) as img:
        assert not img.batmap_valid
        assert not img.block_full(0)
    assert expected_disk(child) == want
    with Chain.open("vhd:" + child, writable=True) as chain:
        assert chain.pread(0, chain.size) == want
    assert digest_dir(tmp_path) == before


def test_batmap_bad_checksum_not_sealed_by_a_write(tmp_path: Path) -> None:
    """Filling a block in an image whose batmap failed its checksum must not write the
    untrusted bits back under a fresh checksum (partial blocks would turn "full" and hide
    the parent)."""
    child = make_differencing(tmp_path)
    want = bytearray(expected_disk(child))
    C.damage_batmap_checksum(child)
    with Chain.open(named(child), writable=True) as chain:
        chain.write(8 * MiB // 512, b"n" * BLOCK)  # a new, full block
    want[8 * MiB : 10 * MiB] = b"n" * BLOCK
    assert expected_disk(child) == want


def test_batmap_bad_checksum_dynamic(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path)
    want = expected_disk(path)
    C.damage_batmap_checksum(path)
    assert expected_disk(path) == want


def test_primary_footer_damaged_backup_used(tmp_path: Path) -> None:
    """Only the primary footer is bad: the backup copy at 0 serves (as after a crash)."""
    path = make_dynamic(tmp_path)
    want = expected_disk(path)
    C.damage_footer_checksum(path, backup_too=False)
    before = digest_dir(tmp_path)
    with VhdImage.open(path) as img:
        assert img.footer_source == "backup"
    assert expected_disk(path) == want
    assert_refused(path, lambda p: VhdImage.open(p, footer="primary"), FormatError,
                   r"footer.*checksum", "VhdImage.open(primary)")
    assert digest_dir(tmp_path) == before


def test_backup_footer_damaged_primary_used(tmp_path: Path) -> None:
    path = make_dynamic(tmp_path)
    want = expected_disk(path)
    with open(path, "r+b") as f:
        f.write(b"\0" * 512)
    with VhdImage.open(path) as img:
        assert img.footer_source == "primary"
    assert expected_disk(path) == want
    assert_refused(path, lambda p: VhdImage.open(p, footer="backup"), FormatError,
                   r"backup footer", "VhdImage.open(backup)")


# ======================================================================================
# Things that are not images at all


def not_images(folder: Path) -> dict[str, str]:
    (folder / "zero").write_bytes(b"")
    (folder / "short").write_bytes(random.Random(2).randbytes(511))
    (folder / "random").write_bytes(random.Random(3).randbytes(1 * MiB + 7))
    (folder / "dir").mkdir()
    return {name: str(folder / name) for name in ("zero", "short", "random", "dir")} | {
        "missing": str(folder / "no-such-file")}


NOT_IMAGE_PATTERNS = {
    "zero": r"too small|0 bytes",
    "short": r"too small|511 bytes",
    "random": r"not a valid VHD|cookie",
    "dir": r"directory",
    "missing": r"no such file",
}


@pytest.mark.parametrize("name", ["zero", "short", "random", "missing", "dir"])
def test_not_an_image(tmp_path: Path, name: str) -> None:
    paths = not_images(tmp_path)
    path = paths[name]
    before = digest_dir(tmp_path)
    for how, opener in openers(False):
        exc = assert_refused(path, opener, BlktapError, NOT_IMAGE_PATTERNS[name], how)
        if name == "missing":
            assert exc.errno == errno.ENOENT
    assert digest_dir(tmp_path) == before


@pytest.mark.parametrize("opener", [Chain.open, RawImage.open, lambda p: Chain.open("raw:" + p)],
                         ids=["Chain.open", "RawImage.open", "Chain.open(named(raw:))"])
def test_directory_refused_when_probing(tmp_path: Path, opener: Callable) -> None:
    (tmp_path / "dir").mkdir()
    assert_refused(str(tmp_path / "dir"), opener, BlktapError, r"directory", "open")


@pytest.mark.parametrize("name", ["zero", "short", "random"])
def test_unprefixed_non_vhd_is_raw(tmp_path: Path, name: str) -> None:
    """Without a format prefix a file that carries no VHD cookie is probed as raw."""
    path = not_images(tmp_path)[name]
    data = Path(path).read_bytes()
    with Chain.open(named(path)) as chain:
        assert isinstance(chain.leaf, RawImage)
        assert chain.size == len(data)
        assert chain.pread(0, len(data)) == data


def test_missing_with_plain_chain_open(tmp_path: Path) -> None:
    with pytest.raises(BlktapError) as info:
        Chain.open(named(tmp_path / "nothing.vhd"))
    assert info.value.errno == errno.ENOENT


def test_every_corruption_is_covered() -> None:
    """Each generator in tests/corrupt.py is used by a test here."""
    used = {c.damage for c in CASES} | {C.make_parent_loop, C.damage_locator_space,
                                        C.damage_batmap_checksum, C.damage_block_size}
    names = {getattr(f, "__name__", "") for f in used}
    generators = {n for n in dir(C) if n.startswith(("damage_", "make_")) or n == "truncate"}
    assert generators - names == set()


# ======================================================================================
# Random damage: whatever the mutation, a BlktapError or a working image


FOOTER_FIELDS = {"features": 32, "ff_version": 32, "data_offset": 64, "crtr_ver": 32,
                 "orig_size": 64, "curr_size": 64, "type": 32, "hidden": 8}
HEADER_FIELDS = {"data_offset": 64, "table_offset": 64, "hdr_ver": 32, "max_bat_size": 32,
                 "block_size": 32}
LOCATOR_FIELDS = {"code": 32, "data_space": 32, "data_len": 32, "data_offset": 64}
BATMAP_FIELDS = {"batmap_offset": 64, "batmap_size": 32, "batmap_version": 32,
                 "checksum": 32}


def _value(bits: int, choice: int, raw: int) -> int:
    interesting = [0, 1, 511, 512, 513, 1536, 4096, BLOCK, BLOCK + 1, 1 << (bits - 1),
                   (1 << bits) - 1, (1 << bits) - 512, raw % (1 << bits), raw % (1 << 24)]
    return interesting[choice % len(interesting)]


def mutate(path: str, kind: str, index: int, choice: int, raw: int) -> None:
    """Set one metadata field of ``path`` to an extreme value, resealing checksums."""
    if kind == "footer":
        name, bits = sorted(FOOTER_FIELDS.items())[index % len(FOOTER_FIELDS)]
        C.set_footer_fields(path, **{name: _value(bits, choice, raw)})
    elif kind == "header":
        name, bits = sorted(HEADER_FIELDS.items())[index % len(HEADER_FIELDS)]
        C.set_header_fields(path, **{name: _value(bits, choice, raw)})
    elif kind == "locator":
        head = C.read_header(path)
        name, bits = sorted(LOCATOR_FIELDS.items())[index % len(LOCATOR_FIELDS)]
        setattr(head.loc[index % 4], name, _value(bits, choice, raw))
        C.write_header(path, head)
    elif kind == "batmap":
        off, bh, _ = C.read_batmap(path)
        name, bits = sorted(BATMAP_FIELDS.items())[index % len(BATMAP_FIELDS)]
        setattr(bh, name, _value(bits, choice, raw))
        with open(path, "r+b") as f:
            f.seek(off)
            f.write(bh.pack())
    else:
        C.write_bat_entry(path, index % 12, _value(32, choice, raw))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("pristine")
    make_differencing(folder)
    return {name: (folder / name).read_bytes() for name in ("base.vhd", "child.vhd")}


mutations = st.lists(
    st.tuples(st.sampled_from(["footer", "header", "locator", "batmap", "bat"]),
              st.integers(0, 63), st.integers(0, 63), st.integers(0, 2**64 - 1)),
    min_size=1, max_size=3)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(["base.vhd", "child.vhd"]), changes=mutations)
def test_random_field_damage(pristine: dict[str, bytes], target: str,
                             changes: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, data in pristine.items():
            (folder / name).write_bytes(data)
        path = str(folder / target)
        for change in changes:
            try:
                mutate(path, *change)
            except (ValueError, OverflowError, struct.error):
                pass  # the earlier change made this one impossible (e.g. no batmap)
        before = digest_dir(folder)
        for spec in (str(folder / "child.vhd"), "vhd:" + str(folder / "base.vhd")):
            try:
                with Chain.open(spec, follow_probed_parents=True) as chain:
                    chain.pread(0, chain.size)
                    chain.map()
            except BlktapError as exc:
                assert str(exc) and exc.errno > 0
            except Exception as exc:  # noqa: BLE001
                pytest.fail(f"{spec} after {changes}: {type(exc).__name__}: {exc}")
        assert digest_dir(folder) == before
