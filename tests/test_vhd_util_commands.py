"""vhd-util's commands on images we make: flags, outputs, exit codes, usage, errors."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from blktap.image import Chain
from blktap.image.vhd import VhdImage
from blktap.image.vhd import structs as s
from conftest import named, need, run, tool

MB = 1 << 20


def vu(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run([tool("vhd-util"), *args], cwd=cwd, text=True)


def test_usage_no_command_exits_zero() -> None:
    proc = vu()
    assert proc.returncode == 0
    assert proc.stdout == (
        "usage: vhd-util COMMAND [OPTIONS]\n"
        "COMMAND := { create | snapshot | query | read | set | repair | resize | fill | "
        "coalesce | modify | scan | check | revert | key | copy }\n")


def test_unknown_command_usage_exit_zero() -> None:
    proc = vu("frobnicate")
    assert proc.returncode == 0
    assert proc.stderr == "invalid COMMAND frobnicate\n"
    assert proc.stdout.startswith("usage: vhd-util COMMAND")


@pytest.mark.parametrize("cmd,code", [("query", 0), ("snapshot", 0), ("check", 0), ("scan", 0),
                                      ("create", 22), ("read", 22), ("set", 22)])
def test_help_exit_codes(cmd: str, code: int) -> None:
    proc = vu(cmd, "-h")
    assert proc.returncode == code
    assert proc.stdout.startswith(("options:", "usage:"))


def test_getopt_diagnostics() -> None:
    proc = vu("query", "-z", "-n", "x")
    assert proc.returncode == 22
    assert proc.stderr == "query: invalid option -- 'z'\n"
    proc = vu("query", "-n")
    assert proc.stderr == "query: option requires an argument -- 'n'\n"
    assert proc.returncode == 22


def test_debug_is_accepted_anywhere(tmp_path: Path) -> None:
    img = str(tmp_path / "d.vhd")
    assert vu("--debug", "create", "-n", img, "-s", "8").returncode == 0  # --debug as command
    assert vu("create", "--debug", "-n", img, "-s", "8").returncode == 0
    proc = vu("query", "-n", img, "--debug", "-v")
    assert (proc.returncode, proc.stdout) == (0, "8\n")


def test_create_query_check(tmp_path: Path) -> None:
    img = str(tmp_path / "a.vhd")
    proc = vu("create", "-n", img, "-s", "100")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert os.path.getsize(img) == 3584
    proc = vu("query", "-n", img, "-v", "-s", "-p", "-f", "-m", "-d", "-a", "-S")
    assert proc.stdout == f"100\n3584\n{img} has no parent\nhidden: 0\nmarker: 0\n" \
                          "chain depth: 1\n0\n100\n"
    assert vu("check", "-n", img).stdout == f"{img} is valid\n"


def test_create_rounds_to_blocks_and_prealloc(tmp_path: Path) -> None:
    img = str(tmp_path / "p.vhd")
    assert vu("create", "-n", img, "-s", "5", "-S", "200").returncode == 0
    assert vu("query", "-n", img, "-v", "-S").stdout == "6\n200\n"


def test_create_prealloc_smaller_than_size(tmp_path: Path) -> None:
    proc = vu("create", "-n", str(tmp_path / "x.vhd"), "-s", "100", "-S", "50")
    assert proc.returncode == 22
    assert proc.stdout == "Error: <-S size> must be greater than <-s size>\n"
    assert not (tmp_path / "x.vhd").exists()


def test_create_refuses_existing_file(tmp_path: Path) -> None:
    img = tmp_path / "e.vhd"
    img.write_bytes(b"precious")
    proc = vu("create", "-n", str(img), "-s", "8")
    assert proc.returncode == 17  # EEXIST
    assert "exists" in proc.stderr and "Traceback" not in proc.stderr
    assert img.read_bytes() == b"precious"


def test_create_in_missing_folder(tmp_path: Path) -> None:
    proc = vu("create", "-n", str(tmp_path / "nope" / "x.vhd"), "-s", "8")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1


def test_create_fixed(tmp_path: Path) -> None:
    img = str(tmp_path / "f.vhd")
    assert vu("create", "-n", img, "-s", "4", "-r").returncode == 0
    assert os.path.getsize(img) == 4 * MB + 512
    assert vu("check", "-n", img).stdout == ""  # the reference prints nothing for fixed
    assert vu("query", "-n", img, "-v", "-s").stdout == f"4\n{4 * MB + 512}\n"


def test_snapshot_chain_and_depth(tmp_path: Path) -> None:
    base = str(tmp_path / "base.vhd")
    vu("create", "-n", base, "-s", "16")
    with Chain.open(named(base), writable=True) as c:
        c.pwrite(0, b"x" * 4096)
    s1 = str(tmp_path / "s1.vhd")
    assert vu("snapshot", "-n", s1, "-p", base).returncode == 0
    assert vu("query", "-n", s1, "-p", "-d").stdout == f"{base}\nchain depth: 2\n"
    assert vu("query", "-n", s1, "-p", "-u").stdout == "./base.vhd\n"
    read = vu("read", "-p", "-n", s1).stdout
    assert "Disk type           : Differencing hard disk\n" in read
    assert "       decoded name : ./base.vhd\n" in read
    assert vu("check", "-n", s1).stdout == f"{s1} is valid\n"
    # -l: a limit the chain would exceed
    proc = vu("snapshot", "-n", str(tmp_path / "s2.vhd"), "-p", s1, "-l", "2", "-e")
    assert proc.returncode == 28
    assert proc.stdout == "snapshot depth exceeded: current depth: 2, limit: 2\n"


def test_snapshot_skips_empty_ancestors(tmp_path: Path) -> None:
    base = str(tmp_path / "base.vhd")
    vu("create", "-n", base, "-s", "8")
    empty = str(tmp_path / "empty.vhd")
    vu("snapshot", "-n", empty, "-p", base)
    skip = str(tmp_path / "skip.vhd")
    vu("snapshot", "-n", skip, "-p", empty)
    assert vu("query", "-n", skip, "-p").stdout == f"{base}\n"
    keep = str(tmp_path / "keep.vhd")
    vu("snapshot", "-n", keep, "-p", empty, "-e")
    assert vu("query", "-n", keep, "-p").stdout == f"{empty}\n"


def test_snapshot_raw_parent(tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"
    raw.write_bytes(os.urandom(4096) * 1024)
    child = str(tmp_path / "child.vhd")
    assert vu("snapshot", "-n", child, "-p", str(raw), "-m").returncode == 0
    assert vu("query", "-n", child, "-v", "-p", "-d").stdout == f"4\n{raw}\nchain depth: 2\n"
    with Chain.open(named(child)) as c:
        assert bytes(c.read(0, 8192)) == raw.read_bytes()


def test_snapshot_of_non_vhd_without_m(tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"
    raw.write_bytes(bytes(MB))
    proc = vu("snapshot", "-n", str(tmp_path / "c.vhd"), "-p", str(raw))
    assert proc.returncode == 22
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_snapshot_missing_parent(tmp_path: Path) -> None:
    proc = vu("snapshot", "-n", str(tmp_path / "c.vhd"), "-p", str(tmp_path / "none.vhd"))
    assert proc.returncode == 2
    assert not (tmp_path / "c.vhd").exists()


def test_set_hidden_and_marker(tmp_path: Path) -> None:
    img = str(tmp_path / "h.vhd")
    vu("create", "-n", img, "-s", "8")
    assert vu("set", "-n", img, "-f", "hidden", "-v", "1").returncode == 0
    assert vu("set", "-n", img, "-f", "marker", "-v", "1").returncode == 0
    assert vu("query", "-n", img, "-f", "-m").stdout == "hidden: 1\nmarker: 1\n"
    with open(img, "rb") as f:
        data = f.read()
    assert data[85] == 1 and data[-512 + 85] == 1  # both footer copies
    assert vu("check", "-n", img).returncode == 0
    proc = vu("set", "-n", img, "-f", "colour", "-v", "1")
    assert proc.returncode == 22 and proc.stdout.startswith("invalid field colour\n")
    proc = vu("set", "-n", img, "-f", "hidden", "-v", "256")
    assert proc.returncode == 22 and proc.stdout.startswith("invalid value 256\n")


def test_set_marker_keeps_batmap_valid(tmp_path: Path) -> None:
    """The reference zeroes the first batmap sector when it writes the marker; we don't."""
    img = str(tmp_path / "m.vhd")
    vu("create", "-n", img, "-s", "8")
    with Chain.open(named(img), writable=True) as c:
        c.write(0, bytes(2 * MB))  # one block fully written: its batmap bit gets set
    assert vu("set", "-n", img, "-f", "marker", "-v", "7").returncode == 0
    with VhdImage.open(img) as im:
        assert im.batmap_valid and im.block_full(0) and im.marker == 7


def test_read_operations(tmp_path: Path) -> None:
    img = str(tmp_path / "r.vhd")
    vu("create", "-n", img, "-s", "8")
    with Chain.open(named(img), writable=True) as c:
        c.write(4096, b"\xab" * 1024)  # sectors 4096-4097: block 1, sectors 0-1
    with VhdImage.open(img) as im:
        entry = im.bat[1]
    assert vu("read", "-n", img, "-t", "4097").stdout == (
        f"logical sector 4097: block number: 1, sector offset: 1, file offset: "
        f"{(entry + 2) * 512}\n")
    assert vu("read", "-n", img, "-t", "0").stdout.endswith("file offset: not allocated\n")
    assert vu("read", "-n", img, "-b", "0", "-c", "2").stdout == (
        f"block: 0: offset: not allocated\nblock: 1: offset: {entry * 512}\n")
    proc = vu("read", "-n", img, "-b", "1", "-x")
    assert proc.stdout == f"block: 0x1: offset: {entry * 512:#x}\n"
    assert vu("read", "-n", img, "-i", "4097", "-c", "2").stdout == (
        "block 1: sec: 1: 1\nblock 1: sec: 2: 0\n")
    assert vu("read", "-n", img, "-e", "0", "-c", "16384").stdout == "4096 2\n"
    bm = run([tool("vhd-util"), "read", "-n", img, "-m", "1"]).stdout
    assert bm[:1] == b"\xc0" and len(bm) == 512
    proc = vu("read", "-n", img, "-j", "1")
    assert proc.stderr == "batmap for block 1: 0\n"
    data = run([tool("vhd-util"), "read", "-n", img, "-d", "1"]).stdout
    assert len(data) == 2 * MB and data[:1024] == b"\xab" * 1024
    raw = run([tool("vhd-util"), "read", "-n", img, "-R", str(4096 * 512 - 3), "-c", "6"]).stdout
    assert raw == b"\0\0\0\xab\xab\xab"
    # ranges
    proc = vu("read", "-n", img, "-t", "16384")
    assert proc.returncode == 34 and proc.stderr == "sector 16385 past end of file\n"
    proc = vu("read", "-n", img, "-b", "4")
    assert proc.returncode == 34 and proc.stderr == "block 5 past end of file\n"
    proc = vu("read", "-n", img, "-i", "16384")
    assert proc.returncode == 34 and proc.stdout == "sector 16384 past end of file\n"


def test_query_open_errors(tmp_path: Path) -> None:
    proc = vu("query", "-n", str(tmp_path / "missing.vhd"), "-v")
    assert (proc.returncode, proc.stdout) == (2, f"error opening {tmp_path}/missing.vhd: -2\n")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert vu("query", "-n", str(empty), "-v").returncode == 32
    short = tmp_path / "short"
    short.write_bytes(b"x" * 100)
    assert vu("query", "-n", str(short), "-v").returncode == 5
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(8192))
    proc = vu("query", "-n", str(junk), "-v")
    assert proc.returncode == 22 and proc.stdout == f"error opening {junk}: -22\n"


def test_query_missing_parent(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    vu("create", "-n", str(base), "-s", "8")
    child = str(tmp_path / "child.vhd")
    vu("snapshot", "-n", child, "-p", str(base))
    base.unlink()
    proc = vu("query", "-n", child, "-v", "-p")
    assert (proc.returncode, proc.stdout) == (2, "8\nquery failed\n")


def test_check_reports_and_dumps(tmp_path: Path) -> None:
    img = tmp_path / "c.vhd"
    vu("create", "-n", str(img), "-s", "8")
    data = bytearray(img.read_bytes())
    data[-512:-504] = b"XXXXXXXX"  # primary footer cookie
    img.write_bytes(data)
    proc = vu("check", "-n", str(img))
    assert proc.returncode == 22
    lines = proc.stdout.splitlines()
    assert lines[0] == "primary footer invalid: invalid cookie"
    assert lines[1] == f"{img} appears invalid; dumping metadata"
    assert "VHD Footer Summary:" in proc.stdout
    # -i: the backup footer at offset 0 is enough
    assert vu("check", "-i", "-n", str(img)).stdout == f"{img} is valid\n"


def test_check_parents(tmp_path: Path) -> None:
    base = str(tmp_path / "base.vhd")
    vu("create", "-n", base, "-s", "8")
    child = str(tmp_path / "child.vhd")
    vu("snapshot", "-n", child, "-p", base)
    proc = vu("check", "-p", "-n", child)
    assert proc.stdout == f"{child} is valid\n{base} is valid\n"
    os.unlink(base)
    proc = vu("check", "-n", child)
    assert proc.returncode == 22
    assert proc.stdout.startswith("error resolving ./base.vhd: -2\n")


def test_check_stats_chain(reference_dir: Path) -> None:
    proc = vu("check", "-s", "-p", "-n", "snap2.vhd", cwd=reference_dir)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 3
    assert lines[0].startswith("base.vhd: secs allocated: 0x")
    assert lines[2].startswith("snap2.vhd: secs allocated: 0x3000 secs written: 0x802 (16.68%) "
                               "secs not in parent: 0x")


def test_check_bitmaps_finds_stray_data(tmp_path: Path) -> None:
    img = str(tmp_path / "b.vhd")
    vu("create", "-n", img, "-s", "8")
    with Chain.open(named(img), writable=True) as c:
        c.write(0, b"\1" * 512)
    with VhdImage.open(img) as im:
        data_off = (im.bat[0] + 1) * 512
    with open(img, "r+b") as f:
        f.seek(data_off + 5 * 512)
        f.write(b"\0\0stray")  # sector 5 is not in the bitmap
    proc = vu("check", "-b", "-n", img)
    assert proc.returncode == 22
    assert proc.stdout.startswith("sector 0x5 of block 0x0 has data where bitmap is clear\n")


def test_scan_markers_verbose_and_parents(tmp_path: Path) -> None:
    base = str(tmp_path / "base.vhd")
    vu("create", "-n", base, "-s", "8")
    vu("set", "-n", base, "-f", "marker", "-v", "3")
    child = str(tmp_path / "child.vhd")
    vu("snapshot", "-n", child, "-p", base)
    proc = vu("scan", "-M", child, base)
    assert proc.stdout.splitlines() == [
        "vhd=child.vhd capacity=8388608 size=5120 hidden=0 marker=0 keyhash= parent=base.vhd",
        "vhd=base.vhd capacity=8388608 size=3584 hidden=0 marker=3 keyhash= parent=none",
    ]
    proc = vu("scan", "-v", child)
    assert proc.stdout == f"vhd={child} capacity=8388608 size=5120 hidden=0 parent={base}\n"
    proc = vu("scan", "-a", "-m", str(tmp_path / "child.vhd"))
    assert [line.split()[0] for line in proc.stdout.splitlines()] == \
        ["vhd=child.vhd", "vhd=base.vhd"]


def test_scan_continue_on_failure(tmp_path: Path) -> None:
    good = str(tmp_path / "a.vhd")
    vu("create", "-n", good, "-s", "8")
    bad = tmp_path / "b.vhd"
    bad.write_bytes(b"not a vhd" * 100)
    proc = vu("scan", "-m", str(tmp_path / "*.vhd"))
    assert proc.returncode == 22
    assert proc.stdout.splitlines()[-1] == f"vhd={bad} scan-error=-22 error-message='opening file'"
    proc = vu("scan", "-c", "-m", str(tmp_path / "{b,a}.vhd"))
    assert proc.returncode == 0
    assert proc.stdout.splitlines()[1].startswith("vhd=a.vhd ")


def test_scan_missing_folder(tmp_path: Path) -> None:
    proc = vu("scan", "-m", str(tmp_path / "nodir" / "*.vhd"))
    assert proc.returncode == 5
    # The reference adds "Check syslog for details", though nothing logs there: ours
    # says what failed (callers parse stdout and the exit code only).
    assert proc.stderr == "scan failed: -5 (glob aborted: Input/output error)\n"


def test_library_sees_what_vhd_util_wrote(tmp_path: Path) -> None:
    img = str(tmp_path / "l.vhd")
    vu("create", "-n", img, "-s", "10")
    with VhdImage.open(img) as im:
        assert im.size == 10 * MB and im.header is not None
        assert im.header.max_bat_size == 5 and im.footer.crtr_app == s.CREATOR_APP


def test_create_size_limits(tmp_path: Path) -> None:
    """2040 GiB is the largest VHD (XenServer's and qemu's limit); zero is refused."""
    img = tmp_path / "big.vhd"
    assert vu("create", "-n", str(img), "-s", "2088960").returncode == 0
    img.unlink()
    proc = vu("create", "-n", str(img), "-s", "2088961")
    assert proc.returncode == 22 and proc.stderr.count("\n") == 1
    assert "2040 GiB" in proc.stderr and not img.exists()
    proc = vu("create", "-n", str(img), "-s", "0")
    assert proc.returncode == 22 and not img.exists()


def test_scan_lvm_lists_volumes_through_lvs(tmp_path: Path) -> None:
    """-l VG asks lvs for the group's volumes, keeps those matching -m (then FILES
    patterns) in that order, and reads each from /dev/VG/LV. A stand-in lvs proves the
    listing; the volumes do not exist here, so each fails to open, by its LV name."""
    fake = tmp_path / "bin"
    fake.mkdir()
    lvs = fake / "lvs"
    lvs.write_text("#!/bin/sh\n"
                   "[ \"$*\" = '--noheadings --nosuffix --units b -o lv_name,lv_size "
                   "VG_XenStorage-x' ] || exit 5\n"
                   "printf '  MGT 4194304\\n  VHD-b 8388608\\n  VHD-a 8388608\\n'\n")
    lvs.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    proc = run([tool("vhd-util"), "scan", "-f", "-c", "-l", "VG_XenStorage-x", "-m", "VHD-*"],
               env=env, text=True)
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [
        "vhd=VHD-b scan-error=-2 error-message='opening file'",
        "vhd=VHD-a scan-error=-2 error-message='opening file'",
    ]
    proc = run([tool("vhd-util"), "scan", "-l", "other-vg", "-m", "*"], env=env, text=True)
    assert proc.returncode == 22
    assert proc.stderr == ("lvm_scan_vg failed -22\n"
                           "scan failed: -22 (lvs: Invalid argument)\n")


@pytest.mark.parametrize("argv", [
    ["query", "-v"], ["set", "-f", "hidden", "-v", "1"], ["fill"], ["repair"],
    ["modify", "-z"], ["copy", "-N", "{dir}/new.vhd"],
])
def test_open_errors_say_one_line(tmp_path: Path, argv: list[str]) -> None:
    """Every command that opens the image first says ``error opening NAME: -ERRNO`` on
    stdout and exits with that errno, with nothing on stderr and nothing made."""
    args = [a.replace("{dir}", str(tmp_path)) for a in argv]
    junk = tmp_path / "junk"
    junk.write_bytes(b"j" * 8192)
    for name, code in ((str(tmp_path / "missing.vhd"), 2), (str(junk), 22),
                       (str(tmp_path), 21)):
        proc = vu(*args, "-n", name)
        assert (proc.returncode, proc.stdout, proc.stderr) == (
            code, f"error opening {name}: {-code}\n", ""), (argv, name)
    assert sorted(os.listdir(tmp_path)) == ["junk"]
    assert junk.read_bytes() == b"j" * 8192


def test_read_and_check_dump_headers_of_a_non_vhd(tmp_path: Path) -> None:
    """read -p on a file that does not open says so and dumps what it can; check prints
    exactly that dump after its own verdict."""
    junk = tmp_path / "junk"
    junk.write_bytes(b"j" * 8192)
    proc = vu("read", "-p", "-n", str(junk))
    assert proc.returncode == 22
    head = f"Failed to open {junk}: -22\n\n{junk} appears invalid; dumping headers\n\n"
    assert proc.stdout.startswith(head + "VHD Footer Summary:\n")
    assert "Cookie              : jjjjjjjj\n" in proc.stdout
    assert proc.stdout.endswith("(Bad!)\n\n")  # the header summary, of zeros
    proc2 = vu("check", "-n", str(junk))
    assert proc2.returncode == 22
    assert proc2.stdout.endswith(f"{junk} appears invalid; dumping metadata\n" + proc.stdout)
    proc = vu("read", "-p", "-n", str(tmp_path / "missing.vhd"))
    assert (proc.returncode, proc.stdout) == (
        2, f"Failed to open {tmp_path}/missing.vhd: -2\n\n"
           f"{tmp_path}/missing.vhd appears invalid; dumping headers\n\n")
    assert junk.read_bytes() == b"j" * 8192


def test_scan_reports_an_unreadable_key_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A key hash that cannot be read (read_keyhash fails with a FormatError) is one
    scan-error line for that image; -c goes on with the next."""
    import errno

    from blktap.cli.vhd_util import run as vhd_util_main
    from blktap.cli.vhd_util import scan
    from blktap.cli.vhd_util.options import Output
    from blktap.errors import FormatError

    a, b = str(tmp_path / "a.vhd"), str(tmp_path / "b.vhd")
    vu("create", "-n", a, "-s", "8")
    vu("create", "-n", b, "-s", "8")
    real = scan.read_keyhash

    def failing(image: VhdImage) -> object:
        if image.path == a:
            raise FormatError(f"{a}: cannot read its key hash", errno.EIO)
        return real(image)

    monkeypatch.setattr(scan, "read_keyhash", failing)
    for extra, code in (([], errno.EIO), (["-c"], 0)):
        out = Output()
        got = vhd_util_main(["vhd-util", "scan", "-M", *extra, a, b], out)
        out.close()
        lines = capsys.readouterr().out.splitlines()
        assert got == code
        assert lines[0] == f"vhd={a} scan-error=-5 error-message='checking markers'"
        assert lines[1:] == ([] if code else [
            f"vhd=b.vhd capacity=8388608 size={os.path.getsize(b)} hidden=0 marker=0 "
            "keyhash= parent=none"])


def test_marker_of_a_vhd_without_batmap(tmp_path: Path) -> None:
    """qemu-img's VHDs have no batmap: the marker lives in an xattr, as with the reference;
    set, query and scan agree and the file's bytes stay as they were."""
    img = str(tmp_path / "q.vhd")
    run([need("qemu-img"), "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", img, "8M"],
        check=True)
    with VhdImage.open(img) as image:
        assert image.batmap_header is None
    assert vu("query", "-n", img, "-m").stdout == "marker: 0\n"
    try:
        os.setxattr(img, "user.probe", b"1")
    except OSError:
        pytest.skip("no user xattrs on this filesystem")
    before = Path(img).read_bytes()
    assert vu("set", "-n", img, "-f", "marker", "-v", "200").returncode == 0
    assert os.getxattr(img, "user.com.citrix.xenclient.backend.marker") == b"\xc8"
    assert Path(img).read_bytes() == before
    assert vu("query", "-n", img, "-m").stdout == "marker: -56\n"  # a signed char
    assert " marker=200 keyhash= " in vu("scan", "-M", img).stdout
    assert vu("check", "-n", img).stdout == f"{img} is valid\n"
