"""Rate limits: the token bucket and the limit specification the ``valve`` filter and
``blktap rated`` share. Pure logic: time comes from the caller (a clock passed in), so
that the arithmetic is tested without waiting.

A limit is written ``key=value`` pairs separated by commas (docs/filters.md)::

    rate=20M,iops=500,burst=4M,iops-burst=50,group=backup

- ``rate``: bytes per second (K, M, G suffixes: powers of 1024); 0 or absent: no limit.
- ``iops``: requests per second; 0 or absent: no limit.
- ``burst``: bytes that may pass at once after an idle spell (the bucket's size);
  default a tenth of a second of ``rate``.
- ``iops-burst``: requests likewise; default a tenth of a second of ``iops``, at least 1.
- ``group``: share the rate of a ``blktap rated`` group: a name (its socket in the
  rate-limit directory) or an absolute socket path.

A bare word without ``=`` is a group (the reference's ``valve:NAME``); the empty text is
"no limit" (a valve that may be limited later, live).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from blktap.errors import UsageError

# The reference's td-rated sockets live in /var/run/blktap/ratelimit/<name>.
DEFAULT_DIR = "/run/blktap/ratelimit"
ENV_DIR = "BLKTAP_RATELIMIT_DIR"
BURST_SECONDS = 0.1  # default bucket size, in seconds of the rate
_SUN_PATH_MAX = 107
EPSILON = 1e-6  # tokens short of a cost by less than this count as enough
_SIZE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def parse_size(text: str, what: str) -> int:
    """A non-negative number of bytes with an optional K/M/G/T suffix (powers of 1024)."""
    match = _SIZE.match(text.strip())
    if not match:
        raise UsageError(f"{what}: {text!r} is not a size (e.g. 20M)")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(match[1]) * scale[match[2].upper()]


def format_size(n: int) -> str:
    for suffix, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n and n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


def rated_dir() -> str:
    return os.environ.get(ENV_DIR) or DEFAULT_DIR


def group_socket(group: str) -> str:
    """The socket of a rate group: an absolute path as it is, a name in the rate-limit
    directory (``$BLKTAP_RATELIMIT_DIR``, default /run/blktap/ratelimit)."""
    if os.path.isabs(group):
        path = group
    elif _NAME.match(group) and group not in (".", ".."):
        path = os.path.join(rated_dir(), group)
    else:
        raise UsageError(f"group {group!r}: use a name (letters, digits, . _ + -) or an "
                         "absolute socket path")
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise UsageError(f"group socket {path!r} is too long for a UNIX socket")
    return path


@dataclass(frozen=True)
class Limits:
    rate: int = 0
    iops: int = 0
    burst: int | None = None
    iops_burst: int | None = None
    group: str | None = None

    @property
    def bytes_capacity(self) -> int:
        if self.burst is not None:
            return self.burst
        return max(1, int(self.rate * BURST_SECONDS))

    @property
    def iops_capacity(self) -> int:
        if self.iops_burst is not None:
            return self.iops_burst
        return max(1, int(self.iops * BURST_SECONDS))

    @property
    def limited(self) -> bool:
        return bool(self.rate or self.iops or self.group)

    @classmethod
    def parse(cls, text: str) -> Limits:
        """The limit written as above; UsageError (EINVAL) for anything else."""
        out = cls()
        text = text.strip()
        if not text:
            return out
        if "=" not in text and "," not in text:
            group_socket(text)
            return replace(out, group=text)
        seen: set[str] = set()
        for item in text.split(","):
            key, sep, value = item.partition("=")
            key = key.strip().lower().replace("_", "-")
            if not sep or not value.strip():
                raise UsageError(f"limit {item!r}: use KEY=VALUE (rate, iops, burst, "
                                 "iops-burst, group)")
            if key in seen:
                raise UsageError(f"limit: {key} given twice")
            seen.add(key)
            value = value.strip()
            if key == "rate":
                out = replace(out, rate=parse_size(value, "rate"))
            elif key == "burst":
                out = replace(out, burst=max(1, parse_size(value, "burst")))
            elif key in ("iops", "iops-burst"):
                if not value.isdigit():
                    raise UsageError(f"{key}: {value!r} is not a whole number")
                n = int(value)
                out = replace(out, iops=n) if key == "iops" else replace(out,
                                                                         iops_burst=max(1, n))
            elif key == "group":
                group_socket(value)
                out = replace(out, group=value)
            else:
                raise UsageError(f"limit: unknown key {key!r} (rate, iops, burst, "
                                 "iops-burst, group)")
        return out

    def text(self) -> str:
        """The canonical spelling (what ``tap-ctl list`` then shows); parse(text()) is
        this limit again."""
        items = []
        if self.rate:
            items.append(f"rate={format_size(self.rate)}")
        if self.iops:
            items.append(f"iops={self.iops}")
        if self.burst is not None:
            items.append(f"burst={format_size(self.burst)}")
        if self.iops_burst is not None:
            items.append(f"iops-burst={self.iops_burst}")
        if self.group:
            items.append(f"group={self.group}")
        return ",".join(items)


class TokenBucket:
    """Tokens (bytes, or requests) flow in at ``rate`` per second up to ``capacity``.

    A cost may pass once the bucket holds ``min(cost, capacity)`` tokens; it then takes
    the whole cost, which may leave the bucket in debt. So a burst of up to ``capacity``
    passes at once, a request larger than the bucket is never starved, and over time no
    more than ``rate`` per second (plus one bucket) passes. ``rate`` 0: no limit.
    """

    __slots__ = ("rate", "capacity", "tokens", "stamp", "clock")

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.rate = float(rate)
        self.capacity = float(max(capacity, 1))
        self.tokens = self.capacity
        self.stamp = clock()

    def refill(self) -> None:
        now = self.clock()
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def delay(self, cost: float) -> float:
        """Seconds until ``cost`` may pass (0: now)."""
        if not self.rate or cost <= 0:
            return 0.0
        self.refill()
        need = min(cost, self.capacity)
        if self.tokens >= need - EPSILON:  # (a clock's rounding must not hold it back)
            return 0.0
        return (need - self.tokens) / self.rate

    def take(self, cost: float) -> None:
        if self.rate and cost > 0:
            self.refill()
            self.tokens -= cost

    def set(self, rate: float, capacity: float) -> None:
        """A new rate and size, from now on: what flowed in so far counts at the old
        rate; the bucket keeps its tokens (or debt), trimmed to the new size."""
        self.refill()
        was_unlimited = not self.rate
        self.rate = float(rate)
        self.capacity = float(max(capacity, 1))
        self.tokens = self.capacity if was_unlimited else min(self.tokens, self.capacity)


__all__ = ["DEFAULT_DIR", "ENV_DIR", "Limits", "TokenBucket", "format_size",
           "group_socket", "parse_size", "rated_dir"]
