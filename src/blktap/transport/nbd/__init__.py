"""The NBD server: serve one VBD to NBD clients over UNIX sockets and TCP.

- :mod:`~blktap.transport.nbd.proto`: protocol constants and wire structures;
- :mod:`~blktap.transport.nbd.export`: what is served (a VBD under a name);
- :mod:`~blktap.transport.nbd.handshake`: the fixed newstyle negotiation (options);
- :mod:`~blktap.transport.nbd.connection`: the transmission phase (commands);
- :mod:`~blktap.transport.nbd.server`: listeners, connections and shutdown.

See docs/protocols/nbd.md for what is supported and how it maps onto the VBD.
"""

from blktap.transport.nbd.export import Export
from blktap.transport.nbd.server import NbdServer

__all__ = ["Export", "NbdServer"]
