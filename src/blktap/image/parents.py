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

A parent on a Ceph cluster (an ``rbd:`` backing file of a qcow2 image, an ``rbd:`` locator
of a VHD) is followed only from the pools the operator lists: ``BLKTAP_PARENT_RBD=POOL,
POOL/NAMESPACE`` (``*``: any pool), or ``ParentPolicy(rbd=...)``. None are by default: one
connection with the host's Ceph key reaches every image of the cluster, so an image must
not choose one unless told it may. Such a parent may name the cluster's configuration
(``conf=``) and the client (``id=``), and no other Ceph option: options such as
``log_file`` or ``admin_socket`` would make the client write host files.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from blktap.errors import FormatError, ParentNotAllowed, UsageError

ENV_PARENT_DIRS = "BLKTAP_PARENT_DIRS"
ENV_PARENT_RBD = "BLKTAP_PARENT_RBD"
# What a parent named by an image may say of its connection beyond pool and image.
RBD_PARENT_KEYS = ("conf", "id")


def _inside(path: str, folder: str) -> bool:
    return folder == "/" or path == folder or path.startswith(folder + "/")


@dataclass(frozen=True)
class ParentPolicy:
    """Where parents may be opened from: ``dirs`` None for anywhere, else real directory
    paths (resolved once, when the policy is made); ``rbd`` the Ceph pools (``POOL``: any
    namespace of it, ``POOL/NS``: that namespace, ``*``: every pool) whose images may be
    parents, none by default."""

    dirs: tuple[str, ...] | None = None
    rbd: tuple[str, ...] = ()

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
        """The policy ``BLKTAP_PARENT_DIRS`` and ``BLKTAP_PARENT_RBD`` set: the first
        unset or empty, parents come from anywhere, else a colon-separated list of
        directories; the second a comma-separated list of pools (unset: none)."""
        env = os.environ if environ is None else environ
        value = env.get(ENV_PARENT_DIRS, "")
        pools = rbd_pools(env.get(ENV_PARENT_RBD, "").split(","), ENV_PARENT_RBD)
        if not value.strip(":"):
            return cls(rbd=pools)
        try:
            return cls(cls.confined_to(value.split(":")).dirs, pools)
        except UsageError as exc:
            raise UsageError(f"{ENV_PARENT_DIRS}: {exc}", exc.errno) from None

    def with_rbd(self, pools: Iterable[str]) -> ParentPolicy:
        """This policy with ``pools`` as the Ceph pools parents may come from."""
        return ParentPolicy(self.dirs, rbd_pools(pools, "--parent-rbd"))

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


    def allows_pool(self, pool: str, namespace: str = "") -> bool:
        return "*" in self.rbd or pool in self.rbd or (
            bool(namespace) and f"{pool}/{namespace}" in self.rbd)

    def check_rbd(self, child: str, parent: str) -> str:
        """``parent`` (an ``rbd:`` spec that ``child`` names) as it may be opened, or
        ParentNotAllowed: its pool must be listed, and it may set no Ceph option but
        ``conf`` and ``id``. A spec that does not parse is the child's damage
        (FormatError)."""
        from blktap.image.rbd import parse_spec  # no Ceph bindings are loaded by this

        try:
            spec = parse_spec(parent)
        except UsageError as exc:
            raise FormatError(f"{child}: parent {parent!r} is no rbd: spec: {exc}",
                              errno.EINVAL) from None
        if spec.options:
            keys = ", ".join(sorted(spec.options))
            raise ParentNotAllowed(
                f"{child}: parent {parent} sets Ceph options ({keys}); a parent named by "
                f"an image may only say {' and '.join(k + '=' for k in RBD_PARENT_KEYS)}",
                image=child, parent=parent)
        if not self.allows_pool(spec.pool, spec.namespace):
            where = f"{spec.pool}/{spec.namespace}" if spec.namespace else spec.pool
            listed = ",".join(self.rbd) if self.rbd else "none"
            raise ParentNotAllowed(
                f"{child}: parent {parent} is on a Ceph cluster, in pool {where}, which is "
                f"not one parents may come from ({ENV_PARENT_RBD} or --parent-rbd: "
                f"{listed})", image=child, parent=parent)
        return parent


def rbd_pools(items: Iterable[str], what: str) -> tuple[str, ...]:
    """Pool names as given (``POOL``, ``POOL/NS`` or ``*``), blanks dropped."""
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        if item != "*" and (item.count("/") > 1 or item.startswith("/")
                            or item.endswith("/")):
            raise UsageError(f"{what}: {item!r} is not POOL, POOL/NAMESPACE or *")
        out.append(item)
    return tuple(out)


def default_policy(policy: ParentPolicy | None) -> ParentPolicy:
    """``policy``, or the environment's when None."""
    return policy if policy is not None else ParentPolicy.from_env()
