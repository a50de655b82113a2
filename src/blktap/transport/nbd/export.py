"""What an NBD server serves: a VBD under a name."""

from __future__ import annotations

from dataclasses import dataclass

from blktap.tapdisk.vbd import VBD


@dataclass
class Export:
    """A VBD served under a name ("" is also accepted: the default export). With
    ``any_name`` every name reaches it, as tapdisk's per-VBD sockets do (the storage
    manager connects with the VDI's uuid as the export name)."""

    name: str
    vbd: VBD
    description: str = ""
    any_name: bool = False

    def matches(self, name: str) -> bool:
        return self.any_name or name in ("", self.name)
