"""One consistency check for every format, with ``qemu-img check``'s verdicts.

Each image checked gets a :class:`Verdict`: errors that stopped the check (``check
errors``: the file cannot be opened or read), corruptions (metadata that is wrong: data
may be lost or further writes may corrupt it) and leaks (space the file holds that
nothing uses: harmless). The exit code is qemu-img's: 0 clean, 1 check not completed, 2
corruptions, 3 leaks only.

- qcow2: :mod:`blktap.image.qcow2.check` (refcounts, COPIED flags; repairs as qemu-img).
- VHD: the ``vhd-util check`` checker (footers, header, BAT, bitmaps, batmap, parent
  locators); any fault it finds is one corruption. Leaks are the bytes between the end
  of the data and the footer (a writer killed mid-allocation leaves them), counted in
  sectors. Repair (``leaks`` or ``all``) is ``vhd-util repair``, which proves its result
  passes the check before writing anything: it cuts leaked space and puts back a footer
  from its good copy; ``leaks`` only runs it when leaks are all there is.
- raw: no metadata, nothing to check: qemu-img's answer, "This image format does not
  support checks", exit 63 (:data:`NOT_SUPPORTED`).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from blktap.errors import BlktapError, FormatError, UsageError
from blktap.image.parents import ParentPolicy
from blktap.image.qcow2 import check as qcow2_check
from blktap.image.vhd import check as vhd_check
from blktap.image.vhd import repair as vhd_repair
from blktap.image.vhd import structs as s
from blktap.image.vhd.image import VhdImage

REPAIR_MODES = (None, "leaks", "all")
NOT_SUPPORTED = 63  # qemu-img check's exit code for a format without checks (raw)


@dataclass
class Verdict:
    path: str
    format: str
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    leak_unit: str = "clusters"
    messages: list[str] = field(default_factory=list)
    image_end_offset: int | None = None
    total_clusters: int | None = None
    allocated_clusters: int | None = None
    # qcow2's own summary (qemu-img's words); None: built from the counts.
    lines: list[str] | None = None

    @property
    def exit_code(self) -> int:
        return exit_code([self])

    def summary(self) -> list[str]:
        if self.lines is not None:
            return self.lines
        out = []
        if self.corruptions_fixed or self.leaks_fixed:
            out += ["The following inconsistencies were found and repaired:",
                    f"    {self.leaks_fixed} leaked {self.leak_unit}",
                    f"    {self.corruptions_fixed} corruptions", ""]
        if self.check_errors:
            out.append(f"{self.check_errors} internal errors occurred during the check.")
        if self.corruptions:
            out += [f"{self.corruptions} errors were found on the image.",
                    "Data may be corrupted, or further writes to the image may corrupt it."]
        if self.leaks:
            out += [f"{self.leaks} leaked {self.leak_unit} were found on the image.",
                    "This means waste of disk space, but no harm to data."]
        if not (self.corruptions or self.leaks or self.check_errors):
            out.append("No errors were found on the image.")
        if self.image_end_offset is not None:
            out.append(f"Image end offset: {self.image_end_offset}")
        return out

    def as_json(self) -> dict[str, object]:
        """qemu-img's ``--output=json`` fields (those that apply)."""
        out: dict[str, object] = {
            "filename": self.path, "format": self.format, "check-errors": self.check_errors,
        }
        for key, value in (("corruptions", self.corruptions), ("leaks", self.leaks),
                           ("corruptions-fixed", self.corruptions_fixed),
                           ("leaks-fixed", self.leaks_fixed),
                           ("image-end-offset", self.image_end_offset),
                           ("total-clusters", self.total_clusters),
                           ("allocated-clusters", self.allocated_clusters)):
            if value is not None:
                out[key] = value
        out["messages"] = self.messages
        return out


def exit_code(verdicts: list[Verdict]) -> int:
    """qemu-img check's, over every image checked: 1 if any check did not complete, else
    2 if any corruption is left, else 3 if any leak is left, else 0."""
    if any(v.check_errors for v in verdicts):
        return 1
    if any(v.corruptions for v in verdicts):
        return 2
    if any(v.leaks for v in verdicts):
        return 3
    if any(v.format == "raw" for v in verdicts):
        return NOT_SUPPORTED
    return 0


def check_qcow2(path: str, repair: str | None) -> Verdict:
    result = qcow2_check.check(path, repair=repair)
    return Verdict(path, "qcow2", check_errors=result.check_errors,
                   corruptions=result.corruptions, leaks=result.leaks,
                   corruptions_fixed=result.corruptions_fixed, leaks_fixed=result.leaks_fixed,
                   messages=list(result.messages), image_end_offset=result.image_end_offset,
                   total_clusters=result.total_clusters,
                   allocated_clusters=result.allocated_clusters, lines=result.summary())


def check_raw(path: str) -> Verdict:
    verdict = Verdict(path, "raw", lines=["This image format does not support checks "
                                          "(a raw image has no metadata)."])
    try:
        verdict.image_end_offset = os.stat(path).st_size
    except OSError as exc:
        verdict.check_errors = 1
        verdict.messages.append(f"{path}: {os.strerror(exc.errno or errno.EIO)}")
    return verdict


def _vhd_once(path: str, opts: vhd_check.CheckOptions) -> Verdict:
    verdict = Verdict(path, "vhd", leak_unit="sectors")
    try:  # a file that cannot be read cannot be checked
        os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        verdict.check_errors = 1
        verdict.messages.append(f"{path}: {os.strerror(exc.errno or errno.EIO)}")
        return verdict
    result = vhd_check.check_image(path, opts)
    verdict.messages += [f"{path}: {m}" for m in result.messages]
    if not result.ok:
        verdict.corruptions = 1
        if not result.messages:
            verdict.messages.append(f"{path}: invalid VHD ({os.strerror(result.errno)})")
        return verdict
    try:
        with VhdImage.open(path, allow_disabled=True, validate_bat=False) as image:
            end = image.end_of_data()
            verdict.image_end_offset = end + s.FOOTER_SIZE
            if not image.on_device and not image.is_fixed:
                leaked = image.file_size - s.FOOTER_SIZE - end
                if leaked > 0:
                    verdict.leaks = -(-leaked // s.SECTOR_SIZE)
                    verdict.messages.append(f"{path}: {leaked} bytes leaked at offset {end} "
                                            f"(between the data and the footer)")
    except (OSError, BlktapError) as exc:
        verdict.check_errors = 1
        verdict.messages.append(f"{path}: {exc}")
    return verdict


def check_vhd(path: str, repair: str | None) -> Verdict:
    opts = vhd_check.CheckOptions()
    verdict = _vhd_once(path, opts)
    if verdict.check_errors or repair is None:
        return verdict
    if not (verdict.leaks or (repair == "all" and verdict.corruptions)):
        return verdict
    if repair == "leaks" and verdict.corruptions:
        return verdict  # leaks are repaired on an image that is otherwise sound only
    try:
        vhd_repair.repair(path)
    except (OSError, BlktapError) as exc:
        verdict.messages.append(f"{path}: repair failed: {exc}")
        return verdict
    after = _vhd_once(path, opts)
    after.leaks_fixed = max(verdict.leaks - after.leaks, 0)
    after.corruptions_fixed = max(verdict.corruptions - after.corruptions, 0)
    after.messages = verdict.messages + after.messages
    return after


def require_vhd(path: str) -> None:
    """Raise unless ``path`` can be read and looks like a VHD: a footer cookie at its end
    or at its start (a VHD with both footers damaged is beyond checking, as qemu-img
    says of an image it cannot open)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        exc.filename = path
        raise
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        ends = [os.pread(fd, 8, 0)]
        for length in (s.FOOTER_SIZE, s.FOOTER_SIZE - 1):
            if size >= length:
                ends.append(os.pread(fd, 8, size - length))
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None
    finally:
        os.close(fd)
    if s.FOOTER_COOKIE not in ends:
        raise FormatError(f"{path}: not a VHD (no footer at its end or at its start)",
                          errno.EINVAL)


def vhd_parent(path: str) -> str | None:
    """The VHD parent of a differencing VHD (None: none, or a raw one)."""
    with VhdImage.open(path, allow_disabled=True, validate_bat=False) as image:
        if not image.is_differencing or image.parent_is_raw:
            return None
        return image.parent_path()


def check(path: str, fmt: str, *, repair: str | None = None,
          parents: ParentPolicy | None = None) -> list[Verdict]:
    """Check ``path`` (of format ``fmt``); with a ``parents`` policy, a VHD's ancestors
    too (those the policy allows), leaf first. A check that does not complete, or finds
    corruptions, stops the walk there."""
    if repair not in REPAIR_MODES:
        raise UsageError(f"invalid repair mode {repair!r} (leaks or all)")
    # An image that cannot be opened at all raises (OSError, BlktapError): the caller
    # reports it, as qemu-img does, as a check that could not complete.
    if fmt == "qcow2":
        return [check_qcow2(path, repair)]
    if fmt in ("raw", "aio"):
        return [check_raw(path)]
    if fmt != "vhd":
        raise UsageError(f"{path}: cannot check format {fmt!r}")
    require_vhd(path)
    out = [check_vhd(path, repair)]
    seen = {os.path.realpath(path)}
    current = path
    while parents is not None and not (out[-1].check_errors or out[-1].corruptions):
        try:
            parent = vhd_parent(current)
            if parent is None:
                break
            parent = parents.check(current, parent)
        except (OSError, BlktapError) as exc:
            out.append(Verdict(current, "vhd", check_errors=1,
                               messages=[f"{current}: parent: {exc}"]))
            break
        if parent in seen:
            out.append(Verdict(parent, "vhd", corruptions=1,
                               messages=[f"{current}: parent loop through {parent}"]))
            break
        seen.add(parent)
        out.append(check_vhd(parent, repair))
        current = parent
    return out
