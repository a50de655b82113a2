"""Disk image formats (pure, synchronous, never printing).

- :mod:`blktap.image.vhd`: VHD fixed, dynamic and differencing, with blktap's extensions;
- :mod:`blktap.image.raw`: raw files and block devices;
- :mod:`blktap.image.chain`: a leaf and its parents read as one virtual disk.
"""

from blktap.image.chain import Chain, Extent, open_chain, parse_spec, probe
from blktap.image.raw import RawImage
from blktap.image.vhd import VhdImage

__all__ = ["Chain", "Extent", "RawImage", "VhdImage", "open_chain", "parse_spec", "probe"]
