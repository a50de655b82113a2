"""vhd-util copy: copy a VHD's content into a new VHD, encrypted with a key when given.

The key comes from a file (``-k``) or from stdin (``-E``), 32 or 64 bytes. The copy holds
the whole disk as the source chain reads it, as a dynamic VHD (see docs/encryption.md for
where this differs from the reference). Messages and exit codes follow the reference.
"""

from __future__ import annotations

import errno
import os
import sys

from blktap.cli.vhd_util.common import open_or_exit
from blktap.cli.vhd_util.options import Output, Usage, getopt
from blktap.errors import BlktapError, EncryptionError
from blktap.image.chain import Chain
from blktap.image.crypto import KEY_SIZES, check_key, read_key_bytes
from blktap.image.vhd.copy import copy_chain
from blktap.image.vhd.keyhash import is_encrypted

USAGE = ("options: -n <name> -N <new VHD name> "
         "[-k <keyfile> | -E (pass encryption key on stdin)] [-h help] \n")


def _read_key(fd: int, out: Output) -> tuple[bytes | None, int]:
    """(key, 0), or (None, exit code) after saying what is wrong with it."""
    try:
        raw = read_key_bytes(fd)
        if len(raw) not in KEY_SIZES:
            out.error("Unsupported keysize, use either 256 bit or 512 bit key\n")
            return None, 1
        return check_key(raw), 0
    except EncryptionError as exc:
        out.error(f"{exc}\n")
        return None, exc.errno


def run(argv: list[str], out: Output) -> int:
    parsed = getopt("copy", argv, "n:N:k:Eh", out)
    name = new_name = None
    key: bytes | None = None
    for opt, val in parsed.opts:
        if opt == "n":
            name = val
        elif opt == "N":
            new_name = val
        elif opt in ("k", "E"):
            # Like the reference, the key is read as soon as its option is seen.
            if key is not None:
                out.error("Only supply -E or -k once\n")
                return 1
            if opt == "k":
                assert val is not None
                try:
                    fd = os.open(val, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    out.print(f"Failed to open key file {val}: {exc.errno}\n")
                    return exc.errno
                try:
                    key, code = _read_key(fd, out)
                finally:
                    os.close(fd)
            else:
                key, code = _read_key(sys.stdin.fileno(), out)
            if key is None:
                return code
        else:  # -h, or an unknown option: the reference exits 22 for both
            raise Usage(errno.EINVAL)
    if not name or not new_name:
        out.error("Must supply both existing and new VHD names\n")
        raise Usage(errno.EINVAL)

    with open_or_exit(name, out) as leaf:
        source_encrypted = is_encrypted(leaf)
    if os.path.lexists(new_name):
        out.print(f"VHD file {new_name} already exists, chose a different name\n")
        return errno.EINVAL
    try:
        # An encrypted source is read with the same key (the reference would copy its
        # ciphertext as if it were data, and encrypt it a second time).
        source = Chain.open(f"vhd:{name}", key=key if source_encrypted else None)
    except BlktapError as exc:
        out.error(f"{exc}\n")
        out.print(f"error opening {name}: {-exc.errno}\n")
        return exc.errno
    with source:
        try:
            copy_chain(source, new_name, key=key)
        except BlktapError as exc:
            out.error(f"{exc}\n")
            out.print(f"error creating {new_name}: {-exc.errno}\n")
            return exc.errno
        except OSError as exc:
            code = exc.errno or errno.EIO
            out.error(f"{new_name}: {os.strerror(code)}\n")
            out.print(f"error creating {new_name}: {-code}\n")
            return code
    return 0
