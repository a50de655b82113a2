"""vhost-user-blk: serve a VBD to a KVM/QEMU guest's virtio disk, the ring in our process.

- :mod:`~blktap.transport.vhost_user.proto`: vhost-user messages and feature bits;
- :mod:`~blktap.transport.vhost_user.virtio`: split virtqueue and virtio-blk structures;
- :mod:`~blktap.transport.vhost_user.memory`: guest memory regions and address translation;
- :mod:`~blktap.transport.vhost_user.virtqueue`: one split virtqueue (chains, rings, eventfds);
- :mod:`~blktap.transport.vhost_user.inflight`: inflight tracking for reconnects;
- :mod:`~blktap.transport.vhost_user.blk`: virtio-blk requests over the VBD, config space;
- :mod:`~blktap.transport.vhost_user.device`: one front-end's session (message dispatch);
- :mod:`~blktap.transport.vhost_user.server`: the UNIX-socket listener.

See docs/protocols/vhost-user-blk.md.
"""

from blktap.transport.vhost_user.blk import BlkOptions, default_serial
from blktap.transport.vhost_user.server import VhostUserServer

__all__ = ["BlkOptions", "VhostUserServer", "default_serial"]
