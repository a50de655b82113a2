"""Which parents a chain may open (docs/security.md).

A differencing image names its parent by a path stored in the image. Whoever wrote the
image chose that path, and a guest writes whatever it likes into its disk: an image must
not lead us to a file its writer could not read. Two rules guard that:

- An image whose format was probed is not trusted to name parents (:class:`ProbedParent`,
  raised by the chain opener; naming the format lifts it).
- Operators can confine parents to directories: ``BLKTAP_PARENT_DIRS=/dir1:/dir2`` in the
  environment, or an explicit :class:`ParentPolicy`. A parent is accepted when its real
  path (every symlink resolved) lies inside one of them, so a symlink in an allowed
  directory that points elsewhere is refused. Block devices count by their real node
  (``/dev/VG/LV`` is ``/dev/dm-N``): only a listed ``/dev`` lets them in.

Whatever the confinement, a parent must be a regular file or a block device: a FIFO would
block the open forever, and a character device or a directory is no disk.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from blktap.errors import ParentNotAllowed, UsageError

ENV_PARENT_DIRS = "BLKTAP_PARENT_DIRS"


def _inside(path: str, folder: str) -> bool:
    return folder == "/" or path == folder or path.startswith(folder + "/")


@dataclass(frozen=True)
class ParentPolicy:
    """Where parents may be opened from: ``dirs`` None for anywhere, else real directory
    paths (resolved once, when the policy is made)."""

    dirs: tuple[str, ...] | None = None

    @classmethod
    def confined_to(cls, dirs: Iterable[str]) -> ParentPolicy:
        """Parents only from inside ``dirs`` (relative ones are taken from the current
        folder). At least one directory is needed: an empty list would refuse every
        parent, which is better said with a format prefix."""
        real = []
        for folder in dirs:
            if not folder:
                continue
            if not os.path.isdir(folder):
                raise UsageError(f"allowed parent directory {folder}: not a directory",
                                 errno.ENOTDIR)
            real.append(os.path.realpath(folder))
        if not real:
            raise UsageError("no allowed parent directory given")
        return cls(tuple(real))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ParentPolicy:
        """The policy ``BLKTAP_PARENT_DIRS`` sets: unset or empty, parents come from
        anywhere; else a colon-separated list of directories."""
        value = (os.environ if environ is None else environ).get(ENV_PARENT_DIRS, "")
        if not value.strip(":"):
            return cls()
        try:
            return cls.confined_to(value.split(":"))
        except UsageError as exc:
            raise UsageError(f"{ENV_PARENT_DIRS}: {exc}", exc.errno) from None

    @property
    def confined(self) -> bool:
        return self.dirs is not None

    def allows(self, real: str) -> bool:
        """Whether the real path ``real`` lies inside the allowed directories."""
        return self.dirs is None or any(_inside(real, folder) for folder in self.dirs)

    def check(self, child: str, parent: str) -> str:
        """The real path to open ``parent`` (as ``child`` names it) at, or
        ParentNotAllowed. A parent that does not exist is left to the opener to report."""
        real = os.path.realpath(parent)
        try:
            mode = os.stat(real).st_mode
        except OSError:
            return real
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise ParentNotAllowed(f"{child}: parent {parent} is not a regular file or a "
                                   f"block device", image=child, parent=parent)
        if self.allows(real):
            return real
        shown = parent if real == parent else f"{parent} (really {real})"
        raise ParentNotAllowed(
            f"{child}: parent {shown} lies outside the allowed parent directories "
            f"({':'.join(self.dirs)})", image=child, parent=parent)


def default_policy(policy: ParentPolicy | None) -> ParentPolicy:
    """``policy``, or the environment's when None."""
    return policy if policy is not None else ParentPolicy.from_env()
