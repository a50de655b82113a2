"""The VHD format: fixed, dynamic and differencing disks, with blktap's extensions."""

from blktap.image.vhd.create import create, snapshot
from blktap.image.vhd.image import VhdImage

__all__ = ["VhdImage", "create", "snapshot"]
