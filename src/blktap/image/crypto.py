"""Sector encryption as blktap does it: AES-XTS with the "plain" IV, and key hashes.

The scheme (tapdisk's ``libblockcrypto``, dm-crypt's ``aes-xts-plain``):

- a 32-byte key is AES-128-XTS, a 64-byte key AES-256-XTS (XTS splits the key in two
  halves: one encrypts the data, the other the tweak);
- every 512-byte sector is one XTS data unit; its 16-byte IV holds the low 32 bits of the
  sector number, little-endian, and zeros ("plain", not "plain64": sectors 2^32 apart share
  an IV; a VHD is at most 2040 GiB, under 2^32 sectors, so no two sectors of one disk do);
- the sector number is the *virtual* sector of the disk, whichever layer of a chain holds
  it, so ciphertext can move between layers unchanged (coalesce copies it as it is);
- a disk records ``SHA-256(nonce || key)`` (its "key hash") so that a wrong key is refused
  before it turns data into garbage.

Performance: the ``cryptography`` package runs one XTS data unit per cipher context (its
XTS mode takes a single tweak), so each sector costs one context; there is no per-byte work
in Python. Measured numbers are in docs/encryption.md.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os

from blktap.errors import EncryptionError

SECTOR_SIZE = 512
KEY_SIZES = (32, 64)  # bytes: AES-128-XTS, AES-256-XTS
NONCE_SIZE = 32
HASH_SIZE = 32
# The name tapdisk and dm-crypt give the scheme; key files are named after it.
SCHEME = "aes-xts-plain"


def plain_iv(sector: int) -> bytes:
    """The 16-byte IV of a sector: its low 32 bits, little-endian, then zeros."""
    return (sector & 0xFFFFFFFF).to_bytes(16, "little")


def check_key(key: bytes | bytearray | memoryview) -> bytes:
    """Return ``key`` as bytes if it can be an AES-XTS key, else raise EncryptionError."""
    key = bytes(key)
    if len(key) not in KEY_SIZES:
        raise EncryptionError(f"a key is 32 or 64 bytes (AES-128-XTS or AES-256-XTS), "
                              f"not {len(key)}")
    half = len(key) // 2
    if hmac.compare_digest(key[:half], key[half:]):
        # XTS with equal halves loses its security proof; OpenSSL refuses to encrypt with it.
        raise EncryptionError("the two halves of an AES-XTS key must differ")
    return key


class XtsCipher:
    """Encrypts and decrypts whole sectors of one disk with one key."""

    def __init__(self, key: bytes | bytearray | memoryview) -> None:
        key = check_key(key)
        # Imported here: hosts that never open an encrypted image (a Xen dom0 running
        # tapdisk from a plain source tree) need not have the library.
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        self._cipher, self._xts = Cipher, modes.XTS
        # Built once: the key is validated here, not for every sector.
        self._algorithm = algorithms.AES(key)
        self.key_bits = len(key) * 8

    def _run(self, sector: int, src: memoryview, dst: memoryview, encrypt: bool) -> None:
        if len(src) % SECTOR_SIZE or len(dst) != len(src):
            raise EncryptionError("encryption works on whole sectors", errno.EINVAL)
        if sector < 0:
            raise EncryptionError(f"negative sector {sector}", errno.EINVAL)
        algorithm, cipher_class, xts = self._algorithm, self._cipher, self._xts
        # Recent cryptography releases (51 here) refuse an output that overlaps the input, so a
        # sector worked in place goes through a scratch sector. Views of one exporter
        # count as overlapping: memoryviews do not tell where in it they start.
        scratch = bytearray(SECTOR_SIZE) if src.obj is dst.obj else None
        for pos in range(0, len(src), SECTOR_SIZE):
            # One data unit per context is all the library's XTS mode offers.
            cipher = cipher_class(algorithm, xts(plain_iv(sector)))
            ctx = cipher.encryptor() if encrypt else cipher.decryptor()
            if scratch is None:
                ctx.update_into(src[pos : pos + SECTOR_SIZE], dst[pos : pos + SECTOR_SIZE])
            else:
                ctx.update_into(src[pos : pos + SECTOR_SIZE], scratch)
                dst[pos : pos + SECTOR_SIZE] = scratch
            sector += 1

    def encrypt_into(self, sector: int, src: bytes | bytearray | memoryview,
                     dst: bytearray | memoryview) -> None:
        """Encrypt whole sectors starting at virtual sector ``sector`` from ``src`` into
        ``dst`` (the same length). ``dst`` may be ``src`` itself, or a view of exactly the
        same bytes, but not a buffer that overlaps it only in part."""
        self._run(sector, memoryview(src).cast("B"), memoryview(dst).cast("B"), True)

    def decrypt_into(self, sector: int, src: bytes | bytearray | memoryview,
                     dst: bytearray | memoryview) -> None:
        self._run(sector, memoryview(src).cast("B"), memoryview(dst).cast("B"), False)

    def encrypt(self, sector: int, data: bytes | bytearray | memoryview) -> bytearray:
        """A new buffer holding ``data`` encrypted (the caller's buffer is left alone)."""
        out = bytearray(len(memoryview(data).cast("B")))
        self.encrypt_into(sector, data, out)
        return out

    def decrypt(self, sector: int, data: bytes | bytearray | memoryview) -> bytearray:
        out = bytearray(len(memoryview(data).cast("B")))
        self.decrypt_into(sector, data, out)
        return out

    def decrypt_in_place(self, sector: int, buf: bytearray | memoryview) -> None:
        view = memoryview(buf).cast("B")
        self._run(sector, view, view, False)


# ---------------------------------------------------------------------- key hashes
def key_hash(key: bytes | bytearray | memoryview, nonce: bytes = bytes(NONCE_SIZE)) -> bytes:
    """What a disk records about its key: SHA-256 of the 32-byte nonce, then the key."""
    if len(nonce) != NONCE_SIZE:
        raise EncryptionError(f"a key hash nonce is {NONCE_SIZE} bytes, not {len(nonce)}")
    return hashlib.sha256(bytes(nonce) + bytes(key)).digest()


def key_matches(key: bytes | bytearray | memoryview, nonce: bytes, expected: bytes) -> bool:
    return hmac.compare_digest(key_hash(key, nonce), bytes(expected))


# ---------------------------------------------------------------------- key files
# Reading stops here: anything longer is not a key.
MAX_KEY_FILE = 1024


def read_key_bytes(fd: int, what: str = "key") -> bytes:
    """Read a file descriptor to its end (a pipe may deliver a key in pieces), stopping
    past MAX_KEY_FILE bytes; nothing is checked."""
    chunks: list[bytes] = []
    total = 0
    while total <= MAX_KEY_FILE:
        try:
            chunk = os.read(fd, MAX_KEY_FILE + 1 - total)
        except OSError as exc:
            raise EncryptionError(f"{what}: {os.strerror(exc.errno)}", exc.errno) from None
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def read_key_stream(fd: int, what: str = "key") -> bytes:
    """Read a key from a file descriptor to its end, and check that it can be an AES-XTS
    key."""
    key = read_key_bytes(fd, what)
    try:
        return check_key(key)
    except EncryptionError as exc:
        raise EncryptionError(f"{what}: {exc}", exc.errno) from None


def read_key_file(path: str) -> bytes:
    """Read a key file: exactly 32 or 64 bytes of key, nothing else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise EncryptionError(f"{path}: {os.strerror(exc.errno)}", exc.errno) from None
    try:
        return read_key_stream(fd, path)
    finally:
        os.close(fd)


def key_file_name(vhd_path: str, key_bits: int) -> str:
    """The key file name tapdisk's tools expect for a VHD:
    ``<basename up to .vhd>,aes-xts-plain,<256|512>.key``."""
    base = os.path.basename(vhd_path)
    cut = base.find(".vhd")
    if cut >= 0:
        base = base[:cut]
    return f"{base},{SCHEME},{key_bits}.key"
