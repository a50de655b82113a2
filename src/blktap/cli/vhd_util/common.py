"""Helpers shared by the vhd-util subcommands."""

from __future__ import annotations

import errno
import os

from blktap.cli.vhd_util.options import Exit, Output
from blktap.errors import BlktapError, FormatError
from blktap.image.vhd.image import VhdImage


def open_vhd(path: str, *, writable: bool = False, allow_disabled: bool = True,
             footer: str = "auto") -> VhdImage:
    """Open a VHD as the reference's tools do, failing with the errno they report: a
    missing file ENOENT, an empty file EPIPE, a file shorter than a footer EIO, anything
    else that is not a VHD EINVAL. ``footer`` picks the footer copy (VhdImage.open)."""
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise FormatError(f"{path}: {os.strerror(exc.errno)}", exc.errno) from None
    if os.path.isfile(path) and size < 512:
        err = errno.EPIPE if size == 0 else errno.EIO
        raise FormatError(f"{path}: file too small to be a VHD ({size} bytes)", err)
    return VhdImage.open(path, writable=writable, allow_disabled=allow_disabled,
                         validate_bat=False, footer=footer)


def open_or_exit(path: str, out: Output, *, writable: bool = False,
                 allow_disabled: bool = True, footer: str = "auto") -> VhdImage:
    """open_vhd, or the reference's ``error opening PATH: -ERRNO`` line on stdout and an
    exit with that errno."""
    try:
        return open_vhd(path, writable=writable, allow_disabled=allow_disabled,
                        footer=footer)
    except BlktapError as exc:
        out.print(f"error opening {path}: {-exc.errno}\n")
        raise Exit(exc.errno) from None


def signed_byte(value: int) -> int:
    return value - 256 if value >= 128 else value


def err_of(exc: BaseException) -> int:
    """The positive errno of an exception."""
    if isinstance(exc, BlktapError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EINVAL
