"""The one exception hierarchy of blktap.

Every error the library raises derives from :class:`BlktapError` and carries a positive
``errno`` value. Command-line front-ends turn that value into the exit code, as the C tools
do (they exit with ``-ret``, an errno), and print ``str(exc)`` as the one-line message.

    BlktapError
     ├── ImageError                  a problem with an image file
     │    ├── FormatError            not this format, or corrupt metadata (EINVAL)
     │    │    └── CbtLogError       a changed-block tracking log that cannot be used:
     │    │                          missing (its errno), short (EIO), not a log or for
     │    │                          another disk (EINVAL) (docs/cbt.md)
     │    ├── UnsupportedImage       valid but uses a feature we do not handle (EOPNOTSUPP)
     │    ├── ChainError             a parent chain that cannot be assembled
     │    │    ├── ParentNotFound    a parent named by a child is missing (ENOENT)
     │    │    ├── ParentLoop        a chain that leads back to itself (ELOOP)
     │    │    ├── ChainTooDeep      more layers than the depth limit (ELOOP)
     │    │    └── ParentNotAllowed  a parent we may not open (EACCES: outside the allowed
     │    │         │                directories, or not a regular file or block device)
     │    │         └── ProbedParent a probed image that names a parent (EPERM): its
     │    │                          content may come from a guest (docs/security.md)
     │    ├── ReadOnlyImage          a write to an image opened read-only (EROFS)
     │    ├── OutOfRange             an access past the end of the virtual disk (ERANGE/ENOSPC)
     │    └── EncryptionError        an encrypted image without its key, a wrong key, a key
     │                               for a clear image, a bad key (EINVAL; ENOKEY: wrong key)
     ├── DriverError                 a driver that cannot be used: a plugin that fails
     │                               to load or was written for another driver API
     │                               (ELIBBAD), a driver that declares what it does not
     │                               do or answers out of protocol (EINVAL, EIO)
     ├── UsageError                  a bad argument from a caller (EINVAL)
     ├── ControlProtocolError        a malformed tapdisk control message (EINVAL; EPROTO)
     └── XenStoreError               XenStore said no (its errno: ENOENT, EAGAIN, EACCES...),
                                     or its connection broke (EPIPE, EPROTO)
"""

from __future__ import annotations

import errno as _errno


class BlktapError(Exception):
    """Root of every error blktap raises; ``errno`` is a positive errno value."""

    default_errno = _errno.EIO

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = self.default_errno if errno is None else errno


class ImageError(BlktapError):
    """An image file could not be used."""


class FormatError(ImageError):
    """The file is not in the expected format, or its metadata is corrupt."""

    default_errno = _errno.EINVAL


class CbtLogError(FormatError):
    """A CBT log (cbt-util's file) that cannot be read or used for this disk."""


class UnsupportedImage(ImageError):
    """The image is valid but uses something this implementation does not support."""

    default_errno = _errno.EOPNOTSUPP


class ChainError(ImageError):
    """A parent chain could not be assembled."""

    default_errno = _errno.EINVAL


class ParentNotFound(ChainError):
    default_errno = _errno.ENOENT


class ParentLoop(ChainError):
    default_errno = _errno.ELOOP


class ChainTooDeep(ChainError):
    default_errno = _errno.ELOOP


class ParentNotAllowed(ChainError):
    """A parent the rules do not let us open: its real path lies outside the directories
    parents are confined to (``BLKTAP_PARENT_DIRS``, ``--parent-dir``), or it is neither a
    regular file nor a block device. ``image`` is the child naming it, ``parent`` the
    parent as named."""

    default_errno = _errno.EACCES

    def __init__(self, message: str, errno: int | None = None, *, image: str = "",
                 parent: str = "") -> None:
        super().__init__(message, errno)
        self.image = image
        self.parent = parent


class ProbedParent(ParentNotAllowed):
    """An image whose format was probed (a plain path, no ``vhd:`` prefix) turned out to
    be a differencing VHD. Its parent locators are not followed: a guest that writes a VHD
    at the start of its raw disk would otherwise make us open a host file of its choosing.
    Naming the format (``vhd:PATH``) says the image is a VHD the caller trusts."""

    default_errno = _errno.EPERM


class ReadOnlyImage(ImageError):
    default_errno = _errno.EROFS


class OutOfRange(ImageError):
    default_errno = _errno.ERANGE


class EncryptionError(ImageError):
    """An encrypted image opened without its key or with the wrong one (ENOKEY, as the
    reference's key check), a key given for an image that is not encrypted, or a key that
    cannot be one (EINVAL)."""

    default_errno = _errno.EINVAL


class DriverError(BlktapError):
    """A driver (most often a plugin, docs/drivers.md) broke the driver protocol: it
    could not be loaded (ELIBBAD), was written for another API version (ELIBBAD),
    declares capabilities it does not implement (EINVAL) or answered a request out of
    protocol (a short read, a bad block-status answer: EIO). The message names it."""

    default_errno = _errno.EINVAL


class UsageError(BlktapError):
    """A caller passed an argument that makes no sense."""

    default_errno = _errno.EINVAL


class ControlProtocolError(BlktapError):
    """A tapdisk control message that cannot be read or written: short, of an unknown type,
    with an unterminated or over-long string, or a value out of range. ``errno`` is what an
    ERROR reply carries (EINVAL for a bad message, EPROTO for a broken stream); ``cookie``
    and ``msg_type`` are the request's, when its header could be read, so that a server can
    address its reply."""

    default_errno = _errno.EINVAL

    def __init__(self, message: str, errno: int | None = None, *,
                 cookie: int | None = None, msg_type: int | None = None) -> None:
        super().__init__(message, errno)
        self.cookie = cookie
        self.msg_type = msg_type


class XenStoreError(BlktapError):
    """A XenStore request failed (the daemon's errno) or the connection to it broke."""

    default_errno = _errno.EIO
