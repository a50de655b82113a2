"""Copying a disk into a new dynamic VHD, encrypted with a key when one is given
(``vhd-util copy``).

The content copied is the whole virtual disk as the source chain reads it: every run that
some layer holds is read (decrypted when the source is encrypted), encrypted at its virtual
sector when a key is given, and written at the same place in the new image. Runs no layer
holds stay holes, and read as zeros from the copy too.

The new image is built under a temporary name beside the target and linked into place once
complete: a crash never leaves a half-copied disk under the real name.
"""

from __future__ import annotations

from blktap.image.chain import SECTOR_SIZE, Chain
from blktap.image.crypto import NONCE_SIZE, XtsCipher, key_hash
from blktap.image.fileio import staged_path
from blktap.image.vhd.create import create
from blktap.image.vhd.image import VhdImage
from blktap.image.vhd.keyhash import KeyHash, write_keyhash

# Sectors moved per read/encrypt/write round: 4 MiB, two whole 2 MiB blocks.
CHUNK_SECTORS = 8192


def copy_chain(source: Chain, target: str, *, key: bytes | None = None,
               nonce: bytes = bytes(NONCE_SIZE)) -> int:
    """Copy the disk ``source`` into a new dynamic VHD at ``target`` (which must not
    exist), of the same virtual size rounded up to whole 2 MiB blocks. With ``key`` the
    copy is encrypted and records ``SHA-256(nonce || key)``; the reference leaves the nonce
    all zero, and so does the default here. Returns the number of sectors copied."""
    cipher = XtsCipher(key) if key is not None else None
    extents = [(e.offset // SECTOR_SIZE, -(-e.length // SECTOR_SIZE))
               for e in source.map() if e.depth is not None]
    buf = bytearray(CHUNK_SECTORS * SECTOR_SIZE)
    view = memoryview(buf)
    copied = 0
    with staged_path(target) as tmp:
        create(tmp, source.size)
        with VhdImage.open(tmp, writable=True) as image:
            if key is not None:
                # Recorded before any data: the image is never holding ciphertext without
                # the hash that says so.
                write_keyhash(image, KeyHash(1, bytes(nonce), key_hash(key, nonce)))
            for first, count in extents:
                sector, end = first, first + count
                while sector < end:
                    n = min(end - sector, CHUNK_SECTORS - sector % CHUNK_SECTORS)
                    chunk = view[: n * SECTOR_SIZE]
                    source.readinto(sector, chunk)
                    if cipher is not None:
                        cipher.encrypt_into(sector, chunk, chunk)
                    image.write(sector, chunk)
                    sector += n
                    copied += n
            image.flush()  # durable before it takes the real name
    return copied
