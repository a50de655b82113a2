"""Image chains as driver stacks: a VHD or qcow2 image and the parents it names.

The library's :class:`~blktap.image.chain.Chain` opens the layers and applies its checks
(probed images naming parents, the parent policy, loops, uuids, depth, keys); here each
layer becomes its driver, bottom first, a raw parent getting ``aio``. This is the
``parent_spec`` walk of docs/drivers.md done by the format's own code: these layers
come back with their parents attached.
"""

from __future__ import annotations

from blktap.image.chain import Chain
from blktap.image.qcow.image import QcowImage
from blktap.image.qcow2.image import Qcow2Image
from blktap.image.raw import RawImage
from blktap.image.rbd import RbdImage
from blktap.tapdisk.driver import Driver, OpenContext
from blktap.tapdisk.drivers.aio import AioDriver
from blktap.tapdisk.drivers.qcow import QcowDriver
from blktap.tapdisk.drivers.qcow2 import Qcow2Driver
from blktap.tapdisk.drivers.vhd import VhdDriver


def open_image_chain(ctx: OpenContext, kind: str, path: str) -> Driver:
    """The stack for ``kind:path`` (``vhd`` or ``qcow2``), leaf on top (blocking)."""
    chain = Chain.open(f"{kind}:{path}", writable=ctx.writable, key=ctx.key,
                       probed=ctx.probed, follow_probed_parents=ctx.follow_probed_parents,
                       parent_policy=ctx.parent_policy)
    below: Driver | None = None
    try:
        for layer, cipher in zip(reversed(chain.layers), reversed(chain.ciphers),
                                 strict=True):
            if isinstance(layer, RbdImage):  # a qcow2 leaf's Ceph backing image
                from blktap.tapdisk.drivers.rbd import RbdDriver

                below = RbdDriver(ctx.engine, layer)
            elif isinstance(layer, RawImage):
                raw_path = layer.path
                layer.close()
                below = AioDriver.open(ctx.engine, raw_path, writable=False,
                                       direct=ctx.direct)
            elif isinstance(layer, QcowImage):
                below = QcowDriver(ctx.engine, layer, below)
            elif isinstance(layer, Qcow2Image):
                below = Qcow2Driver(ctx.engine, layer, below)
            else:
                below = VhdDriver(ctx.engine, layer, below, cipher)
    except BaseException:
        chain.close()
        raise
    assert below is not None
    return below
