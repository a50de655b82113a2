"""tapdisk: one process serving virtual disks through a stack of drivers.

- :mod:`blktap.tapdisk.driver`: the driver protocol (what every layer can be asked);
- :mod:`blktap.tapdisk.drivers`: the image drivers (``aio``, ``vhd``, ``ram``) and the
  registry that builds a stack from ``type:path``;
- :mod:`blktap.tapdisk.vbd`: a virtual block device: request lifecycle, merging, retries,
  timeouts, watchdog and counters.

The tapdisk *process*, which serves these VBDs through the transports, sits above both:
:mod:`blktap.daemon.tapdisk`.
"""
