"""An NBD client: what the ``nbd`` driver (:mod:`blktap.tapdisk.drivers.nbd`) speaks.

- :mod:`~blktap.nbdclient.address`: the server's address (socket path, host:port, URIs);
- :mod:`~blktap.nbdclient.handshake`: connect and negotiate (blocking, in a worker thread);
- :mod:`~blktap.nbdclient.client`: the transmission phase (requests in flight, replies,
  reconnect, timeouts).

Wire constants and structures are the server's (:mod:`blktap.transport.nbd.proto`).
See docs/drivers-nbd.md.
"""

from blktap.nbdclient.address import Address, parse
from blktap.nbdclient.client import NbdClient, Request
from blktap.nbdclient.handshake import Session, negotiate

__all__ = ["Address", "NbdClient", "Request", "Session", "negotiate", "parse"]
