"""The read caches an open asks for by flag, inserted into a stack once it is open:
the shared block cache (ADD_CACHE) above the leaf's parent, then the local parent cache
(ADD_LCACHE, ``-r``) between the leaf and its parent (so a miss in the leaf may still be
a hit in memory)."""

from __future__ import annotations

from blktap.io.engine import Engine
from blktap.tapdisk.driver import Driver
from blktap.tapdisk.drivers.blockcache import BlockCacheDriver
from blktap.tapdisk.drivers.lcache import LocalCacheDriver


def add_caches(engine: Engine, top: Driver, *, local: bool, shared: bool) -> None:
    if shared:
        BlockCacheDriver.insert(engine, top)
    if local:
        LocalCacheDriver.insert(engine, top)
