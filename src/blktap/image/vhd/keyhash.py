"""Where a VHD keeps the hash of its encryption key, and the key check done on opening.

blktap stores ``cookie, nonce, SHA-256(nonce || key)`` in the batmap header (bytes 29..93).
A VHD without a batmap (not made by blktap 1.2 or later) keeps the same 65 bytes in the
extended attribute ``user.com.citrix.xenclient.backend.keyhash``. A cookie of 0 means "not
encrypted".
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from blktap.errors import EncryptionError, FormatError, ReadOnlyImage
from blktap.image.crypto import HASH_SIZE, NONCE_SIZE, XtsCipher, check_key, key_matches
from blktap.image.fileio import pwrite_all
from blktap.image.vhd.image import VhdImage

KEYHASH_XATTR = "user.com.citrix.xenclient.backend.keyhash"
# struct vhd_keyhash: cookie (1 byte), nonce (32), hash (32).
XATTR_SIZE = 1 + NONCE_SIZE + HASH_SIZE


@dataclass(frozen=True)
class KeyHash:
    cookie: int = 0
    nonce: bytes = bytes(NONCE_SIZE)
    hash: bytes = bytes(HASH_SIZE)

    @property
    def present(self) -> bool:
        """The image is encrypted (tapdisk tests the cookie for non-zero)."""
        return self.cookie != 0

    def pack(self) -> bytes:
        return bytes([self.cookie & 0xFF]) + self.nonce + self.hash

    @classmethod
    def unpack(cls, raw: bytes) -> KeyHash:
        raw = raw[:XATTR_SIZE].ljust(XATTR_SIZE, b"\0")
        return cls(raw[0], raw[1 : 1 + NONCE_SIZE], raw[1 + NONCE_SIZE :])


NONE = KeyHash()


def read_keyhash(image: VhdImage) -> KeyHash:
    """The key hash of one VHD, from its batmap header or, without one, its xattr."""
    hdr = image.batmap_header
    if hdr is not None:
        return KeyHash(hdr.keyhash_cookie, hdr.keyhash_nonce, hdr.keyhash_hash)
    try:
        raw = os.getxattr(image.fd, KEYHASH_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return NONE
        raise FormatError(f"{image.path}: cannot read its key hash: "
                          f"{os.strerror(exc.errno)}", exc.errno) from None
    return KeyHash.unpack(raw)


def write_keyhash(image: VhdImage, keyhash: KeyHash) -> None:
    """Record a key hash, durably. In the batmap header it is one 512-byte sector write (the
    map and its checksum are left as they are); otherwise one setxattr. Either is all or
    nothing."""
    if not image.writable:
        raise ReadOnlyImage(f"{image.path} is open read-only")
    hdr = image.batmap_header
    if hdr is not None:
        hdr.keyhash_cookie = keyhash.cookie & 0xFF
        hdr.keyhash_nonce = keyhash.nonce
        hdr.keyhash_hash = keyhash.hash
        pwrite_all(image.fd, hdr.pack(), image.batmap_header_offset())
        os.fsync(image.fd)
        return
    if image.has_batmap_format:
        # A tap 1.2+ VHD whose batmap header is unreadable: the reference would write the
        # hash there; refuse rather than guess.
        raise FormatError(f"{image.path}: its batmap header is damaged; cannot store a "
                          f"key hash", errno.EINVAL)
    try:
        os.setxattr(image.fd, KEYHASH_XATTR, keyhash.pack())
        os.fsync(image.fd)
    except OSError as exc:
        raise FormatError(f"{image.path}: cannot store its key hash: "
                          f"{os.strerror(exc.errno)}", exc.errno) from None


def cipher_for(image: VhdImage, key: bytes | None) -> XtsCipher | None:
    """The check tapdisk makes when it opens a VHD: an encrypted image needs its key, the
    key must match the recorded hash, and a key given for a clear image is a mistake.
    Returns the cipher for the image's data, or None for a clear image."""
    recorded = read_keyhash(image)
    if not recorded.present:
        if key is not None:
            raise EncryptionError(f"{image.path} is not encrypted (it has no key hash), "
                                  f"but a key was given")
        return None
    if key is None:
        raise EncryptionError(f"{image.path} is encrypted: its key is needed to read it")
    key = check_key(key)
    if not key_matches(key, recorded.nonce, recorded.hash):
        raise EncryptionError(f"{image.path}: the key does not match the image's key hash",
                              errno.ENOKEY)
    return XtsCipher(key)


def is_encrypted(image: VhdImage) -> bool:
    return read_keyhash(image).present


