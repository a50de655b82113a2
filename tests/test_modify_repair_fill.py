"""vhd-util modify (-p/-m, -s, -z), repair and fill: what they change, what they keep, the
reference's messages and exit codes, bad input, and crash safety at every kill point
(tests/faults.py): a process killed at any file-changing call leaves an image our check
accepts, with the disk's content unchanged."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
import uuid as _uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blktap.image import Chain
from blktap.image.vhd import VhdImage, create, snapshot
from blktap.image.vhd import check as vhd_check
from blktap.image.vhd import fill as fill_mod
from blktap.image.vhd import structs as s
from blktap.image.vhd.fill import fill
from blktap.image.vhd.modify import kill_data, set_physical_size
from blktap.image.vhd.repair import repair
from blktap.image.vhd.reparent import set_parent
from conftest import named, need, run, tool
from faults import count_mutations, crash_after, kill_points
from loopdev import loop_device  # noqa: F401 - a fixture

MB = 1 << 20
SIZE = 16 * MB
# What _write_base puts on a disk: (offset, bytes). Block 0 partly, block 2 partly,
# block 3 completely (a batmap bit), nothing past 8 MiB.
BASE_WRITES = [(0, b"a" * 8192), (5 * MB, b"b" * 4096), (6 * MB, b"f" * (2 * MB))]


def vu(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run([tool("vhd-util"), *args], cwd=cwd, text=True)


def _write(path: str, writes: list[tuple[int, bytes]]) -> None:
    with Chain.open(named(path), writable=True) as chain:
        for off, data in writes:
            chain.pwrite(off, data)


def make_base(path: Path, size: int = SIZE) -> str:
    create(str(path), size)
    _write(str(path), [(o, d) for o, d in BASE_WRITES if o + len(d) <= size])
    return str(path)


def make_chain(tmp: Path) -> tuple[str, str]:
    """base.vhd <- child.vhd, the child holding a few writes of its own."""
    base = make_base(tmp / "base.vhd")
    child = str(tmp / "child.vhd")
    snapshot(child, base)
    _write(child, [(4096, b"c" * 1024), (9 * MB, b"d" * 4096), (2 * MB - 512, b"e" * 1024)])
    return base, child


def content(path: str) -> str:
    """SHA-256 of the whole virtual disk, the chain resolved."""
    digest = hashlib.sha256()
    with Chain.open(f"vhd:{path}") as chain:
        step = 4 * MB
        for off in range(0, chain.size, step):
            digest.update(chain.pread(off, min(step, chain.size - off)))
    return digest.hexdigest()


def file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checks_ok(path: str, *, ignore_footer: bool = False) -> bool:
    opts = vhd_check.CheckOptions(ignore_footer=ignore_footer)
    result = vhd_check.check(path, opts)
    return result.errno == 0


def uuid_of(path: str) -> bytes:
    with VhdImage.open(path, validate_bat=False) as img:
        return img.footer.uuid


def header_of(path: str) -> s.Header:
    with VhdImage.open(path, validate_bat=False) as img:
        assert img.header is not None
        return img.header


def restore(path: str, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(data)


@contextlib.contextmanager
def unwritable(path: str) -> Iterator[int]:
    """Make ``path`` impossible to open for writing; yields the errno that open gets."""
    if os.geteuid() != 0:
        os.chmod(path, 0o444)
        try:
            yield errno.EACCES
        finally:
            os.chmod(path, 0o644)
        return
    if shutil.which("chattr") is None or run(["chattr", "+i", path]).returncode != 0:
        pytest.skip("cannot make a file unwritable for root here (no chattr +i)")
    try:
        yield errno.EPERM
    finally:
        run(["chattr", "-i", path])


def kill_everywhere(operation: Callable[[], object], files: list[str],
                    verify: Callable[[int, bool], None], limit: int = 60) -> int:
    """Run ``operation`` killed at each of its kill points (all of them up to ``limit``),
    restoring ``files`` before each run; ``verify(n, finished)`` checks what is left."""
    saved = {f: Path(f).read_bytes() for f in files}
    total = count_mutations(operation)
    points = kill_points(total, limit)
    for n in points:
        for f, data in saved.items():
            restore(f, data)
        finished = crash_after(operation, n)
        verify(n, finished)
    for f, data in saved.items():
        restore(f, data)
    return total


# ======================================================================== modify -p
def test_reparent_onto_copy_with_new_uuid(tmp_path: Path) -> None:
    base, child = make_chain(tmp_path)
    before = content(child)
    (tmp_path / "other").mkdir()
    twin = make_base(tmp_path / "other" / "twin.vhd")  # same data, another uuid
    twin_uuid = _uuid.UUID(bytes=uuid_of(twin))
    proc = vu("modify", "-n", "child.vhd", "-p", "other/twin.vhd", cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    dump = vu("read", "-p", "-n", child).stdout
    assert "Parent name         : twin.vhd\n" in dump
    assert f"Parent UUID         : {twin_uuid}\n" in dump
    assert dump.count("decoded name : ./other/twin.vhd\n") == 3
    for code in ("MACX", "W2KU", "W2RU"):
        assert f"PLAT_CODE_{code}" in dump
    hdr = header_of(child)
    assert hdr.prt_ts == s.vhd_time(os.stat(twin).st_mtime)
    assert vu("query", "-n", child, "-p").stdout == f"{os.path.realpath(twin)}\n"
    assert vu("check", "-n", child).stdout == f"{child} is valid\n"
    os.unlink(base)  # the chain now goes through the twin only
    assert content(child) == before
    assert vu("query", "-n", child, "-d").stdout == "chain depth: 2\n"


def test_reparent_parent_in_folder_above(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.vhd")
    (tmp_path / "sub").mkdir()
    child = str(tmp_path / "sub" / "child.vhd")
    snapshot(child, base)
    twin = make_base(tmp_path / "twin.vhd")
    before = content(child)
    assert vu("modify", "-n", child, "-p", twin).returncode == 0
    with VhdImage.open(child) as img:
        names = [name for _, _, name in img.parent_locator_names()]
        raw = [os.pread(img.fd, loc.data_len, loc.data_offset)
               for _, loc, _ in img.parent_locator_names()]
    # W2KU/W2RU relative paths always start with ".\" (as the reference writes them)
    assert names == ["../twin.vhd", "./../twin.vhd", "./../twin.vhd"]
    assert raw[0] == b"file://../twin.vhd"
    assert raw[1] == raw[2] == ".\\..\\twin.vhd".encode("utf-16-le")
    assert content(child) == before
    assert checks_ok(child)


def test_reparent_onto_raw_parent(tmp_path: Path) -> None:
    base, child = make_chain(tmp_path)
    before = content(child)
    raw = tmp_path / "flat.img"
    with Chain.open(named(base)) as chain:
        raw.write_bytes(chain.pread(0, chain.size))
    proc = vu("modify", "-n", child, "-p", str(raw), "-m")
    assert (proc.returncode, proc.stdout) == (0, "")
    dump = vu("read", "-p", "-n", child).stdout
    assert "Parent UUID         : 00000000-0000-0000-0000-000000000000\n" in dump
    assert "Parent name         : flat.img\n" in dump
    assert dump.count("decoded name : ./flat.img\n") == 3
    assert vu("query", "-n", child, "-p").stdout == f"{raw}\n"
    assert vu("query", "-n", child, "-d").stdout == "chain depth: 2\n"
    os.unlink(base)
    assert content(child) == before
    assert checks_ok(child)
    # and back onto a VHD parent: the uuid comes back
    twin = make_base(tmp_path / "twin.vhd")
    assert vu("modify", "-n", child, "-p", twin).returncode == 0
    assert header_of(child).prt_uuid == uuid_of(twin)
    assert content(child) == before and checks_ok(child)


def test_reparent_onto_smaller_parent(tmp_path: Path) -> None:
    """A parent smaller than the child is a resized chain: accepted (the reference does
    not look at sizes either)."""
    _, child = make_chain(tmp_path)
    before = content(child)
    small = make_base(tmp_path / "small.vhd", 8 * MB)  # same data: nothing past 8 MiB
    assert vu("modify", "-n", child, "-p", small).returncode == 0
    assert content(child) == before and checks_ok(child)


def test_reparent_reference_fixtures(ref_copy: Path) -> None:
    """Move snap1 of the reference chain base <- snap1 <- snap2 into a folder: snap2 is
    pointed at the moved copy, the copy at ../base.vhd; the content recorded from the
    reference tapdisk is unchanged."""
    want = (ref_copy / "expect" / "snap2.sha256").read_text().split()[0]
    assert content(str(ref_copy / "snap2.vhd")) == want
    (ref_copy / "moved").mkdir()
    shutil.copy(ref_copy / "snap1.vhd", ref_copy / "moved" / "snap1.vhd")
    os.unlink(ref_copy / "snap1.vhd")
    assert vu("modify", "-n", "moved/snap1.vhd", "-p", "base.vhd", cwd=ref_copy).returncode == 0
    assert vu("modify", "-n", "snap2.vhd", "-p", "moved/snap1.vhd",
              cwd=ref_copy).returncode == 0
    snap2 = vu("read", "-p", "-n", str(ref_copy / "snap2.vhd")).stdout
    assert snap2.count("decoded name : ./moved/snap1.vhd\n") == 3
    assert "Parent name         : snap1.vhd\n" in snap2
    assert "Parent UUID         : 581ecd65-a22e-412b-a329-ba1eb2d25d0b\n" in snap2
    snap1 = vu("read", "-p", "-n", str(ref_copy / "moved" / "snap1.vhd")).stdout
    assert snap1.count("decoded name : ../base.vhd\n") == 1  # MACX
    assert snap1.count("decoded name : ./../base.vhd\n") == 2  # W2KU, W2RU: ".\..\"
    # data_length follows the new payloads, data_space and offsets stay
    assert "data_length  : 24\n" in snap2 and snap2.count("data_length  : 34\n") == 2
    assert snap2.count("data_space   : 512\n") == 3
    assert content(str(ref_copy / "snap2.vhd")) == want
    proc = vu("check", "-p", "-n", str(ref_copy / "snap2.vhd"))
    assert proc.returncode == 0, proc.stdout
    assert vu("query", "-n", "snap2.vhd", "-p", "-d", cwd=ref_copy).stdout == (
        f"{ref_copy}/moved/snap1.vhd\nchain depth: 3\n")


def test_reparent_crash_safety(tmp_path: Path) -> None:
    base, child = make_chain(tmp_path)
    twin = make_base(tmp_path / "twin.vhd")
    before = content(child)
    old = header_of(child)
    new_uuid = uuid_of(twin)
    ends = {"old": 0, "new": 0}

    def verify(n: int, finished: bool) -> None:
        assert checks_ok(child), n
        assert content(child) == before, n
        hdr = header_of(child)
        if hdr.prt_uuid == old.prt_uuid:
            assert hdr.parent_name == "base.vhd", n
            ends["old"] += 1
        else:
            assert (hdr.prt_uuid, hdr.parent_name) == (new_uuid, "twin.vhd"), n
            ends["new"] += 1
        assert any(loc.code != s.PLAT_CODE_NONE for loc in hdr.loc), n
        if finished:
            assert sum(loc.code != s.PLAT_CODE_NONE for loc in hdr.loc) == 3
        # whatever was left, running it again finishes the job
        set_parent(child, twin)
        assert checks_ok(child) and content(child) == before, n
        assert header_of(child).parent_name == "twin.vhd"

    total = kill_everywhere(lambda: set_parent(child, twin), [child], verify)
    assert total == 6  # H1, two locators, H2, one locator, H3
    assert ends["old"] and ends["new"]


def test_reparent_single_locator(tmp_path: Path) -> None:
    """An image with one path locator (not blktap's layout) still reparents."""
    _, child = make_chain(tmp_path)
    with VhdImage.open(child, writable=True) as img:
        hdr = img.header.sealed()
        hdr.loc[1] = s.ParentLocator()
        hdr.loc[2] = s.ParentLocator()
        os.pwrite(img.fd, hdr.sealed().pack(), img.footer.data_offset)
    assert checks_ok(child)
    before = content(child)
    twin = make_base(tmp_path / "twin.vhd")
    set_parent(child, twin)
    assert checks_ok(child) and content(child) == before
    assert header_of(child).parent_name == "twin.vhd"


# ------------------------------------------------------------------ modify -p: bad input
def _reparent_rejects(child: str, parent: str, code: int, *extra: str,
                      opened: bool = False) -> subprocess.CompletedProcess:
    before = file_digest(child) if os.path.exists(child) else None
    proc = vu("modify", "-n", child, "-p", parent, *extra)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    if opened:
        assert proc.stdout == f"error opening {child}: {-code}\n"
    else:
        assert proc.stdout == f"failed to set parent to '{parent}': {-code}\n"
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("vhd-util modify: ")
    if before is not None:
        assert file_digest(child) == before
    return proc


def test_reparent_bad_input(tmp_path: Path) -> None:
    base, child = make_chain(tmp_path)
    twin = make_base(tmp_path / "twin.vhd")
    junk = tmp_path / "junk.vhd"
    junk.write_bytes(os.urandom(8192))
    fixed = str(tmp_path / "fixed.vhd")
    create(fixed, 4 * MB, fixed=True)
    big = make_base(tmp_path / "big.vhd", 2 * SIZE)
    grandchild = str(tmp_path / "grandchild.vhd")
    snapshot(grandchild, child)
    _write(grandchild, [(0, b"g" * 512)])
    # the child itself
    _reparent_rejects(str(tmp_path / "missing.vhd"), twin, errno.ENOENT, opened=True)
    _reparent_rejects(str(junk), twin, errno.EINVAL, opened=True)
    _reparent_rejects(fixed, twin, errno.EINVAL)
    _reparent_rejects(base, twin, errno.EINVAL)  # a dynamic disk has no parent
    # the would-be parent
    _reparent_rejects(child, str(tmp_path / "nothere.vhd"), errno.ENOENT)
    _reparent_rejects(child, str(junk), errno.EINVAL)
    _reparent_rejects(child, str(tmp_path), errno.EINVAL)  # a folder
    _reparent_rejects(child, str(tmp_path), errno.EINVAL, "-m")
    _reparent_rejects(child, big, errno.EINVAL)  # larger than the child
    _reparent_rejects(child, child, errno.ELOOP)
    _reparent_rejects(child, grandchild, errno.ELOOP)  # its own descendant
    os.link(child, tmp_path / "alias.vhd")
    _reparent_rejects(child, str(tmp_path / "alias.vhd"), errno.ELOOP)
    # names: too long for a locator's 512 bytes (W2KU holds UTF-16: 2 bytes a char,
    # while MACX would fit: nothing may be written), and not ASCII
    deep = tmp_path / ("d" * 200)
    deep.mkdir()
    shutil.copy(twin, deep / ("t" * 60 + ".vhd"))
    _reparent_rejects(child, str(deep / ("t" * 60 + ".vhd")), errno.ENAMETOOLONG)
    shutil.copy(twin, tmp_path / "b\u00e4se.vhd")
    _reparent_rejects(child, str(tmp_path / "b\u00e4se.vhd"), errno.EILSEQ)
    # still intact and usable
    assert checks_ok(child)
    assert vu("modify", "-n", child, "-p", twin).returncode == 0


def test_reparent_null_uuid_parent(tmp_path: Path) -> None:
    _, child = make_chain(tmp_path)
    nulled = make_base(tmp_path / "nulled.vhd")
    with VhdImage.open(nulled, writable=True) as img:
        foot = img.footer
        foot.uuid = b"\0" * 16
        raw = foot.sealed().pack()
        os.pwrite(img.fd, raw, 0)
        os.pwrite(img.fd, raw, img.file_size - 512)
    _reparent_rejects(child, nulled, errno.EINVAL)


def test_modify_unwritable(tmp_path: Path) -> None:
    _, child = make_chain(tmp_path)
    twin = make_base(tmp_path / "twin.vhd")
    before = file_digest(child)
    with unwritable(child) as code:
        for argv in (["-p", twin], ["-z"], ["-s", str(64 * MB)]):
            proc = vu("modify", "-n", child, *argv)
            assert (proc.returncode, proc.stdout) == (code, f"error opening {child}: {-code}\n")
        for cmd in (["repair"], ["fill"], ["fill", "-b"]):
            proc = vu(*cmd, "-n", child)
            assert (proc.returncode, proc.stdout) == (code, f"error opening {child}: {-code}\n")
    assert file_digest(child) == before


def test_modify_usage_and_options(tmp_path: Path) -> None:
    usage = ("*** Dangerous operations, use with care ***\n"
             "options: <-n name> [-p NEW_PARENT set parent [-m raw]] [-s NEW_SIZE set size] "
             "[-z zero (kill data)] [-h help]\n")
    for argv in (["-h"], [], ["-p", "x"], ["-n", "a", "extra"]):
        proc = vu("modify", *argv)
        assert (proc.returncode, proc.stdout) == (22, usage), argv
    proc = vu("modify", "-n", "x", "-s", "99999999999999999999")
    assert (proc.returncode, proc.stdout) == (22, usage)
    assert proc.stderr == "Invalid size '99999999999999999999'\n"
    proc = vu("modify", "-q", "-n", "x")
    assert proc.returncode == 22 and proc.stderr == "modify: invalid option -- 'q'\n"
    # no operation: opened and closed, nothing changed
    base = make_base(tmp_path / "base.vhd")
    before = file_digest(base)
    assert vu("modify", "-n", base).returncode == 0
    assert file_digest(base) == before


# ======================================================================== modify -s
def test_set_physical_size(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.vhd")
    before = content(base)
    phys = int(vu("query", "-n", base, "-s").stdout)
    assert os.path.getsize(base) == phys
    # grow (as after lvextend): the footer moves to the new end
    assert vu("modify", "-n", base, "-s", str(phys + 3 * MB)).returncode == 0
    assert os.path.getsize(base) == phys + 3 * MB
    assert vu("query", "-n", base, "-s").stdout == f"{phys}\n"
    assert checks_ok(base) and content(base) == before
    need("qemu-img")
    info = run(["qemu-img", "info", "-f", "vpc", base], text=True)
    assert info.returncode == 0 and "virtual size: 16 MiB" in info.stdout
    # shrink back to the end of the data
    assert vu("modify", "--debug", "-s", str(phys), "-n", base).returncode == 0
    assert os.path.getsize(base) == phys
    assert checks_ok(base) and content(base) == before


def test_set_physical_size_refusals(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.vhd")
    phys = os.path.getsize(base)
    before = file_digest(base)
    for size, shown in ((phys - 512, str(phys - 512)), (phys + 100, str(phys + 100)),
                        (0, "0"), (-5, str((1 << 64) - 5))):
        proc = vu("modify", "-n", base, "-s", str(size))
        assert proc.returncode == errno.EINVAL, size
        assert proc.stdout == f"failed to set physical size to {shown}: -22\n"
        assert proc.stderr.count("\n") == 1
    assert file_digest(base) == before
    fixed = str(tmp_path / "fixed.vhd")
    create(fixed, 4 * MB, fixed=True)
    assert vu("modify", "-n", fixed, "-s", str(4 * MB)).returncode == errno.EINVAL
    assert vu("modify", "-n", fixed, "-s", str(8 * MB)).returncode == 0
    assert os.path.getsize(fixed) == 8 * MB
    with VhdImage.open(fixed) as img:
        assert img.is_fixed and img.size == 4 * MB


@pytest.mark.parametrize("delta", [3 * MB, -2 * MB])
def test_set_physical_size_crash_safety(tmp_path: Path, delta: int) -> None:
    base = make_base(tmp_path / "base.vhd")
    phys = os.path.getsize(base)
    if delta < 0:
        set_physical_size(base, phys - delta)  # start from a grown file, shrink it back
        target = phys
    else:
        target = phys + delta
    before = content(base)

    def verify(n: int, finished: bool) -> None:
        assert checks_ok(base), n
        assert content(base) == before, n
        if finished:
            assert os.path.getsize(base) == target

    kill_everywhere(lambda: set_physical_size(base, target), [base], verify)


# ======================================================================== modify -z
def test_kill_data_dynamic_and_differencing(tmp_path: Path) -> None:
    base, child = make_chain(tmp_path)
    parent_content = content(base)
    assert vu("modify", "-z", "-n", child).returncode == 0
    assert content(child) == parent_content  # the child now only passes the parent through
    assert vu("query", "-n", child, "-a").stdout == "0\n"
    assert checks_ok(child)
    with VhdImage.open(child) as img:
        assert os.path.getsize(child) == img.end_of_metadata() + 512
    assert vu("modify", "--debug", "-z", "-n", base).returncode == 0
    assert content(base) == hashlib.sha256(bytes(SIZE)).hexdigest()
    assert os.path.getsize(base) == 3584  # an empty 16 MiB disk's size
    assert vu("check", "-n", base).stdout == f"{base} is valid\n"
    assert vu("query", "-n", base, "-a", "-s").stdout == "3584\n0\n"
    fixed = str(tmp_path / "fixed.vhd")
    create(fixed, 4 * MB, fixed=True)
    before = file_digest(fixed)
    proc = vu("modify", "-z", "-n", fixed)
    assert (proc.returncode, proc.stdout) == (errno.ENOSYS, "failed to zero VHD: -38\n")
    assert file_digest(fixed) == before


def test_kill_data_crash_safety(tmp_path: Path) -> None:
    base, child = make_chain(tmp_path)
    old, zeroed = content(base), hashlib.sha256(bytes(SIZE)).hexdigest()

    def verify(n: int, finished: bool) -> None:
        assert checks_ok(base), n
        now = content(base)
        assert now in (old, zeroed), n
        if finished:
            assert now == zeroed

    total = kill_everywhere(lambda: kill_data(base), [base], verify)
    assert total == 5  # batmap, BAT, footer at the end, cut, footer at 0


# ======================================================================== repair
def _crash_like_a_writer(path: str) -> None:
    """What the reference tapdisk leaves when killed while appending a block: the old
    footer overwritten (here with its 0xC7 "kill footer" bytes) and the file grown past
    it, with no footer at the end."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"\xc7" * 512, size - 512)
        os.ftruncate(fd, size + 2 * MB + 4096)
    finally:
        os.close(fd)


def test_repair_after_writer_crash(tmp_path: Path) -> None:
    _, child = make_chain(tmp_path)
    before, size = content(child), os.path.getsize(child)
    _crash_like_a_writer(child)
    proc = vu("check", "-n", child)
    assert proc.returncode == 22
    assert proc.stdout.startswith("primary footer invalid: invalid cookie\n")
    assert vu("check", "-i", "-n", child).stdout == f"{child} is valid\n"
    assert content(child) == before  # readers fall back to the copy at 0
    proc = vu("repair", "-n", child)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert vu("check", "-n", child).stdout == f"{child} is valid\n"
    assert os.path.getsize(child) == size
    assert content(child) == before


def test_repair_from_backup(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.vhd")
    before, size = content(base), os.path.getsize(base)
    with open(base, "r+b") as f:  # the footer at the end: bad checksum
        f.seek(size - 512 + 64)
        f.write(b"\x12\x34\x56\x78")
    assert vu("repair", "-b", "-n", base).returncode == 0
    assert checks_ok(base) and content(base) == before
    # the copy at 0 damaged: -b cannot use it, plain repair can
    with open(base, "r+b") as f:
        f.write(b"garbage!")
    bad = file_digest(base)
    proc = vu("repair", "-b", "-n", base)
    assert (proc.returncode, proc.stdout) == (22, f"error opening {base}: -22\n")
    assert file_digest(base) == bad
    assert vu("check", "-n", base).returncode == 22
    assert vu("repair", "-n", base).returncode == 0
    assert checks_ok(base) and content(base) == before and os.path.getsize(base) == size


def test_repair_gives_a_null_uuid_a_fresh_one(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.vhd")
    with VhdImage.open(base, writable=True) as img:
        foot = img.footer
        foot.uuid = b"\0" * 16
        raw = foot.sealed().pack()
        os.pwrite(img.fd, raw, 0)
        os.pwrite(img.fd, raw, img.file_size - 512)
    proc = vu("check", "-n", base)
    assert proc.stdout.startswith("primary footer invalid: invalid (NULL) uuid\n")
    assert repair(base).new_uuid
    with VhdImage.open(base) as img:
        assert img.footer.uuid != b"\0" * 16
        assert os.pread(img.fd, 512, 0) == img.footer.sealed().pack()
    assert checks_ok(base)


def test_repair_keeps_healthy_images(tmp_path: Path) -> None:
    base, child = make_chain(tmp_path)
    fixed = str(tmp_path / "fixed.vhd")
    create(fixed, 4 * MB, fixed=True)
    for path in (base, child, fixed):
        before = file_digest(path)
        assert vu("repair", "-n", path).returncode == 0
        assert file_digest(path) == before, path


def test_repair_refusals(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.vhd")
    junk = tmp_path / "junk.vhd"
    junk.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty.vhd"
    empty.write_bytes(b"")
    for path, code in ((str(tmp_path / "missing.vhd"), errno.ENOENT),
                       (str(junk), errno.EINVAL), (str(empty), errno.EPIPE)):
        proc = vu("repair", "-n", path)
        assert (proc.returncode, proc.stdout) == (code, f"error opening {path}: {-code}\n")
    fixed = str(tmp_path / "fixed.vhd")
    create(fixed, 4 * MB, fixed=True)
    assert vu("repair", "-b", "-n", fixed).returncode == errno.EINVAL  # no copy at 0
    # disabled by an interrupted journaled resize: revert first, never "repair" it
    with open(base, "r+b") as f:
        f.seek(os.path.getsize(base) - 512)
        f.write(s.POISON_COOKIE)
    before = file_digest(base)
    proc = vu("repair", "-n", base)
    assert proc.returncode == errno.EINVAL and "interrupted resize" in proc.stderr
    assert file_digest(base) == before
    for argv in (["-h"], [], ["-n", "a", "b"]):
        proc = vu("repair", *argv)
        assert (proc.returncode, proc.stdout) == (
            22, "options: <-n name> <-b use the back-up footer> [-h help]\n")


def test_repair_crash_safety(tmp_path: Path) -> None:
    _, child = make_chain(tmp_path)
    before = content(child)
    _crash_like_a_writer(child)

    def verify(n: int, finished: bool) -> None:
        assert checks_ok(child, ignore_footer=True), n  # at least as good as before
        assert content(child) == before, n
        if finished:
            assert checks_ok(child)
        repair(child)  # and a second run always finishes the job
        assert checks_ok(child) and content(child) == before, n

    total = kill_everywhere(lambda: repair(child), [child], verify)
    assert total == 3  # copy at 0, footer at the end, cut


# ======================================================================== fill
def test_fill_dynamic(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.vhd")
    unfilled = str(tmp_path / "unfilled.vhd")
    shutil.copy(base, unfilled)
    before = content(base)
    assert vu("query", "-n", base, "-a").stdout == "3\n"
    proc = vu("fill", "-n", base)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert vu("query", "-n", base, "-a").stdout == "8\n"
    assert content(base) == before
    assert vu("check", "-n", base).stdout == f"{base} is valid\n"
    with VhdImage.open(base) as img:
        for blk in range(8):  # every bitmap full, and the batmap says so
            assert img.block_full(blk)
        assert img.allocated_bytes() == SIZE
        # data areas on 4 KiB boundaries
        assert all((img.bat[b] + img.bitmap_secs) % 8 == 0 for b in range(8))
        assert os.path.getsize(base) == img.end_of_data() + 512
    # really allocated in the file system (not a sparse file)
    assert os.stat(base).st_blocks * 512 >= SIZE
    need("qemu-img")
    proc = run(["qemu-img", "compare", "-f", "vpc", "-F", "vpc", unfilled, base], text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # a second fill has nothing to do
    digest = file_digest(base)
    assert fill(base) == fill_mod.FillResult(0, 0)
    assert file_digest(base) == digest


def test_fill_bitmaps_only_250mb(tmp_path: Path) -> None:
    """Observed on the reference: fill -b on a 250 MB disk, query -a says 125."""
    img = str(tmp_path / "big.vhd")
    assert vu("create", "-n", img, "-s", "250").returncode == 0
    assert vu("fill", "-b", "-n", img).returncode == 0
    assert vu("query", "-n", img, "-a").stdout == "125\n"
    assert checks_ok(img)
    assert os.stat(img).st_blocks * 512 < 4 * MB  # no data written or reserved
    empty = str(tmp_path / "empty.vhd")
    create(empty, 250 * MB)
    need("qemu-img")
    proc = run(["qemu-img", "compare", "-f", "vpc", "-F", "vpc", empty, img], text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_fill_differencing_copies_the_parent_in(tmp_path: Path) -> None:
    base, child = make_chain(tmp_path)
    before = content(child)
    flat = tmp_path / "before.raw"
    with Chain.open(named(child)) as chain:
        flat.write_bytes(chain.pread(0, chain.size))
    assert vu("fill", "-n", child).returncode == 0
    assert content(child) == before
    assert vu("query", "-n", child, "-a").stdout == "8\n"
    assert checks_ok(child)
    # the child now holds the whole disk: even without its parent (qemu does not follow
    # VHD parents) it reads as the chain did
    need("qemu-img")
    proc = run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", child, str(flat)], text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_fill_range(tmp_path: Path) -> None:
    img = str(tmp_path / "r.vhd")
    create(img, SIZE)
    _write(img, [(4 * MB + 4096, b"x" * 512)])  # block 2, partial
    before = content(img)
    # sectors 4096..12287 are blocks 1 and 2 (block 2 already allocated, partly)
    assert vu("fill", "-b", "-f", "4096", "-t", "12287", "-n", img).returncode == 0
    with VhdImage.open(img) as vhd:
        used = [b for b in range(8) if vhd.bat[b] != s.BAT_ENTRY_UNUSED]
        assert used == [1, 2]
        assert vhd.block_full(1) and vhd.block_full(2)
    assert content(img) == before and checks_ok(img)
    assert vu("fill", "-b", "-t", "100", "-n", img).returncode == 0  # block 0
    assert vu("fill", "-b", "-f", str(SIZE // 512 - 1), "-n", img).returncode == 0  # last
    assert vu("query", "-n", img, "-a").stdout == "4\n"
    assert content(img) == before and checks_ok(img)


def test_fill_refusals(tmp_path: Path) -> None:
    usage = ("options: <-n name> [-h help] [-b initialise the BAT and bitmaps, don't write to "
             "the data blocks (much faster)] [-f start intialisation from this sector, only "
             "usable with -b] [-t intialise up to this sector (inclusive), only usable with "
             "-b] [-B ignore the 2 TB limit, only usable with -b]\n")
    base, child = make_chain(tmp_path)
    for argv, first in ((["-h"], ""), ([], ""), (["-n", base, "-f", "0"],
                        "-f/-t can only be used with -b\n"),
                        (["-n", base, "-b", "-f", "10", "-t", "5"],
                         "invalid sector range 10-5\n"),
                        (["-n", base, "-B"], "-B can only be used with -b\n")):
        proc = vu("fill", *argv)
        assert (proc.returncode, proc.stdout) == (22, first + usage), argv
    junk = tmp_path / "junk.vhd"
    junk.write_bytes(os.urandom(4096))
    for path, code in ((str(tmp_path / "missing.vhd"), errno.ENOENT),
                       (str(junk), errno.EINVAL)):
        proc = vu("fill", "-n", path)
        assert (proc.returncode, proc.stdout) == (code, f"error opening {path}: {-code}\n")
    fixed = str(tmp_path / "fixed.vhd")
    create(fixed, 4 * MB, fixed=True)
    digests = {p: file_digest(p) for p in (base, child, fixed)}
    for argv, code in ((["-n", fixed], errno.EINVAL),
                       (["-b", "-n", child], errno.EINVAL),  # would hide the parent
                       (["-b", "-t", str(SIZE // 512), "-n", base], errno.ERANGE),
                       (["-b", "-f", str(SIZE), "-n", base], errno.ERANGE)):
        proc = vu("fill", *argv)
        assert proc.returncode == code, argv
        assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("vhd-util fill: ")
    assert {p: file_digest(p) for p in digests} == digests


def test_fill_2tb_limit(tmp_path: Path) -> None:
    """A BAT entry holds a 32-bit sector number: an image whose data already reaches 2 TiB
    cannot get another block, -B or not. Refused before anything is written."""
    img = str(tmp_path / "far.vhd")
    create(img, 8 * MB)
    far = 0xFFFFEFFF  # (far + 1) % 8 == 0: the data starts on 4 KiB; ends at 2^32 sectors
    end = (far + 1 + 4096) * 512
    with VhdImage.open(img, writable=True) as vhd:
        foot = vhd.footer.sealed().pack()
        try:
            os.pwrite(vhd.fd, b"\xff" * 512, far * 512)  # a full bitmap
            os.pwrite(vhd.fd, foot, end)
        except OSError:
            pytest.skip("the file system cannot hold a 2 TiB sparse file")
        os.pwrite(vhd.fd, far.to_bytes(4, "big"), 1536)
    assert checks_ok(img)

    def state() -> tuple[int, bytes]:
        with open(img, "rb") as f:
            return os.path.getsize(img), f.read(4096)

    before = state()
    for argv in (["-b"], ["-b", "-B"], []):
        proc = vu("fill", *argv, "-n", img)
        assert (proc.returncode, proc.stdout) == (
            errno.EOVERFLOW, "sector offset for extent 1 exceeds the 2 TB limit\n"), argv
        assert state() == before


@pytest.mark.parametrize("kind", ["dynamic", "dynamic-bitmaps", "differencing"])
def test_fill_crash_safety(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fill_mod, "BATCH_BLOCKS", 2)  # several batches in a small disk
    base, child = make_chain(tmp_path)
    target = child if kind == "differencing" else base
    before = content(target)
    bitmaps_only = kind == "dynamic-bitmaps"

    def verify(n: int, finished: bool) -> None:
        assert checks_ok(target), n
        assert content(target) == before, n
        if finished:
            with VhdImage.open(target) as img:
                assert img.allocated_blocks() == 8

    total = kill_everywhere(lambda: fill(target, bitmaps_only=bitmaps_only), [target],
                            verify)
    assert total > 10


def test_fill_after_a_writer_leaked_space(tmp_path: Path) -> None:
    """Stale bytes past the end of the data (a crashed writer's) never show through the
    new blocks, and the file ends right after the last one."""
    base = make_base(tmp_path / "base.vhd")
    before = content(base)
    size = os.path.getsize(base)
    with open(base, "r+b") as f:  # junk after the footer, a valid footer at the very end
        foot = Path(base).read_bytes()[-512:]
        f.seek(size)
        f.write(b"\x5a" * (3 * MB) + foot)
    assert checks_ok(base)
    fill(base)
    assert content(base) == before and checks_ok(base)
    with VhdImage.open(base) as img:
        assert os.path.getsize(base) == img.end_of_data() + 512


# ======================================================================== block devices
def _on_volume(path: str, size: int) -> None:
    """Make ``path`` look like a logical volume of ``size`` bytes holding the VHD, as the
    storage manager leaves one after lvextend and ``modify -s``: stale bytes of the
    volume's past use after the data, the footer in the last sector."""
    end = os.path.getsize(path)
    footer = Path(path).read_bytes()[-512:]
    with open(path, "r+b") as f:
        f.seek(end - 512)
        f.write(b"\xaa" * (size - end) + footer)


def test_block_device_paths(tmp_path: Path,
                            loop_device: Callable[[Path], str]) -> None:  # noqa: F811
    """set, repair, fill and modify -s/-z on a VHD held by a block device: the footer
    lives in the device's last sector, the device keeps its size, and blocks taken from
    its stale space read as zeros."""
    base = make_base(tmp_path / "base.vhd")
    before = content(base)
    _on_volume(base, 32 * MB)
    dev = loop_device(Path(base))
    assert checks_ok(dev) and content(dev) == before
    # set -f hidden: the footer in the last sector and its copy at 0 change together
    assert vu("set", "-n", dev, "-f", "hidden", "-v", "1").returncode == 0
    assert vu("query", "-n", dev, "-f").stdout == "hidden: 1\n"
    assert checks_ok(dev)
    # repair: the footer goes back to the last sector
    with open(dev, "r+b") as f:
        f.seek(32 * MB - 512)
        f.write(b"\xc7" * 512)
    assert not checks_ok(dev)
    assert vu("repair", "-n", dev).returncode == 0
    assert checks_ok(dev) and vu("query", "-n", dev, "-f").stdout == "hidden: 1\n"
    # fill: the new blocks come from the volume's stale space, yet read as zeros
    assert vu("fill", "-n", dev).returncode == 0
    assert vu("query", "-n", dev, "-a").stdout == "8\n"
    assert checks_ok(dev) and content(dev) == before
    # modify -s: within the device only
    assert vu("modify", "-n", dev, "-s", str(32 * MB)).returncode == 0
    proc = vu("modify", "-n", dev, "-s", str(64 * MB))
    assert proc.returncode == errno.ENOSPC and proc.stderr.count("\n") == 1
    assert checks_ok(dev) and content(dev) == before
    # modify -z: every block forgotten, the device keeps its footer
    assert vu("modify", "-z", "-n", dev).returncode == 0
    assert vu("query", "-n", dev, "-a").stdout == "0\n"
    assert checks_ok(dev) and content(dev) == hashlib.sha256(bytes(SIZE)).hexdigest()
    assert os.path.getsize(base) == 32 * MB
    # fill on a volume too small for every block: refused before anything is written
    small = make_base(tmp_path / "small.vhd")
    _on_volume(small, SIZE)
    dev = loop_device(Path(small))
    snap = Path(small).read_bytes()
    proc = vu("fill", "-n", dev)
    assert proc.returncode == errno.ENOSPC and proc.stderr.count("\n") == 1
    assert Path(small).read_bytes() == snap


def test_new_uuid_differs(tmp_path: Path) -> None:
    """Sanity for the fixtures above: two images made by make_base differ only in
    identity, not in content."""
    a = make_base(tmp_path / "a.vhd")
    b = make_base(tmp_path / "b.vhd")
    assert content(a) == content(b)
    assert uuid_of(a) != uuid_of(b)
