"""The ``blktap`` command: a friendly front-end to the image library.

    blktap info IMAGE            what an image is, its chain and how much it holds
    blktap create IMAGE SIZE     a new VHD or raw disk
    blktap snapshot CHILD PARENT a differencing VHD over a parent
    blktap convert SRC DST       a chain flattened into a new raw file, VHD or qcow2 image
                                 (--keep-chain: layer by layer; -B BASE: over a base)
    blktap compare A B           whether two disks read the same
    blktap map IMAGE             which layer holds each part of the disk
    blktap copy SRC DST          copy only the allocated extents onto another disk
    blktap check IMAGE           an image's consistency (qemu-img check's verdicts)
    blktap measure [IMAGE]       the space a new image needs (qemu-img measure)
    blktap coalesce IMAGE        merge a differencing VHD into its parent
    blktap rebase IMAGE PARENT   give a differencing VHD a new parent, keeping its content
    blktap resize IMAGE SIZE     grow a disk (fast, or journaled when metadata must move)
    blktap revert IMAGE JOURNAL  undo an interrupted resize
    blktap changed LOG           the extents a CBT log marks as changed

Image arguments take ``vhd:PATH``, ``qcow2:PATH``, ``aio:PATH`` or ``raw:PATH``, or a plain
path whose format is probed. A probed differencing VHD or qcow2 image with a backing file
is refused (EPERM): its parents are followed only when the format is named, ``vhd:PATH``
or ``qcow2:PATH`` (docs/security.md). ``--parent-dir DIR`` (or ``BLKTAP_PARENT_DIRS``)
confines the parents opened to those directories. Errors are one line on stderr,
``blktap: <message>``, and the exit code is the error's errno.

Every subcommand takes ``-q`` (no progress, no notes), ``-v``/``--debug`` (log on stderr);
those that report take ``--output=json`` (alias ``--json``); the long ones take ``-p``
(progress with rate and ETA even when stderr is not a terminal). SIGTERM and SIGHUP end a
command as Ctrl-C does: what it was building is removed, and it exits 128 + the signal.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stdout, suppress
from dataclasses import dataclass
from typing import Any, NoReturn

from blktap import __version__
from blktap.cli import (
    attach,
    changed,
    checks,
    copy,
    exporter,
    maintain,
    qcow2_layers,
    rated,
    serve,
)
from blktap.cli.common import (
    PROG,
    Progress,
    Terminated,
    add_common_options,
    add_output_option,
    add_parent_dir,
    add_progress_option,
    describe_size,
    error_message,
    exit_code,
    format_table,
    human_size,
    parent_policy,
    parse_size,
    print_error,
    print_json,
    print_note,
    print_warning,
    progress_for,
    set_quiet,
    sigterm_raises,
)
from blktap.errors import BlktapError, FormatError, UsageError
from blktap.image import chain_convert
from blktap.image import rbd as rbdlib
from blktap.image.chain import (
    SECTOR_SIZE,
    Chain,
    Extent,
    Layer,
    parse_spec,
    probe,
    refuse_probed_parent,
)
from blktap.image.chain import open_chain as open_chain_with_key
from blktap.image.crypto import read_key_file
from blktap.image.fileio import pwrite_all, staged_path
from blktap.image.qcow2.create import create as create_qcow2
from blktap.image.qcow2.image import Qcow2Image
from blktap.image.rbd import RbdChain, RbdImage
from blktap.image.vhd import structs as s
from blktap.image.vhd.create import create as create_vhd
from blktap.image.vhd.create import snapshot as snapshot_vhd
from blktap.image.vhd.image import VhdImage
from blktap.image.vhd.keyhash import is_encrypted

# Data moves in chunks of one VHD block, through one preallocated buffer per image.
CHUNK = 2 << 20
# Inside a chunk, sparse copies skip all-zero pieces of this size.
PIECE = 64 << 10
# bytearray == memoryview compares with memcmp; other ways copy or go byte by byte.
ZERO_CHUNK = bytearray(CHUNK)
ZERO_PIECE = bytearray(PIECE)

VHD_TYPES = {s.DISK_TYPE_FIXED: "fixed", s.DISK_TYPE_DYNAMIC: "dynamic",
             s.DISK_TYPE_DIFF: "differencing"}
# File name endings that choose an output format when no option or prefix does.
EXTENSIONS = {".vhd": "vhd", ".img": "raw", ".raw": "raw", ".bin": "raw", ".qcow2": "qcow2"}
# qcow2 creation options (-o NAME=VALUE,...), as qemu-img names them.
QCOW2_OPTIONS = ("cluster_size", "compat", "preallocation", "lazy_refcounts", "extended_l2",
                 "refcount_bits", "backing_file", "backing_fmt")

Handler = Callable[[argparse.Namespace], int]
log = logging.getLogger("blktap.cli")


# ==================================================================================== parser
class Parser(argparse.ArgumentParser):
    """argparse, with usage mistakes reported like every other error: one line, naming
    the subcommand's help."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix(PROG).strip()
        prefix = f"{where}: " if where else ""
        raise UsageError(f"{prefix}{message} (see '{self.prog} --help')")


def add_key_file(cmd: Parser, what: str) -> None:
    cmd.add_argument("--key-file", metavar="PATH",
                     help=f"the AES-XTS key (32 or 64 bytes) of {what}, when encrypted")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"invalid number {text!r}") from None
    if value < 1:
        raise UsageError(f"invalid number {text!r}: must be at least 1")
    return value


def build_parser() -> Parser:
    parser = Parser(prog=PROG, allow_abbrev=False,
                    description="Inspect, create, snapshot, convert and compare virtual disk "
                                "images (VHD and raw).",
                    epilog="Image arguments accept vhd:PATH, aio:PATH, raw:PATH, "
                           "rbd:POOL/IMAGE[@SNAP][:conf=FILE] (Ceph, docs/ceph.md) or a plain "
                           "path (format probed; a probed differencing VHD is refused: name "
                           "it vhd:PATH to follow its parents). Sizes accept 512, 64M, 10G "
                           "(units of 1024).")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    add_common_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_info(sub)
    _add_create(sub)
    _add_snapshot(sub)
    _add_convert(sub)
    _add_compare(sub)
    _add_map(sub)
    checks.add_commands(sub, _command)
    maintain.add_commands(sub, _command)
    serve.add_parser(sub, _command)
    changed.add_parser(sub, _command)
    copy.add_parser(sub, _command)
    exporter.add_parser(sub, _command)
    _add_drivers(sub)
    rated.add_parser(sub, _command)
    attach.add_parsers(sub, _command)
    return parser


def _command(sub: Any, name: str, handler: Handler, summary: str) -> Parser:
    # "resolve": a subcommand that defines -q, -v or --debug itself takes the option
    # string over from the shared one instead of breaking the whole parser.
    cmd = sub.add_parser(name, help=summary, description=summary, allow_abbrev=False,
                         conflict_handler="resolve")
    cmd.set_defaults(handler=handler, min_error_code=1)
    add_common_options(cmd)
    return cmd


def _add_info(sub: Any) -> None:
    cmd = _command(sub, "info", cmd_info, "Show an image: format, sizes, allocation, chain.")
    cmd.add_argument("image", metavar="IMAGE")
    add_output_option(cmd)
    add_parent_dir(cmd)


def _add_create(sub: Any) -> None:
    cmd = _command(sub, "create", cmd_create, "Create a new VHD or raw image.")
    cmd.add_argument("image", metavar="IMAGE")
    cmd.add_argument("size", metavar="SIZE", type=parse_size, nargs="?",
                     help="virtual size: bytes or 64M, 10G... (VHD: rounded up to 2 MiB); "
                          "with -b, the parent's")
    cmd.add_argument("-b", "--backing", metavar="PARENT",
                     help="create a differencing image over PARENT (as blktap snapshot "
                          "IMAGE PARENT; PARENT may be a Ceph snapshot, rbd:POOL/IMAGE@SNAP)")
    cmd.add_argument("-f", "--format", choices=("vhd", "raw", "qcow2"),
                     help="image format (default: from a vhd:/raw:/qcow2: prefix or the "
                          ".vhd/.img/.qcow2 name, else vhd)")
    add_qcow2_options(cmd)
    cmd.add_argument("--fixed", action="store_true",
                     help="reserve all the space now (fixed VHD, fully allocated raw file)")
    cmd.add_argument("--prealloc", metavar="SIZE", type=parse_size,
                     help="dynamic VHD: size its metadata for growing to SIZE later")
    add_output_option(cmd)
    add_parent_dir(cmd)


def _add_snapshot(sub: Any) -> None:
    cmd = _command(sub, "snapshot", cmd_snapshot,
                   "Create CHILD, a differencing VHD (or a qcow2 image: qcow2:CHILD or a "
                   ".qcow2 name) whose parent is PARENT.")
    cmd.add_argument("child", metavar="CHILD")
    cmd.add_argument("parent", metavar="PARENT")
    cmd.add_argument("--raw-parent", action="store_true",
                     help="PARENT is a raw image (same as an aio:/raw: prefix)")
    cmd.add_argument("--prealloc", metavar="SIZE", type=parse_size,
                     help="size the child's metadata for growing to SIZE later")
    cmd.add_argument("--no-skip-empty", dest="skip_empty", action="store_false",
                     help="link to PARENT even when it is an empty differencing image")
    cmd.add_argument("--depth-limit", metavar="N", type=positive_int,
                     help="refuse when the parent chain already has N images or more")
    add_output_option(cmd)
    add_parent_dir(cmd)


def _add_convert(sub: Any) -> None:
    cmd = _command(sub, "convert", cmd_convert,
                   "Copy the disk SRC reads as (its whole chain) into a new image DST.")
    cmd.add_argument("-O", "--output-format", choices=("raw", "vhd", "qcow2"),
                     help="format of DST (default: from a vhd:/raw:/qcow2: prefix or a "
                          ".vhd/.qcow2 name, else raw)")
    add_qcow2_options(cmd)
    cmd.add_argument("src", metavar="SRC")
    cmd.add_argument("dst", metavar="DST")
    cmd.add_argument("--fixed", action="store_true", help="write a fixed VHD (VHD output)")
    cmd.add_argument("--sparse", action=argparse.BooleanOptionalAction, default=True,
                     help="skip zeros so that DST stays sparse (default: --sparse)")
    cmd.add_argument("--force", action="store_true",
                     help="replace DST if it exists (a regular file, not part of SRC)")
    layers = cmd.add_argument_group("keeping layers (VHD and qcow2 output)")
    layers.add_argument("--keep-chain", action="store_true",
                        help="convert each layer of SRC's chain into a layer of its own "
                             "(DST is the leaf; the parents go beside it, named by "
                             "--layer-name), each holding only its source layer's data")
    layers.add_argument("--layer-name", metavar="PATTERN", default="{name}.{ext}",
                        help="with --keep-chain: the parents' file names, in DST's folder; "
                             "fields {name} (the source layer's name without extension), "
                             "{depth} (1: the leaf's parent), {ext} (default: {name}.{ext})")
    layers.add_argument("-B", "--backing", metavar="BASE",
                        help="make DST a child of the existing image BASE, holding only "
                             "where SRC reads differently from BASE (as qemu-img convert "
                             "-B)")
    layers.add_argument("-F", "--backing-format", choices=("vhd", "vpc", "qcow2", "raw"),
                        help="BASE's format (same as a vhd:/qcow2:/raw: prefix on BASE)")
    add_output_option(cmd)
    add_progress_option(cmd)
    add_key_file(cmd, "SRC")
    add_parent_dir(cmd)


def _add_compare(sub: Any) -> None:
    cmd = _command(sub, "compare", cmd_compare,
                   "Compare what two images read as. Exit 0 when equal, 1 when they differ.")
    cmd.set_defaults(min_error_code=2)
    cmd.add_argument("a", metavar="A")
    cmd.add_argument("b", metavar="B")
    cmd.add_argument("--strict", action="store_true",
                     help="images of different sizes differ (default: the extra part must "
                          "read as zeros)")
    add_output_option(cmd)
    add_progress_option(cmd)
    add_key_file(cmd, "A or B")
    add_parent_dir(cmd)


def add_qcow2_options(cmd: Parser) -> None:
    cmd.add_argument("-o", dest="options", metavar="OPTIONS", action="append", default=[],
                     help="qcow2 options, NAME=VALUE[,...]: " + ", ".join(QCOW2_OPTIONS))


def qcow2_options(specs: list[str]) -> dict[str, Any]:
    """``-o cluster_size=64k,compat=1.1`` as keyword arguments of qcow2 create."""
    out: dict[str, Any] = {}
    for spec in specs:
        for item in filter(None, spec.split(",")):
            name, sep, value = item.partition("=")
            name = name.strip().replace("-", "_")
            if name not in QCOW2_OPTIONS:
                raise UsageError(f"unknown qcow2 option {name!r} "
                                 f"(known: {', '.join(QCOW2_OPTIONS)})")
            if name in ("lazy_refcounts", "extended_l2"):
                if value not in ("", "on", "off", "true", "false"):
                    raise UsageError(f"invalid {name} {value!r} (on or off)")
                out[name] = value in ("", "on", "true")
            elif not sep:
                raise UsageError(f"qcow2 option {name} needs a value")
            elif name in ("cluster_size", "refcount_bits"):
                out[name] = parse_size(value) if name == "cluster_size" else int(value)
            else:
                out[name] = value
    return out


def _add_map(sub: Any) -> None:
    cmd = _command(sub, "map", cmd_map, "List the extents of the disk and the layer of each.")
    cmd.add_argument("image", metavar="IMAGE")
    add_output_option(cmd)
    add_parent_dir(cmd)


# ==================================================================================== main
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    min_code = 1
    debug = bool(os.environ.get("BLKTAP_DEBUG"))
    try:
        args = parse_args(parser, argv)
        if args.command is None:
            parser.print_help()
            return 0
        min_code = args.min_error_code
        debug = debug or args.debug
        set_quiet(args.quiet)
        configure_logging(args)
        with sigterm_raises(), quiet_stdout(args.quiet and not args.json):
            return args.handler(args)
    except BrokenPipeError:
        _silence_stdout()
        return errno.EPIPE
    except (BlktapError, OSError) as exc:
        print_error(error_message(exc))
        return max(exit_code(exc), min_code)
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
    except Terminated as exc:
        print_error(exc.message)
        return exc.exit_code
    except Exception as exc:  # a bug: still one line, unless asked for the traceback
        if debug:
            raise
        print_error(f"internal error: {type(exc).__name__}: {error_message(exc)} "
                    f"(run with --debug, or set BLKTAP_DEBUG=1, to see where)")
        return errno.EIO
    finally:
        set_quiet(False)


def parse_args(parser: Parser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, reporting an unknown option against the subcommand it was given to (its
    help names its options), and setting ``json`` from ``--output`` for the handlers."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = getattr(args, "command", None)
        owner = subparser(parser, command) if command else None
        (owner or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    args.json = getattr(args, "output", "human") == "json"
    return args


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    """The parser of subcommand ``name``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser | None = action.choices.get(name)
            return found
    return None


def configure_logging(args: argparse.Namespace) -> None:
    """-v: what is done (INFO) on stderr; -vv or --debug: in detail (DEBUG). A command
    that sets its logging up itself (serve) says so with ``own_logging``."""
    if getattr(args, "own_logging", False):
        return
    if args.debug or args.verbose >= 2:
        level = logging.DEBUG
    elif args.verbose:
        level = logging.INFO
    else:
        return
    root = logging.getLogger("blktap")
    if not any(getattr(h, "blktap_cli", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
        handler.blktap_cli = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)


@contextmanager
def quiet_stdout(quiet: bool) -> Iterator[None]:
    """-q, as qemu-img's: no output but errors (the result is the exit code); output
    asked for with --output=json is still printed."""
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as devnull, redirect_stdout(devnull):
        yield


def _silence_stdout() -> None:
    """After a closed pipe, keep the interpreter's final flush from complaining."""
    with suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


@contextmanager
def errors_about(path: str) -> Iterator[None]:
    """System errors raised inside that name no file are about ``path``."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = path
        raise


def open_chain(spec: str, args: argparse.Namespace, *, key_file: str | None = None,
               metadata_only: bool = False) -> Chain:
    """Open an image argument and its parents (a probed image gets none: ProbedParent;
    the parents must lie inside ``--parent-dir``/``BLKTAP_PARENT_DIRS`` when set).

    ``metadata_only``: the caller reads no data (info, map), so encrypted layers open
    without their key. Otherwise ``key_file`` holds the key of an encrypted chain; it is
    not applied to a chain that is not encrypted (``compare`` may name one of each)."""
    scheme = spec.partition(":")[0]
    if scheme in ("nbd", "nbds", "nbd+unix", "nbds+unix"):
        raise UsageError(f"{spec}: an NBD disk is not an image file: serve it "
                         f"(blktap serve, tap-ctl) or read it with NBD tools (nbdinfo, "
                         f"qemu-img); docs/drivers-nbd.md")
    if spec.startswith("rbd:"):  # a Ceph image (image/rbd.py): one layer
        if key_file:
            raise UsageError(f"{spec}: an RBD image is not encrypted by blktap; no key")
        return RbdChain.open(spec)  # type: ignore[return-value]
    policy = parent_policy(args)
    with errors_about(parse_spec(spec)[1]):
        if metadata_only:
            return Chain.open(spec, ciphertext=True, parent_policy=policy)
        key = read_key_file(key_file) if key_file else None
        return open_chain_with_key(spec, key=key, parent_policy=policy)


# ==================================================================================== info
def layer_format(layer: Layer) -> tuple[str, str | None]:
    """("vhd", "dynamic") and so on; raw layers have no type."""
    if isinstance(layer, VhdImage):
        return "vhd", VHD_TYPES.get(layer.footer.type, str(layer.footer.type))
    if isinstance(layer, Qcow2Image):
        return layer.format_name, f"v{layer.version}"
    if isinstance(layer, RbdImage):
        return "rbd", None
    return "raw", None


def describe_layer(depth: int, layer: Layer) -> dict[str, Any]:
    fmt, kind = layer_format(layer)
    info: dict[str, Any] = {
        "depth": depth, "path": layer.path, "format": fmt, "type": kind,
        "virtual_size": layer.size, "allocated": layer.allocated_bytes(),
        "file_size": layer.file_size if isinstance(layer, VhdImage | Qcow2Image)
        else layer.size,
        "uuid": None, "hidden": None, "marker": None,
    }
    if isinstance(layer, VhdImage):
        info["uuid"] = str(layer.uuid)
        info["hidden"] = bool(layer.hidden)
        info["marker"] = bool(layer.marker) if layer.batmap_header is not None else None
        info["encrypted"] = is_encrypted(layer)
    elif isinstance(layer, Qcow2Image):
        info["encrypted"] = False
        info["cluster_size"] = layer.cluster_size
        info["backing_file"] = layer.backing_file
        info["backing_format"] = layer.backing_format
        info["extended_l2"] = layer.extended
        info["dirty"] = layer.dirty
        info["corrupt"] = layer.corrupt
        info["snapshots"] = [{"id": x.id, "name": x.name} for x in layer.snapshots]
    else:
        info["encrypted"] = False
    return info


def describe_chain(spec: str, chain: Chain) -> dict[str, Any]:
    layers = [describe_layer(depth, layer) for depth, layer in enumerate(chain.layers)]
    leaf = layers[0]
    return {
        "image": spec, "path": leaf["path"], "format": leaf["format"], "type": leaf["type"],
        "virtual_size": chain.size, "allocated": chain.allocated_bytes(),
        "leaf_allocated": leaf["allocated"], "uuid": leaf["uuid"], "hidden": leaf["hidden"],
        "encrypted": leaf["encrypted"],
        "marker": leaf["marker"], "chain_depth": len(layers), "chain": layers,
    }


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _kind(info: dict[str, Any]) -> str:
    return info["format"] if info["type"] is None else f"{info['format']} {info['type']}"


def info_lines(info: dict[str, Any]) -> list[str]:
    lines = [
        f"image:         {info['path']}",
        f"format:        {_kind(info)}",
        f"virtual size:  {describe_size(info['virtual_size'])}",
        f"allocated:     {describe_size(info['allocated'])} in the chain",
        f"               {describe_size(info['leaf_allocated'])} in this image",
    ]
    if info["format"] == "vhd":
        lines += [f"uuid:          {info['uuid']}",
                  f"hidden:        {_yes_no(info['hidden'])}",
                  f"marker:        {_yes_no(info['marker'])}",
                  f"encrypted:     {_yes_no(info['encrypted'])}"]
    leaf = info["chain"][0]
    if info["format"] == "qcow2":
        lines += [f"cluster size:  {leaf['cluster_size']}",
                  f"backing file:  {leaf['backing_file'] or '-'}"
                  + (f" ({leaf['backing_format']})" if leaf["backing_format"] else ""),
                  f"snapshots:     {len(leaf['snapshots'])}"]
    lines.append(f"chain depth:   {info['chain_depth']}")
    rows = [(layer["depth"], _kind(layer), human_size(layer["virtual_size"]),
             human_size(layer["allocated"]), layer["path"]) for layer in info["chain"]]
    table = format_table(("depth", "format", "size", "allocated", "path"), rows, "llrrl")
    return lines + ["chain:"] + ["  " + line for line in table]


def cmd_info(args: argparse.Namespace) -> int:
    with open_chain(args.image, args, metadata_only=True) as chain:
        info = describe_chain(args.image, chain)
    if args.json:
        print_json(info)
    else:
        print("\n".join(info_lines(info)))
    return 0


# ==================================================================================== create
def output_format(explicit: str | None, spec: str, default: str) -> tuple[str, str]:
    """(format, path) of an image to make: the option, else the spec's prefix, else the
    name's extension, else ``default``. An option that contradicts the prefix is an error."""
    prefixed, path = parse_spec(spec)
    if explicit and prefixed and explicit != prefixed:
        raise UsageError(f"{spec}: the {prefixed}: prefix contradicts format {explicit}")
    if explicit or prefixed:
        return explicit or prefixed or default, path
    ext = os.path.splitext(path)[1].lower()
    return EXTENSIONS.get(ext, default), path


def create_raw(path: str, size: int, fixed: bool) -> None:
    """A new raw file of ``size`` bytes: sparse, or with every block reserved (``fixed``).
    Never overwrites: an existing file is an error."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            os.ftruncate(fd, size)
            if fixed:
                _reserve(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with suppress(OSError):
            os.unlink(path)
        raise


def _reserve(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        for offset in range(0, size, CHUNK):
            pwrite_all(fd, memoryview(ZERO_CHUNK)[: min(CHUNK, size - offset)], offset)


def cmd_create(args: argparse.Namespace) -> int:
    fmt, path = output_format(args.format, args.image, "vhd")
    if args.backing is not None:
        if args.size is not None or args.fixed or args.options:
            raise UsageError("-b takes the size of its parent; no SIZE, --fixed or -o")
        if fmt == "raw":
            raise UsageError(f"{args.image}: a raw image has no parent")
        args.child = f"{fmt}:{path}"
        args.parent, args.raw_parent = args.backing, False
        args.depth_limit, args.skip_empty = None, True
        return cmd_snapshot(args)
    if args.size is None:
        raise UsageError("create: SIZE is needed (or -b PARENT)")
    if args.size <= 0:
        raise UsageError(f"invalid size {args.size}: must be more than 0 bytes")
    if args.options and fmt != "qcow2":
        raise UsageError("-o applies to qcow2 images")
    if fmt == "qcow2":
        if args.fixed or args.prealloc is not None:
            raise UsageError("--fixed and --prealloc apply to VHD and raw images (qcow2: "
                             "-o preallocation=...)")
        create_qcow2(path, args.size, **qcow2_options(args.options))
        return report_created(args, path, "qcow2", None, -(-args.size // 512) * 512)
    if fmt == "raw":
        if args.prealloc is not None:
            raise UsageError("--prealloc applies to VHD images only")
        with errors_about(path):
            create_raw(path, args.size, args.fixed)
        return report_created(args, path, "raw", "fully allocated" if args.fixed else "sparse",
                              args.size)
    if args.fixed and args.prealloc is not None:
        raise UsageError("--prealloc applies to dynamic VHDs; a fixed VHD cannot grow fast")
    create_vhd(path, args.size, fixed=args.fixed, prealloc_size=args.prealloc)
    size = vhd_size(path)
    if not args.json:
        note_rounding(args.size, size)
    return report_created(args, path, "vhd", "fixed" if args.fixed else "dynamic", size)


def report_created(args: argparse.Namespace, path: str, fmt: str, kind: str | None,
                   size: int) -> int:
    if args.json:
        print_json({"image": path, "format": fmt, "type": kind, "virtual_size": size})
    else:
        shown = {"vhd": "VHD"}.get(fmt, fmt)
        sep = " " if fmt == "vhd" else ", "
        print(f"Created {path}: {shown}{sep + kind if kind else ''}, {describe_size(size)}")
    return 0


def vhd_size(path: str) -> int:
    with VhdImage.open(path) as image:
        return image.size


def note_rounding(asked: int, made: int) -> None:
    if made != asked:
        print_note(f"size rounded up from {describe_size(asked)} to {describe_size(made)}: "
                   f"VHD sizes are whole 2 MiB blocks")


# ==================================================================================== snapshot
def snapshot_parent(spec: str, raw_flag: bool) -> tuple[str, bool]:
    """(path, is raw) of a snapshot's parent. A plain path is probed, and a raw file is
    only accepted when asked for: a VHD with a damaged footer also probes as raw."""
    if spec.startswith("rbd:"):  # a snapshot on Ceph: raw, named by its spec
        return spec, True
    fmt, path = parse_spec(spec)
    if fmt == "vhd" and raw_flag:
        raise UsageError(f"{spec}: the vhd: prefix contradicts --raw-parent")
    if fmt == "raw" or raw_flag:
        return path, True
    if fmt is None:
        if probe(path) == "raw":
            raise UsageError(f"{path} is not a VHD; to snapshot a raw image pass "
                             f"--raw-parent (or name it aio:{path})")
        refuse_probed_parent(path)
    return path, False


def cmd_snapshot(args: argparse.Namespace) -> int:
    if output_format(None, args.child, "vhd")[0] == "qcow2":
        return qcow2_layers.cmd_snapshot(args, parse_spec(args.child)[1])
    child_fmt, child = parse_spec(args.child)
    if child_fmt == "raw":
        raise UsageError(f"{args.child}: a snapshot is always a VHD")
    parent, raw = snapshot_parent(args.parent, args.raw_parent)
    used = snapshot_vhd(child, parent, raw_parent=raw, prealloc_size=args.prealloc,
                        depth_limit=args.depth_limit, skip_empty=args.skip_empty,
                        parent_policy=parent_policy(args))
    if args.json:
        print_json({"image": child, "format": "vhd", "type": "differencing",
                    "parent": used, "parent_is_raw": raw})
        return 0
    print(f"Created {child}: VHD differencing, parent {used}")
    if os.path.realpath(parent) != os.path.realpath(used):
        print_note(f"{parent} is an empty differencing image: the snapshot links to its "
                   f"first non-empty ancestor (use --no-skip-empty to link to it directly)")
    return 0


# ==================================================================================== copying
def chunks(offset: int, length: int) -> Iterator[tuple[int, int]]:
    """Split a run into pieces that never cross a CHUNK boundary of the disk."""
    end = offset + length
    while offset < end:
        stop = min(end, (offset // CHUNK + 1) * CHUNK)
        yield offset, stop - offset
        offset = stop


def read_range(chain: Chain, offset: int, length: int, buf: bytearray) -> memoryview:
    """Read ``length`` bytes at ``offset`` (at most CHUNK, inside the disk). A sector-aligned
    read lands at the start of ``buf`` (CHUNK bytes); an unaligned one is rare and copied."""
    sectors = -(-length // SECTOR_SIZE)
    if offset % SECTOR_SIZE or sectors * SECTOR_SIZE > len(buf):
        return memoryview(chain.pread(offset, length))
    view = memoryview(buf)
    chain.readinto(offset // SECTOR_SIZE, view[: sectors * SECTOR_SIZE])
    return view[:length]


def same_bytes(a: memoryview, b: memoryview) -> bool:
    """Whether two byte views hold the same bytes, without copying whole buffers."""
    if len(a) != len(b):
        return False
    for one, other in ((a, b), (b, a)):
        if isinstance(one.obj, bytearray) and len(one.obj) == len(one):  # the whole array
            return one.obj == other
    return a.tobytes() == b.tobytes()


def is_zero(view: memoryview) -> bool:
    if len(view) == CHUNK:
        return ZERO_CHUNK == view
    if len(view) == PIECE:
        return ZERO_PIECE == view
    return view.tobytes() == bytes(len(view))


def nonzero_runs(view: memoryview) -> Iterator[tuple[int, int]]:
    """(start, stop) of the runs of ``view`` made of PIECE-sized pieces holding data."""
    if is_zero(view):
        return
    start = None
    for pos in range(0, len(view), PIECE):
        if is_zero(view[pos : pos + PIECE]):
            if start is not None:
                yield start, pos
                start = None
        elif start is None:
            start = pos
    if start is not None:
        yield start, len(view)


def data_chunks(chain: Chain, sparse: bool, progress: Progress
                ) -> Iterator[tuple[int, memoryview]]:
    """(offset, bytes) of what to write to copy the disk: every chunk, or (``sparse``)
    only the runs that hold data. Offsets are sector-aligned; a view may end at the disk's
    end mid-sector."""
    buf = bytearray(CHUNK)
    for extent in chain.map():
        if (extent.depth is None or extent.zero) and sparse:
            progress.update(extent.offset + extent.length)
            continue
        for offset, length in chunks(extent.offset, extent.length):
            view = read_range(chain, offset, length, buf)
            if not sparse:
                yield offset, view
            else:
                for start, stop in nonzero_runs(view):
                    yield offset + start, view[start:stop]
            progress.update(offset + length)


def write_raw(chain: Chain, path: str, sparse: bool, progress: Progress) -> int:
    """Write the disk into the empty file at ``path`` (a stage, see staged_path), making
    it a raw image of the same size; returns the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)  # the empty file staged_path made
    try:
        os.ftruncate(fd, chain.size)
        for offset, view in data_chunks(chain, sparse, progress):
            pwrite_all(fd, view, offset)
            written += len(view)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def write_vhd(chain: Chain, path: str, fixed: bool, sparse: bool, progress: Progress) -> int:
    """Write the disk into a new VHD (dynamic unless ``fixed``); returns the bytes written.
    Only the data written allocates blocks, so skipped zeros keep a dynamic VHD sparse."""
    written = 0
    create_vhd(path, chain.size, fixed=fixed)
    with VhdImage.open(path, writable=True) as image:
        for offset, view in data_chunks(chain, sparse, progress):
            data = view if len(view) % SECTOR_SIZE == 0 else _padded(view)
            image.write(offset // SECTOR_SIZE, data)
            written += len(view)
    return written


def write_qcow2(chain: Chain, path: str, sparse: bool, progress: Progress,
                options: dict[str, Any]) -> int:
    """Write the disk into a new qcow2 image; only the data written allocates clusters."""
    if "backing_file" in options:
        raise UsageError("convert writes a whole disk: no backing_file")
    written = 0
    create_qcow2(path, chain.size, **options)
    with Qcow2Image.open(path, writable=True) as image:
        for offset, view in data_chunks(chain, sparse, progress):
            data = view if len(view) % SECTOR_SIZE == 0 else _padded(view)
            image.write(offset // SECTOR_SIZE, data)
            written += len(view)
    return written


def _padded(view: memoryview) -> bytes:
    """The last, partial sector of a disk whose size is not whole sectors."""
    return view.tobytes() + bytes(-len(view) % SECTOR_SIZE)


# ==================================================================================== convert
def check_destination(dst: str, chain: Chain, force: bool) -> None:
    """DST must not exist, unless ``force`` and it is a regular file outside the chain."""
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise UsageError(f"{dst}: folder {folder} does not exist", errno.ENOENT)
    try:
        st = os.stat(dst)
    except FileNotFoundError:
        return
    if not force:
        raise UsageError(f"{dst}: already exists (use --force to replace it)", errno.EEXIST)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{dst}: not a regular file; --force only replaces regular files")
    for layer in chain.layers:
        if isinstance(layer, RbdImage):
            continue
        layer_st = os.fstat(layer.fd)
        if (layer_st.st_dev, layer_st.st_ino) == (st.st_dev, st.st_ino):
            raise UsageError(f"{dst} is part of the source chain ({layer.path}); "
                             f"refusing to replace it")


@contextmanager
def staged_output(dst: str, force: bool) -> Iterator[str]:
    """A path to write the new image at; it takes DST's name only once complete."""
    try:
        with staged_path(dst, replace=force) as tmp:
            yield tmp
    except FormatError as exc:
        if exc.errno == errno.EEXIST:
            raise UsageError(f"{dst}: already exists (use --force to replace it)",
                             errno.EEXIST) from None
        raise


def write_rbd(chain: Chain, dst: str, sparse: bool, force: bool) -> int:
    """Copy the disk into a new RBD image: written under a temporary name in the same
    pool, then renamed to DST's (replacing DST only with ``force``); removed on failure.
    Sparse: only the data runs are written (the rest stays unallocated objects)."""
    spec = rbdlib.parse_spec(dst)
    if spec.snap:
        raise UsageError(f"{dst}: cannot write into a snapshot", errno.EROFS)
    if any(isinstance(x, RbdImage) and x.spec.pool == spec.pool and
           x.spec.namespace == spec.namespace and x.spec.image == spec.image
           for x in chain.layers):
        raise UsageError(f"{dst} is the source; refusing to replace it")
    if rbdlib.exists(dst) and not force:
        raise UsageError(f"{dst}: already exists (use --force to replace it)", errno.EEXIST)
    tmp = dataclasses.replace(spec, image=f"{spec.image}.blktap-{os.getpid()}")
    rbdlib.create(tmp, chain.size)
    written = 0
    try:
        with RbdImage.open(tmp, writable=True) as image, \
                Progress("converting to rbd", chain.size) as progress:
            for offset, view in data_chunks(chain, sparse, progress):
                image.write(offset, view)
                written += len(view)
            image.flush()
        if force and rbdlib.exists(dst):
            rbdlib.remove(dst)
        rbdlib.rename(tmp, spec.image)
    except BaseException:
        rbdlib.remove(tmp)
        raise
    return written


def cmd_convert_layers(args: argparse.Namespace, fmt: str, dst: str) -> int:
    """convert --keep-chain, and convert -B BASE."""
    if args.keep_chain and args.backing:
        raise UsageError("--keep-chain and -B exclude each other (-B makes one layer over "
                         "an existing base)")
    if args.fixed:
        raise UsageError("--fixed makes a whole disk; a kept chain's layers and a child of "
                         "-B are differencing images")
    if fmt not in chain_convert.CHAIN_FORMATS:
        raise UsageError(f"{'--keep-chain' if args.keep_chain else '-B'} needs VHD or qcow2 "
                         f"output (-O vhd|qcow2): a {fmt} image has no parent link")
    options = qcow2_options(args.options)
    started = time.monotonic()
    with open_chain(args.src, args, key_file=args.key_file) as chain:
        if args.keep_chain:
            names = chain_convert.layer_names(chain, dst, fmt, args.layer_name)
            chain_convert.check_targets(names, [chain], args.force)
            total = sum(layer.size for layer in chain.layers)
            with errors_about(dst), \
                    progress_for(args, f"converting layers to {fmt}", total) as progress:
                made = chain_convert.convert_chain(
                    chain, names, fmt, sparse=args.sparse, replace=args.force,
                    options=options, progress=progress.update)
        else:
            made = [convert_onto(args, chain, fmt, dst, options)]
    elapsed = time.monotonic() - started
    layers = [{"depth": depth, "source": source.path, "target": new.path, "format": new.fmt,
               "virtual_size": new.size, "written": new.written}
              for depth, (source, new) in enumerate(zip(chain.layers, made, strict=False))]
    if args.backing:
        layers[0]["backing"] = args.backing
    if args.json:
        print_json({"source": chain.leaf.path, "layers": layers, "target": dst,
                    "format": fmt, "seconds": round(elapsed, 3)})
        return 0
    what = "onto " + args.backing if args.backing else f"{len(made)} layer" + \
        ("s" if len(made) > 1 else "")
    print(f"Converted {chain.leaf.path} to {fmt} ({what}):")
    rows = [(x["depth"], x["target"], human_size(x["virtual_size"]),
             human_size(x["written"]), x["source"]) for x in layers]
    for line in format_table(("depth", "image", "size", "written", "from"), rows, "llrrl"):
        print("  " + line)
    return 0


def convert_onto(args: argparse.Namespace, chain: Chain, fmt: str, dst: str,
                 options: dict[str, Any]) -> chain_convert.NewLayer:
    """convert -B: DST over the existing BASE."""
    base_spec = args.backing
    if args.backing_format:
        prefixed, path = parse_spec(base_spec)
        named = {"vpc": "vhd"}.get(args.backing_format, args.backing_format)
        if prefixed and prefixed != named:
            raise UsageError(f"{base_spec}: the {prefixed}: prefix contradicts -F "
                             f"{args.backing_format}")
        base_spec = f"{named}:{path}"
    with open_chain(base_spec, args) as base:
        chain_convert.check_targets([dst], [chain, base], args.force)
        with errors_about(dst), staged_output(dst, args.force) as tmp, \
                progress_for(args, f"converting to {fmt}", chain.size) as progress:
            return chain_convert.convert_onto(chain, base, tmp, dst, fmt, options=options,
                                              progress=progress.update)


def cmd_convert(args: argparse.Namespace) -> int:
    if (args.keep_chain or args.backing) and args.dst.startswith("rbd:"):
        raise UsageError("--keep-chain and -B write files, not RBD images")
    if args.backing_format and not args.backing:
        raise UsageError("-F names the format of -B BASE: give -B")
    if args.layer_name != "{name}.{ext}" and not args.keep_chain:
        raise UsageError("--layer-name names the layers of --keep-chain: give --keep-chain")
    if args.keep_chain or args.backing:
        fmt, dst = output_format(args.output_format, args.dst, "raw")
        return cmd_convert_layers(args, fmt, dst)
    if args.dst.startswith("rbd:"):
        if args.options or args.fixed or args.output_format not in (None, "raw"):
            raise UsageError("an RBD destination takes no -o, --fixed or other format")
        with open_chain(args.src, args, key_file=args.key_file) as chain:
            written = write_rbd(chain, args.dst, args.sparse, args.force)
        print(f"Converted {chain.leaf.path} ({len(chain)} layer"
              f"{'s' if len(chain) > 1 else ''}) to {args.dst}: rbd, "
              f"{describe_size(chain.size)}, {human_size(written)} of data written")
        return 0
    fmt, dst = output_format(args.output_format, args.dst, "raw")
    if args.options and fmt != "qcow2":
        raise UsageError("-o applies to qcow2 output")
    if args.fixed and fmt != "vhd":
        raise UsageError("--fixed applies to VHD output (for a fully allocated raw file "
                         "use --no-sparse)")
    started = time.monotonic()
    with open_chain(args.src, args, key_file=args.key_file) as chain:
        check_destination(dst, chain, args.force)
        log.info("converting %s (%d layers, %d bytes) to %s %s", chain.leaf.path,
                 len(chain), chain.size, fmt, dst)
        with errors_about(dst), staged_output(dst, args.force) as tmp, \
                progress_for(args, f"converting to {fmt}", chain.size) as progress:
            log.debug("building %s at %s", dst, tmp)
            if fmt == "raw":
                written = write_raw(chain, tmp, args.sparse, progress)
            elif fmt == "qcow2":
                written = write_qcow2(chain, tmp, args.sparse, progress,
                                      qcow2_options(args.options))
            else:
                written = write_vhd(chain, tmp, args.fixed, args.sparse, progress)
            size = vhd_size(tmp) if fmt == "vhd" else chain.size
    elapsed = time.monotonic() - started
    log.info("%s complete: %d bytes written in %.3f s", dst, written, elapsed)
    kind = {"raw": "raw", "qcow2": "qcow2"}.get(
        fmt, f"VHD {'fixed' if args.fixed else 'dynamic'}")
    if args.json:
        print_json({"source": chain.leaf.path, "layers": len(chain), "target": dst,
                    "format": fmt, "type": None if fmt != "vhd" else kind.split()[1],
                    "virtual_size": size, "written": written,
                    "seconds": round(elapsed, 3)})
        return 0
    note_rounding(chain.size, size)
    print(f"Converted {chain.leaf.path} ({len(chain)} layer{'s' if len(chain) > 1 else ''}) "
          f"to {dst}: {kind}, {describe_size(size)}, {human_size(written)} of data written")
    return 0


# ==================================================================================== compare
@dataclass
class Comparison:
    identical: bool
    reason: str | None = None  # "content" or "size" when they differ
    offset: int | None = None  # first differing byte


def segments(a: list[Extent], b: list[Extent], end: int) -> Iterator[tuple[int, int, bool]]:
    """(start, stop, both read as zeros) over [0, end), cut wherever either map changes."""
    ia = ib = 0
    pos = 0
    while pos < end:
        while ia < len(a) and a[ia].offset + a[ia].length <= pos:
            ia += 1
        while ib < len(b) and b[ib].offset + b[ib].length <= pos:
            ib += 1
        stop = end
        zero = True
        for extents, i in ((a, ia), (b, ib)):
            if i < len(extents):
                stop = min(stop, extents[i].offset + extents[i].length)
                zero = zero and extents[i].depth is None
        if stop <= pos:  # a map that does not cover [pos, end): read it to be safe
            stop, zero = end, False
        yield pos, stop, zero
        pos = stop


def first_difference(a: memoryview, b: memoryview) -> int | None:
    """Index of the first byte where two equal-length views differ, or None."""
    if same_bytes(a, b):
        return None
    lo, hi = 0, len(a)
    while hi - lo > 64:  # the difference lies in [lo, hi)
        mid = (lo + hi) // 2
        if a[lo:mid].tobytes() != b[lo:mid].tobytes():
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    return None  # pragma: no cover - unreachable: the views differ


def compare_chains(a: Chain, b: Chain, strict: bool, progress: Progress) -> Comparison:
    if strict and a.size != b.size:
        return Comparison(False, "size")
    common = min(a.size, b.size)
    buf_a, buf_b = bytearray(CHUNK), bytearray(CHUNK)
    for start, stop, zero in segments(a.map(), b.map(), common):
        if zero:
            progress.update(stop)
            continue
        for offset, length in chunks(start, stop - start):
            diff = first_difference(read_range(a, offset, length, buf_a),
                                    read_range(b, offset, length, buf_b))
            if diff is not None:
                return Comparison(False, "content", offset + diff)
            progress.update(offset + length)
    longer = a if a.size > b.size else b
    offset = first_nonzero(longer, common, buf_a, progress)
    if offset is not None:
        return Comparison(False, "content", offset)
    return Comparison(True)


def first_nonzero(chain: Chain, start: int, buf: bytearray, progress: Progress) -> int | None:
    """Offset of the first byte at or after ``start`` that does not read as zero."""
    if start >= chain.size:
        return None
    first = start // SECTOR_SIZE
    for extent in chain.map(first, chain.sectors - first):
        begin = max(extent.offset, start)
        if extent.depth is None:
            progress.update(extent.offset + extent.length)
            continue
        for offset, length in chunks(begin, extent.offset + extent.length - begin):
            view = read_range(chain, offset, length, buf)
            diff = None if is_zero(view) else first_difference(view, memoryview(bytes(length)))
            if diff is not None:
                return offset + diff
            progress.update(offset + length)
    return None


def cmd_compare(args: argparse.Namespace) -> int:
    with open_chain(args.a, args, key_file=args.key_file) as a, \
            open_chain(args.b, args, key_file=args.key_file) as b:
        with progress_for(args, "comparing", max(a.size, b.size)) as progress:
            result = compare_chains(a, b, args.strict, progress)
        sizes = a.size, b.size
    if args.json:
        print_json({"identical": result.identical, "reason": result.reason,
                    "offset": result.offset,
                    "a": {"image": args.a, "size": sizes[0]},
                    "b": {"image": args.b, "size": sizes[1]}})
    elif result.reason == "size":
        print(f"Image size mismatch: {args.a} is {describe_size(sizes[0])}, "
              f"{args.b} is {describe_size(sizes[1])}")
    elif result.reason == "content":
        print(f"Content mismatch at offset {result.offset}")
    else:
        if sizes[0] != sizes[1]:
            print_note(f"the sizes differ ({sizes[0]} and {sizes[1]} bytes); the extra part "
                       f"reads as zeros")
        print("Images are identical.")
    return 0 if result.identical else 1


# ==================================================================================== map
def map_rows(chain: Chain) -> list[dict[str, Any]]:
    return [{"offset": e.offset, "length": e.length, "depth": e.depth,
             "status": "hole" if e.depth is None else ("zero" if e.zero else "data"),
             "file": None if e.depth is None else chain.layers[e.depth].path}
            for e in chain.map()]


def cmd_map(args: argparse.Namespace) -> int:
    with open_chain(args.image, args, metadata_only=True) as chain:
        rows = map_rows(chain)
    if args.json:
        print_json(rows)
        return 0
    table = [(r["offset"], r["length"], "-" if r["depth"] is None else r["depth"],
              r["status"], "(zeros)" if r["file"] is None else r["file"]) for r in rows]
    print("\n".join(format_table(("offset", "length", "depth", "status", "path"), table,
                                 "rrrll")))
    return 0


# ================================================================================== drivers
def _add_drivers(sub: Any) -> None:
    cmd = _command(sub, "drivers", cmd_drivers,
                   "List the tapdisk driver types: built-in, plugins (entry points of "
                   "group blktap.drivers) and why a plugin cannot be used.")
    add_output_option(cmd)


def cmd_drivers(args: argparse.Namespace) -> int:
    from blktap.tapdisk.drivers.registry import listing
    rows = listing()
    if args.json:
        print_json(rows)
        return 0
    table = [(r["name"], r["status"], r["origin"] + (f": {r['error']}" if "error" in r
                                                      and r["status"] == "skipped" else ""))
             for r in rows]
    print("\n".join(format_table(("name", "status", "origin"), table, "lll")))
    for r in rows:
        if r["status"] == "broken":
            print_warning(r["error"])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
