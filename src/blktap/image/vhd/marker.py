"""Where a VHD keeps blktap's marker byte (``vhd-util set -f marker``).

A VHD made by blktap 1.2 or later keeps it in its batmap header. Any other VHD (made by
qemu-img, or by an older blktap) has no batmap: the reference keeps the byte in the
extended attribute ``user.com.citrix.xenclient.backend.marker`` instead, as it does the key
hash (see keyhash.py). Failures of the xattr calls come back as the OSError the kernel gave.
"""

from __future__ import annotations

import errno
import os

from blktap.errors import ReadOnlyImage
from blktap.image.vhd.image import VhdImage

MARKER_XATTR = "user.com.citrix.xenclient.backend.marker"


def read_marker(image: VhdImage) -> int:
    """The marker byte (0 when none was ever set)."""
    if image.batmap_header is not None:
        return image.batmap_header.marker
    try:
        data = os.getxattr(image.path, MARKER_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return 0
        raise
    return data[0] if data else 0


def write_marker(image: VhdImage, value: int) -> None:
    """Set the marker byte of an image opened writable."""
    if not image.writable:
        raise ReadOnlyImage(f"{image.path} is open read-only")
    if image.batmap_header is not None:
        image.set_marker(value)
    else:
        os.setxattr(image.path, MARKER_XATTR, bytes([value & 0xFF]))
