"""The physical-size and kill-data operations of ``vhd-util modify`` (``-s`` and ``-z``).

Both are used by XenServer's storage manager on thick-provisioned (LVM) disks: ``-s``
moves the footer to the end of a logical volume that was just grown (or is about to be
shrunk), ``-z`` throws a disk's data away without rewriting it.
"""

from __future__ import annotations

import errno
import os

from blktap.errors import OutOfRange, UnsupportedImage, UsageError
from blktap.image.fileio import is_regular, pwrite_all
from blktap.image.vhd import structs as s
from blktap.image.vhd.image import VhdImage


def physical_size(image: VhdImage) -> int:
    """The smallest file that holds the image: the end of its data plus the footer."""
    return image.end_of_data() + s.FOOTER_SIZE


def set_physical_size(path: str, size: int) -> None:
    """Move the footer so that the image ends at ``size`` bytes.

    The footer is written at ``size - 512`` first; a regular file is then cut to ``size``
    (the reference leaves a longer file as it is, which keeps the old footer at its end
    and so changes nothing). Killed in between, the file still ends in a valid footer: the
    old one when shrinking, the new one when growing. A size below the end of the data
    would lose data and is refused (EINVAL), as is a size that is not a whole number of
    sectors, or one past the end of a block device (ENOSPC).
    """
    with VhdImage.open(path, writable=True, validate_bat=False) as image:
        need = physical_size(image)
        if size < need:
            raise OutOfRange(f"{path}: {size} bytes would cut the data, which needs {need}",
                             errno.EINVAL)
        if size % s.SECTOR_SIZE:
            raise UsageError(f"{path}: {size} is not a whole number of sectors",
                             errno.EINVAL)
        fd = image.fd
        regular = is_regular(fd)
        if not regular and size > image.file_size:
            raise OutOfRange(f"{path}: the device holds only {image.file_size} bytes",
                             errno.ENOSPC)
        pwrite_all(fd, image.footer.sealed().pack(), size - s.FOOTER_SIZE)
        os.fsync(fd)  # the new footer is durable before the old one can go
        if regular and image.file_size > size:
            os.ftruncate(fd, size)
            os.fsync(fd)


def kill_data(path: str) -> None:
    """Forget every block of a dynamic or differencing image: the disk then reads as
    zeros (or as its parent). Fixed disks are refused with ENOSYS, as by the reference.

    Order: the batmap is cleared first (a batmap that calls a block full which the BAT no
    longer maps fails ``check``), then the whole BAT is written unused in one write, then
    a regular file gets its footer at the end of the metadata and is cut there (a block
    device keeps its size and its footer). Killed at any point, the image is valid and
    holds either all of its data or none of it.
    """
    with VhdImage.open(path, writable=True, validate_bat=False) as image:
        if not image.footer.is_dynamic or image.header is None:
            raise UnsupportedImage(f"{path}: a fixed disk has no block table to zero",
                                   errno.ENOSYS)
        fd = image.fd
        if image.batmap is not None and image.batmap_header is not None:
            image.batmap[:] = bytes(len(image.batmap))
            image.write_batmap()
            os.fsync(fd)
        header = image.header
        entries = header.max_bat_size * 4
        # Unused entries are all ones; the padding to a whole sector stays zero.
        bat = bytearray(s.pad_sector(entries))
        bat[:entries] = b"\xff" * entries
        pwrite_all(fd, bat, header.table_offset)
        os.fsync(fd)
        if is_regular(fd):
            footer = image.footer.sealed().pack()
            end = image.end_of_metadata()
            pwrite_all(fd, footer, end)
            os.fsync(fd)
            os.ftruncate(fd, end + s.FOOTER_SIZE)
            pwrite_all(fd, footer, 0)
            os.fsync(fd)
