"""vhd-util scan: one line per image (size, hidden flag, parent), optionally as a tree.

Storage managers list whole repositories with it (``scan -f -m PATTERN``), so the line
format and the order are an interface.
"""

from __future__ import annotations

import errno
import glob as _glob
import os
import subprocess
from dataclasses import dataclass, field

from blktap.cli.vhd_util.common import err_of, open_vhd
from blktap.cli.vhd_util.options import Output, Usage, getopt
from blktap.errors import BlktapError
from blktap.image.fileio import file_size_of
from blktap.image.vhd import locators
from blktap.image.vhd import structs as s
from blktap.image.vhd import validate as v
from blktap.image.vhd.keyhash import read_keyhash
from blktap.image.vhd.marker import read_marker

USAGE = ("usage: [OPTIONS] FILES\n"
         "options: [-m match filter] [-f fast] [-c continue on failure] [-l LVM volume] "
         "[-p pretty print] [-a scan parents] [-v verbose] [-h help] [-M show markers]\n")


@dataclass
class Target:
    name: str
    size: int
    raw: bool = False
    device: str | None = None  # LVM mode: the block device holding the volume
    raw_parent: bool = False  # learnt while scanning: the parent named is a raw image


@dataclass
class Info:
    target: Target
    name: str
    capacity: int
    size: int
    hidden: int
    marker: int = 0
    keyhash: str = ""
    parent: str | None = None
    children: list[Info] = field(default_factory=list)
    has_parent_link: bool = False
    printed: bool = False


class ScanError(Exception):
    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.err = err
        self.message = message


@dataclass
class Options:
    fast: bool = False
    cont: bool = False
    pretty: bool = False
    parents: bool = False
    verbose: bool = False
    markers: bool = False
    volume_group: str | None = None


def run(argv: list[str], out: Output) -> int:
    parsed = getopt("scan", argv, "m:fcl:pavMh", out)
    opts = Options()
    pattern = None
    for opt, val in parsed.opts:
        if opt == "m":
            pattern = val
        elif opt == "f":
            opts.fast = True
        elif opt == "c":
            opts.cont = True
        elif opt == "l":
            opts.volume_group = val
        elif opt == "p":
            opts.pretty = True
        elif opt == "a":
            opts.parents = True
        elif opt == "v":
            opts.verbose = True
        elif opt == "M":
            opts.markers = True
        elif opt == "h":
            raise Usage(0)
        else:
            raise Usage(22)
    if pattern is None and not parsed.args:
        raise Usage(22)
    if opts.pretty:
        opts.fast = False
    try:
        if opts.volume_group:
            targets = _lvm_targets(opts.volume_group, pattern, parsed.args, out)
        else:
            targets = _file_targets(pattern, parsed.args, opts, out)
    except ScanError as exc:
        # The reference says "Check syslog for details" here, though nothing of ours
        # logs there (and callers parse stdout and the exit code, not this line): say
        # what failed instead.
        out.error(f"scan failed: {-exc.err} ({exc.message}: {os.strerror(exc.err)})\n")
        return exc.err
    return _Scanner(opts, out).scan(targets)


# ---------------------------------------------------------------------------- targets
def expand_braces(pattern: str) -> list[str]:
    """glibc GLOB_BRACE: ``a{b,c}d`` is ``abd`` then ``acd`` (nesting allowed)."""
    depth = 0
    start = -1
    for i, ch in enumerate(pattern):
        if ch == "\\":
            continue
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                inner = pattern[start + 1 : i]
                parts, level, last = [], 0, 0
                for j, c in enumerate(inner):
                    if c == "{":
                        level += 1
                    elif c == "}":
                        level -= 1
                    elif c == "," and level == 0:
                        parts.append(inner[last:j])
                        last = j + 1
                parts.append(inner[last:])
                head, tail = pattern[:start], pattern[i + 1 :]
                out: list[str] = []
                for part in parts:
                    out.extend(expand_braces(head + part + tail))
                return out
    return [pattern]


def _expand_glob(pattern: str, fast: bool, out: Output) -> list[str]:
    results: list[str] = []
    for pat in expand_braces(pattern):
        if not _glob.has_magic(pat):
            if os.path.lexists(pat):
                results.append(pat)
                continue
            out.print(f"vhd={pattern} scan-error={-errno.ENOENT} "
                      f"error-message='failure scanning target'\n")
            raise ScanError(errno.ENOENT, "no match")
        folder = os.path.dirname(pat)
        if folder and not _glob.has_magic(folder) and not os.path.isdir(folder):
            err = errno.ENOENT if not os.path.exists(folder) else errno.ENOTDIR
            if err != errno.ENOTDIR:
                out.print(f"vhd={folder} scan-error={err} "
                          f"error-message='failure scanning target'\n")
                out.print(f"vhd={pattern} scan-error={-errno.EIO} "
                          f"error-message='failure scanning target'\n")
                raise ScanError(errno.EIO, "glob aborted")
        # glob yields directory order; the reference sorts (strcmp) unless scanning fast.
        found = _glob.glob(pat)
        results.extend(found if fast else sorted(found, key=os.fsencode))
    return results


def _file_targets(pattern: str | None, files: list[str], opts: Options,
                  out: Output) -> list[Target]:
    names = _expand_glob(pattern, opts.fast, out) if pattern is not None else []
    names += files
    targets = []
    for name in names:
        try:
            st = os.stat(name)
        except OSError as exc:
            out.print(f"vhd={name} scan-error={-exc.errno} "
                      f"error-message='failure scanning target'\n")
            if not opts.cont:
                raise ScanError(exc.errno, "stat") from None
            continue
        targets.append(Target(name, st.st_size))
    return targets


def _lvm_targets(vg: str, pattern: str | None, files: list[str], out: Output) -> list[Target]:
    """The logical volumes of a volume group, as ``lvs`` lists them; those matching the
    filter first, then those matching each FILES pattern."""
    import fnmatch

    try:
        proc = subprocess.run(
            ["lvs", "--noheadings", "--nosuffix", "--units", "b", "-o", "lv_name,lv_size", vg],
            capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        err = getattr(exc, "errno", None) or errno.EIO
        out.error(f"lvm_scan_vg failed {-err}\n")
        raise ScanError(err, "lvs") from None
    if proc.returncode != 0:
        out.error(f"lvm_scan_vg failed {-errno.EINVAL}\n")
        raise ScanError(errno.EINVAL, "lvs")
    volumes = []
    for line in proc.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1].isdigit():
            volumes.append((fields[0], int(fields[1])))
    ordered: list[tuple[str, int]] = []
    for pat in ([pattern] if pattern else []) + files:
        for lv in volumes:
            if fnmatch.fnmatchcase(lv[0], pat) and lv not in ordered:
                ordered.append(lv)
    return [Target(name, size, device=f"/dev/{vg}/{name}") for name, size in ordered]


# ---------------------------------------------------------------------------- scanning
class _Scanner:
    def __init__(self, opts: Options, out: Output) -> None:
        self.opts = opts
        self.out = out
        self.collected: list[Info] = []

    def scan(self, targets: list[Target]) -> int:
        err = 0
        i = 0
        while i < len(targets):
            target = targets[i]
            i += 1
            try:
                info = self._scan_one(target)
            except ScanError as exc:
                self.out.print(f"vhd={target.name} scan-error={-exc.err} "
                               f"error-message='{exc.message}'\n")
                if not self.opts.cont:
                    err = exc.err
                    break
                continue
            if self.opts.pretty:
                if not any(c.name == info.name for c in self.collected):
                    self.collected.append(info)
            else:
                self.out.print(self._line(info, ""))
            if self.opts.parents and info.parent is not None:
                self._add_parent(targets, info)
        if self.opts.pretty:
            self._print_tree()
        return 0 if self.opts.cont else err

    def _add_parent(self, targets: list[Target], info: Info) -> None:
        parent = info.parent
        assert parent is not None
        base = os.path.basename(parent)
        if any(os.path.basename(t.name) == base for t in targets):
            return
        if self.opts.volume_group:
            return
        try:
            st = os.stat(parent)
        except OSError as exc:
            self.out.print(f"vhd={parent} scan-error={-exc.errno} "
                           f"error-message='failure scanning target'\n")
            return
        targets.append(Target(parent, st.st_size, raw=info.target.raw_parent))

    def _scan_one(self, target: Target) -> Info:
        name = target.name
        if self.opts.pretty:
            try:
                name = os.path.realpath(target.device or target.name, strict=True)
            except OSError as exc:
                raise ScanError(exc.errno, "resolving name") from None
        if target.raw:
            return Info(target, name, target.size, target.size, 1)
        if self.opts.fast or target.device:
            info = self._scan_fast(target, name)
        else:
            info = self._scan_full(target, name)
        return info

    def _scan_full(self, target: Target, name: str) -> Info:
        try:
            image = open_vhd(target.device or target.name)
        except BlktapError as exc:
            raise ScanError(exc.errno, "opening file") from None
        with image:
            info = Info(target, name, image.size, target.size, image.hidden)
            if self.opts.markers:
                try:
                    info.marker = read_marker(image)
                    keyhash = read_keyhash(image)
                except (BlktapError, OSError) as exc:
                    # read_keyhash fails with a FormatError, read_marker with an OSError.
                    raise ScanError(err_of(exc), "checking markers") from None
                info.keyhash = keyhash.hash.hex() if keyhash.cookie else ""
            target.raw_parent = image.parent_is_raw
            if image.is_differencing:
                try:
                    info.parent = image.parent_path()
                except BlktapError:
                    info.parent = self._fallback_parent(image)
        return info

    def _fallback_parent(self, image) -> str:  # noqa: ANN001
        """A parent that does not resolve is reported as its locator says."""
        assert image.header is not None
        chosen = None
        locs = [loc for loc in image.header.loc if loc.code != s.PLAT_CODE_NONE]
        macx = [loc for loc in locs if loc.code == s.PLAT_CODE_MACX]
        w2ru = [loc for loc in locs if loc.code == s.PLAT_CODE_W2RU]
        if macx:
            chosen = macx[0]
        elif w2ru:
            chosen = w2ru[-1]
        elif locs:
            chosen = locs[0]
        if chosen is None:
            raise ScanError(errno.EINVAL, "getting parent")
        decoded = locators.read_name(image.fd, chosen)
        if decoded is None:
            raise ScanError(errno.EINVAL, "getting parent")
        return decoded

    def _scan_fast(self, target: Target, name: str) -> Info:
        """Read only the first 1.5 KiB: the footer copy at offset 0 and the header after it.
        A fixed disk has data there, not a footer: it fails, as with the reference."""
        path = target.device or target.name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ScanError(exc.errno, "opening file") from None
        try:
            head = os.pread(fd, s.FOOTER_SIZE + s.HEADER_SIZE, 0)
            if len(head) < s.FOOTER_SIZE + s.HEADER_SIZE:
                raise ScanError(errno.EIO, "opening file")
            footer = s.Footer.unpack(head)
            if v.footer_problem(footer, head[:512], strict=False, allow_poison=True):
                raise ScanError(errno.EINVAL, "opening file")
            header = None
            if footer.is_dynamic:
                if footer.data_offset == 512:
                    raw = head[s.FOOTER_SIZE:]
                else:
                    raw = os.pread(fd, s.HEADER_SIZE, footer.data_offset)
                if len(raw) < s.HEADER_SIZE:
                    raise ScanError(errno.EIO, "opening file")
                header = s.Header.unpack(raw)
                if v.header_problem(header, raw, strict=False):
                    raise ScanError(errno.EINVAL, "opening file")
            size = target.size if not target.device else file_size_of(fd)
            info = Info(target, name, footer.curr_size, size, footer.hidden)
            if self.opts.markers and header is not None and footer.crtr_app[:3] == b"tap":
                bhdr = s.BatmapHeader.unpack(os.pread(fd, 512, header.bat_end).ljust(512, b"\0"))
                if bhdr.cookie == s.BATMAP_COOKIE:
                    info.marker = bhdr.marker
                    info.keyhash = bhdr.keyhash_hash.hex() if bhdr.keyhash_cookie else ""
            target.raw_parent = False
            if header is not None and footer.type == s.DISK_TYPE_DIFF:
                target.raw_parent = header.prt_uuid == b"\0" * 16
                pname = v.decode_parent_name(header)
                if pname is None:
                    raise ScanError(errno.EINVAL, "getting parent")
                info.parent = pname
            return info
        except OSError as exc:
            raise ScanError(err_of(exc), "opening file") from None
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------ output
    def _line(self, info: Info, indent: str, suffix: str = "") -> str:
        verbose = self.opts.verbose
        name = info.name if verbose else os.path.basename(info.name)
        parent = "none"
        if info.parent is not None:
            parent = info.parent if verbose else os.path.basename(info.parent)
        fields = f"vhd={name} capacity={info.capacity} size={info.size} hidden={info.hidden}"
        if self.opts.markers:
            fields += f" marker={info.marker} keyhash={info.keyhash}"
        return f"{indent}{fields} parent={parent}{suffix}\n"

    def _print_tree(self) -> None:
        nodes = sorted(self.collected, key=lambda i: os.fsencode(i.name))
        by_name = {n.name: n for n in nodes}
        for node in nodes:
            if node.parent is not None and node.parent in by_name:
                by_name[node.parent].children.append(node)
                node.has_parent_link = True
        roots = [n for n in nodes if not n.has_parent_link]
        for hidden_pass in (True, False):
            for root in roots:
                if not root.printed and (bool(root.hidden) == hidden_pass or not hidden_pass):
                    self._print_subtree(root, 0)
        for node in nodes:
            if not node.printed:
                self._print_subtree(node, 0)

    def _print_subtree(self, node: Info, depth: int) -> None:
        if node.printed:
            return
        node.printed = True
        suffix = " (not found in scan)" if node.parent is not None and \
            not node.has_parent_link else ""
        self.out.print(self._line(node, "   " * depth, suffix))
        for child in [c for c in node.children if not c.hidden] + \
                [c for c in node.children if c.hidden]:
            self._print_subtree(child, depth + 1)
