"""``blktap rated``: rate groups shared by several disks, in the spirit of td-rated.

A daemon holds one token bucket per group (:mod:`.group`) and hands its credit out, over
a UNIX socket (:mod:`.proto`, :mod:`.server`), to the ``valve`` filters of the disks in
the group (:mod:`.client`), in fair shares of what they wait for.
"""
