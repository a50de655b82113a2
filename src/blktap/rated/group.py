"""One rate group: a token bucket whose credit goes to the members that wait for it.

Pure logic, time from the caller's clock. Each :meth:`Group.distribute` pours what
flowed in since the last call (and any credit members handed back) into fair shares:
every member waiting gets an equal part, capped at what it waits for, and what a member
does not need is shared among the others (water filling). Credit nobody waits for stays
in the bucket up to its capacity (``cap``; 0 = a leaky bucket that keeps nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable


class Group:
    def __init__(self, rate: int, cap: int, clock: Callable[[], float]) -> None:
        if rate <= 0:
            raise ValueError("a group needs a rate")
        self.rate = rate
        self.cap = max(0, cap)
        self.clock = clock
        self.tokens = float(self.cap)
        self.stamp = clock()
        self.need: dict[Hashable, int] = {}
        self.granted: dict[Hashable, int] = {}  # per member, since it joined
        self.returned = 0  # credit handed back, in all

    # ------------------------------------------------------------------ members
    def join(self, member: Hashable) -> None:
        self.need[member] = 0
        self.granted[member] = 0

    def report(self, member: Hashable, need: int, done: int) -> None:
        """A member waits for ``need`` bytes (a level) and hands back ``done``."""
        self._flow()
        self.need[member] = max(0, need)
        if done > 0:
            self.returned += done
            self.tokens += done  # shared out at the next distribution

    def leave(self, member: Hashable) -> None:
        self.need.pop(member, None)
        self.granted.pop(member, None)

    @property
    def waiting(self) -> bool:
        return any(self.need.values())

    # ------------------------------------------------------------------ credit
    def _flow(self) -> None:
        now = self.clock()
        if now > self.stamp:
            self.tokens += (now - self.stamp) * self.rate
        self.stamp = now

    def distribute(self) -> dict[Hashable, int]:
        """The grants to send now (whole bytes), taken from the bucket."""
        self._flow()
        grants: dict[Hashable, int] = {}
        needy = [m for m, n in self.need.items() if n > 0]
        pool = self.tokens
        while needy and pool >= 1:
            share = pool / len(needy)
            still = []
            for member in needy:
                want = self.need[member]
                give = int(min(want, share))
                if give <= 0:
                    continue
                grants[member] = grants.get(member, 0) + give
                self.need[member] = want - give
                self.granted[member] += give
                pool -= give
                if self.need[member] > 0:
                    still.append(member)
            if len(still) == len(needy) and share < 2:
                break  # crumbs: keep them for next time
            needy = still
        self.tokens = pool if self.waiting else min(pool, float(self.cap))
        return grants

    def next_flow(self, least: int = 1) -> float:
        """Seconds until at least ``least`` bytes are in the bucket."""
        missing = least - self.tokens
        return max(0.0, missing / self.rate)
