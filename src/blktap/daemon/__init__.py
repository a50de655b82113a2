"""Processes that serve VBDs: they compose the transports over the disks.

The layers below know nothing of this one: a transport (:mod:`blktap.transport`) knows the
VBD it serves, the VBD (:mod:`blktap.tapdisk`) knows its driver stack. Here they meet:

- :mod:`blktap.daemon.tapdisk`: the tapdisk process, its minors and their exports, and the
  control socket ``tap-ctl`` drives.

(``blktap serve``, :mod:`blktap.cli.serve`, composes a VBD and its listeners the same way
for one disk in the foreground.)
"""
