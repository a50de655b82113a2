"""vhd-util query: sizes, parent, flags and depth, in the fixed order sm parses."""

from __future__ import annotations

import errno

from blktap.cli.vhd_util.common import err_of, open_or_exit, signed_byte
from blktap.cli.vhd_util.options import Output, Usage, getopt
from blktap.errors import BlktapError
from blktap.image.vhd import locators
from blktap.image.vhd import structs as s
from blktap.image.vhd.create import chain_depth
from blktap.image.vhd.marker import read_marker
from blktap.image.vhd.modify import physical_size

USAGE = ("options: <-n name> [-v print virtual size (in MB)] "
         "[-s print physical utilization (bytes)] [-p print parent] [-f print fields] "
         "[-m print marker] [-d print chain depth] "
         "[-S print max virtual size (MB) for fast resize] [-a print allocated block count] "
         "[-u don't resolve parent path] [-h help]\n")


def run(argv: list[str], out: Output) -> int:
    parsed = getopt("query", argv, "n:vspfdSmauh", out)
    name = None
    flags: set[str] = set()
    for opt, val in parsed.opts:
        if opt == "n":
            name = val
        elif opt == "h":
            raise Usage(0)
        elif opt == "?":
            raise Usage(22)
        else:
            flags.add(opt)
    if not name or parsed.args:
        raise Usage(22)
    with open_or_exit(name, out) as image:
        return _query(image, name, flags, out)


def _query(image, name: str, flags: set[str], out: Output) -> int:  # noqa: ANN001
    err = 0
    if "v" in flags:
        out.print(f"{image.size >> 20}\n")
    if "s" in flags:
        if image.batmap_header is not None and not image.batmap_valid:
            out.print(f"failed to get physical size: {-errno.EINVAL}\n")
            err = errno.EINVAL
        else:
            phys = image.file_size if image.is_fixed else physical_size(image)
            out.print(f"{phys}\n")
    if "p" in flags:
        if not image.is_differencing:
            out.print(f"{name} has no parent\n")
        else:
            parent, perr = _parent(image, "u" in flags)
            if parent is None:
                out.print("query failed\n")
                err = err or perr
            else:
                out.print(f"{parent}\n")
    if "f" in flags:
        out.print(f"hidden: {signed_byte(image.hidden)}\n")
    if "m" in flags:
        try:
            out.print(f"marker: {signed_byte(read_marker(image))}\n")
        except OSError as exc:
            out.print(f"error checking 'marker' field: {-exc.errno}\n")
            err = err or exc.errno
    if "d" in flags:
        try:
            depth = chain_depth(image.path)
            out.print(f"chain depth: {depth}\n")
        except (BlktapError, OSError) as exc:
            out.print(f"error checking chain depth: {-err_of(exc)}\n")
            err = err or err_of(exc)
    if "a" in flags:
        if image.is_fixed:
            out.print(f"error reading bat: {-errno.EINVAL}\n")
            err = err or errno.EINVAL
        else:
            entries = -(-image.size // s.DEFAULT_BLOCK_SIZE)
            count = sum(1 for e in image.bat[:entries] if e != s.BAT_ENTRY_UNUSED)
            out.print(f"{count}\n")
    if "S" in flags:
        max_bat = image.header.max_bat_size if image.header else 0
        out.print(f"{max_bat << 1}\n")
    return err


def _parent(image, unresolved: bool) -> tuple[str | None, int]:  # noqa: ANN001
    if image.parent_rbd is not None:  # a snapshot on Ceph: its spec, nothing resolved
        return image.parent_rbd, 0
    names = [name for _, _, name in image.parent_locator_names() if name is not None]
    if not names:
        return None, errno.EINVAL
    if unresolved:
        return names[0], 0
    for name in names:
        found = locators.resolve(image.path, name)
        if found is not None:
            return found, 0
    return None, errno.ENOENT
