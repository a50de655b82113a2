"""``qcow``: one qcow (version 1) layer, read-only (blktap2's ``qcow`` type).

The image library reads qcow version 1 with the qcow2 layer's interface
(:class:`~blktap.image.qcow.image.QcowImage`), so the qcow2 driver serves it unchanged:
reads, block status, the side doors, a backing chain below. Writes are not offered (the
driver has no WRITE capability): the disk is opened read-only whatever the open asked.
"""

from __future__ import annotations

import dataclasses

from blktap.tapdisk.driver import Driver, OpenContext
from blktap.tapdisk.drivers.qcow2 import Qcow2Driver


class QcowDriver(Qcow2Driver):
    name = "qcow"
    # The reference's number for its (since removed) qcow driver (tapdisk-disktype.c).
    type_id = 6

    @classmethod
    def open_layer(cls, ctx: OpenContext, args: str) -> Driver:
        from blktap.tapdisk.drivers.images import open_image_chain
        return open_image_chain(dataclasses.replace(ctx, writable=False), "qcow", args)
