"""vhd-util resize: grow a VHD, fast (within the preallocated BAT) or journaled."""

from __future__ import annotations

import errno
import os
import stat

from blktap.cli.vhd_util.common import err_of, open_vhd
from blktap.cli.vhd_util.options import Output, Usage, getopt, strtoull
from blktap.errors import BlktapError
from blktap.image.vhd import journal as jn
from blktap.image.vhd import resize as rs

USAGE = ("options: <-n name> <-s size (in MB)> (<-j journal>|<-f fast>) [-h help]\n\n"
         "The resize operation can only be performed offline and must be journaled "
         "because resizing the metadata might require moving data blocks. However, if a "
         "VHD was created with -S <msize> option (during vhd-util create/snapshot), which "
         "preallocates the metadata for growing the VHD up to size <msize>, then resizing "
         "such a VHD up to <msize> can be performed online without journaling (-f "
         "option).\n")


def _reason(exc: BaseException, name: str) -> str:
    return str(exc).removeprefix(f"{name}: ")


def run(argv: list[str], out: Output) -> int:
    parsed = getopt("resize", argv, "n:s:j:fh", out)
    name = jname = None
    size_mb = 0
    have_size = fast = False
    for opt, val in parsed.opts:
        if opt == "n":
            name = val
        elif opt == "j":
            jname = val
        elif opt == "f":
            fast = True
        elif opt == "s":
            size_mb, have_size = strtoull(val or ""), True
        else:
            raise Usage(22)
    if not have_size or not name or (not jname and not fast) or parsed.args:
        raise Usage(22)
    if jname and fast:
        raise Usage(22)

    # Like the reference, look at the image before anything else.
    try:
        open_vhd(name).close()
        target = rs.load_target(name)
    except BlktapError as exc:
        out.print(f"error opening {name}: {-exc.errno} ({_reason(exc, name)})\n")
        return exc.errno
    if not target.creator_is_tap:
        out.print(f"{name} not created by xen; resize not supported\n")
        return errno.EINVAL
    size = size_mb << 20
    if fast:
        return _fast(name, target, size, out)
    assert jname is not None
    return _journaled(name, jname, target, size, out)


def _fast(name: str, target: rs.ResizeTarget, size: int, out: Output) -> int:
    wanted = rs.round_size(size)
    if target.is_dynamic and wanted < target.size:
        out.print(f"{name}: size ({wanted}) < curr size ({target.size})\n")
        return errno.EINVAL
    try:
        rs.apply_fast(rs.plan_fast(target, size))
    except (BlktapError, OSError) as exc:
        out.print(f"resize failed: {-err_of(exc)} ({_reason(exc, name)})\n")
        return err_of(exc)
    return 0


def _journaled(name: str, jname: str, target: rs.ResizeTarget, size: int,
               out: Output) -> int:
    if os.path.lexists(jname) and not _is_block(jname):
        out.print(f"creating journal failed: {-errno.EEXIST} "
                  f"({jname}: {os.strerror(errno.EEXIST)})\n")
        return errno.EEXIST
    try:
        plan = rs.plan_journaled(target, size)
    except BlktapError as exc:
        if exc.errno == errno.ENOSYS:
            # What the reference says of any shrink (it supports none).
            kind = "dynamic" if target.is_dynamic else "fixed"
            out.print(f"{kind} shrink not fully implemented\n")
        else:
            out.print(f"resize failed: {-exc.errno} ({_reason(exc, name)})\n")
            return exc.errno
        out.print(f"resize failed: {-exc.errno}\n")
        return exc.errno
    if plan.noop:
        return 0
    try:
        rs.write_resize_journal(plan, jname)
    except BlktapError as exc:
        out.print(f"creating journal failed: {-exc.errno} ({_reason(exc, jname)})\n")
        return exc.errno
    try:
        rs.apply_journaled(plan)
    except (BlktapError, OSError) as exc:
        code = err_of(exc)
        out.print(f"resize failed: {-code} ({_reason(exc, name)})\n")
        try:
            jn.revert(name, jname)
        except BlktapError as rexc:
            out.print(f"closing journal failed: {-rexc.errno} ({rexc})\n")
        return code
    try:
        jn.remove_journal(jname)
    except BlktapError as exc:
        out.print(f"closing journal failed: {-exc.errno} ({_reason(exc, jname)})\n")
        return exc.errno
    return 0


def _is_block(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False
