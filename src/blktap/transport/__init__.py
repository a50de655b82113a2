"""Transports: protocols that carry block requests to a VBD and its replies back.

- :mod:`blktap.transport.sockio`: non-blocking sockets for the event loop, buffered
  receives into preallocated memory and scatter-gather sends;
- :mod:`blktap.transport.nbd`: the NBD server (fixed newstyle, structured replies,
  block status, TLS).
"""
