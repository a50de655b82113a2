"""vhd-util key: compute, set, check and print the hash of a VHD's encryption key.

Its messages follow the reference step by step: each helper prints what the C function of
the same name prints (prefixed by that name, on stderr), and the command prints its own
summary line after. Exit codes are the reference's: an errno, or 1 for a key file whose name
does not fit the VHD.
"""

from __future__ import annotations

import errno
import hmac
import os

from blktap.cli.vhd_util.common import open_vhd
from blktap.cli.vhd_util.options import Output, getopt
from blktap.errors import BlktapError
from blktap.image import crypto
from blktap.image.vhd.image import VhdImage
from blktap.image.vhd.keyhash import KeyHash, read_keyhash, write_keyhash

USAGE = ("usage:\n"
         "-C -k KEYPATH [-N NONCE]: calculate keyhash for KEYPATH\n"
         "-s -n NAME <-k KEYPATH> | -H HASH> [-N NONCE]: set keyhash for NAME\n"
         "-c -n NAME <-k KEYPATH>: check keyhash for NAME\n"
         "-p -n NAME: print keyhash for NAME\n"
         "-h help\n")

# Key sizes in bits, in the order the reference tries them against a key file's name.
KEY_BITS = (512, 256)
# Without a size from the file name (-C), at most this much is read.
MAX_KEY_BYTES = 64


class Failed(Exception):
    """A step failed; ``err`` is the reference's (negative) return value."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.err = err


def _err(out: Output, func: str, text: str) -> None:
    out.error(f"{func}: {text}\n")


def _hex(out: Output, size: int, text: str) -> bytes:
    # Exactly 2*size digits (the reference lets one digit too many overflow its buffer).
    if len(text) != 2 * size:
        _err(out, "vhd_util_set_hex", "invalid size for hex string")
        raise Failed(-errno.EINVAL)
    try:
        return bytes.fromhex(text)
    except ValueError:
        _err(out, "vhd_util_set_hex", "invalid hex digit")
        raise Failed(-errno.EINVAL) from None


def _key_bits_for(vhd_path: str, keypath: str) -> int | None:
    """512 or 256 when the key file's name is ``<vhd name>,aes-xts-plain,<bits>.key``
    (as a prefix, like the reference's strncmp), else None."""
    key_base = keypath.rsplit("/", 1)[-1]
    for bits in KEY_BITS:
        if key_base.startswith(crypto.key_file_name(vhd_path, bits)):
            return bits
    return None


def _read_key(out: Output, keypath: str, want: int) -> bytes:
    func = "vhd_util_read_key"
    try:
        fd = os.open(keypath, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        _err(out, func, f"failed to open {keypath}: {exc.errno}")
        raise Failed(-exc.errno) from None
    try:
        size = os.fstat(fd).st_size
        key = os.read(fd, want or MAX_KEY_BYTES)
    except OSError as exc:
        _err(out, func, f"failed to read key: {exc.errno}")
        raise Failed(-exc.errno) from None
    finally:
        os.close(fd)
    if len(key) != size:
        _err(out, func, "short read of key")
        raise Failed(-errno.EIO)
    _err(out, func, f"using keyfile {keypath}, Size (bytes) {len(key)}")
    return key


def _calculate(out: Output, keypath: str, want: int, nonce: bytes) -> bytes:
    func = "vhd_util_calculate_keyhash"
    try:
        key = _read_key(out, keypath, want)
    except Failed as exc:
        _err(out, func, f"failed to read key: {exc.err}")
        raise
    if want and len(key) != want:
        _err(out, func, f"incorrect key size: {want} != {len(key)}")
        raise Failed(-errno.EINVAL)
    if len(key) not in crypto.KEY_SIZES:
        # The reference hashes whatever it read; no such key can encrypt a disk.
        _err(out, func, f"incorrect key size: {len(key)} is not 32 or 64")
        raise Failed(-errno.EINVAL)
    return crypto.key_hash(key, nonce)


def _make_keyhash(out: Output, vhd_path: str | None, keypath: str | None,
                  hash_hex: str | None, nonce_hex: str | None) -> KeyHash:
    func = "vhd_util_set_keyhash"
    nonce = bytes(crypto.NONCE_SIZE)
    if nonce_hex is not None:
        nonce = _hex(out, crypto.NONCE_SIZE, nonce_hex)
    if hash_hex is not None:
        return KeyHash(1, nonce, _hex(out, crypto.HASH_SIZE, hash_hex))
    assert keypath is not None
    bits = 0
    if vhd_path is not None:
        found = _key_bits_for(vhd_path, keypath)
        if found is None:
            _err(out, func, f"Invalid key name {keypath}")
            raise Failed(-1)
        bits = found
    try:
        digest = _calculate(out, keypath, bits // 8, nonce)
    except Failed as exc:
        _err(out, func, f"failed to calculate keyhash: {exc.err}")
        raise
    return KeyHash(1, nonce, digest)


def _set_key(out: Output, image: VhdImage, keypath: str | None, hash_hex: str | None,
             nonce_hex: str | None) -> None:
    func = "vhd_util_set_key"
    if image.is_fixed:
        _err(out, func, "can't save key hashes for fixed vhds")
        raise Failed(-errno.EINVAL)
    if image.allocated_blocks():
        # Data already written in clear would read back as garbage once the disk is
        # declared encrypted.
        _err(out, func, "can't save key hashes for non-empty vhds")
        raise Failed(-errno.EINVAL)
    keyhash = _make_keyhash(out, image.path, keypath, hash_hex, nonce_hex)
    try:
        write_keyhash(image, keyhash)
    except (BlktapError, OSError) as exc:
        code = exc.errno or errno.EIO
        _err(out, func, f"failed to set keyhash: {-code}")
        raise Failed(-code) from None


def _read(out: Output, image: VhdImage, func: str | None) -> KeyHash:
    try:
        return read_keyhash(image)
    except BlktapError as exc:
        text = f"failed to read keyhash: {-exc.errno}"
        if func:
            _err(out, func, text)
        else:
            out.error(text + "\n")
        raise Failed(-exc.errno) from None


def _check_key(out: Output, image: VhdImage, keypath: str) -> None:
    func = "vhd_util_check_key"
    recorded = _read(out, image, func)
    if not recorded.cookie:
        _err(out, func, "this vhd has no keyhash")
        raise Failed(-errno.EINVAL)
    bits = _key_bits_for(image.path, keypath)
    if bits is None:
        _err(out, func, f"Invalid key name {keypath}")
        raise Failed(-1)
    try:
        digest = _calculate(out, keypath, bits // 8, recorded.nonce)
    except Failed as exc:
        _err(out, func, f"failed to calculate keyhash: {exc.err}")
        raise
    if not hmac.compare_digest(digest, recorded.hash):
        _err(out, func, "vhd hash doesn't match key hash")
        raise Failed(-errno.EINVAL)


def _usage(out: Output, code: int) -> int:
    # This command prints its usage on stderr.
    out.error(USAGE)
    return code


def run(argv: list[str], out: Output) -> int:
    parsed = getopt("key", argv, "n:k:N:H:scCph", out)
    name = keypath = nonce_hex = hash_hex = None
    do_set = do_check = do_print = do_calc = False
    for opt, val in parsed.opts:
        if opt == "n":
            name = val
        elif opt == "k":
            keypath = val
        elif opt == "N":
            nonce_hex = val
        elif opt == "H":
            hash_hex = val
        elif opt == "s":
            do_set = True
        elif opt == "c":
            do_check = True
        elif opt == "C":
            do_calc = True
        elif opt == "p":
            do_print = True
        elif opt == "h":
            return _usage(out, 0)
        else:
            return _usage(out, errno.EINVAL)
    if parsed.args:
        return _usage(out, errno.EINVAL)

    if do_calc:
        if keypath is None:
            # The reference would open(NULL) and fail with EFAULT.
            return _usage(out, errno.EINVAL)
        try:
            keyhash = _make_keyhash(out, None, keypath, None, nonce_hex)
        except Failed as exc:
            _err(out, "vhd_util_key", f"calculating keyhash failed: {exc.err}")
            return abs(exc.err)
        out.print(keyhash.hash.hex() + "\n")
        return 0

    if not name:
        return _usage(out, errno.EINVAL)
    if do_set:
        if do_check or (keypath is None) == (hash_hex is None):
            return _usage(out, errno.EINVAL)
    elif do_check:
        if keypath is None or nonce_hex is not None or hash_hex is not None:
            return _usage(out, errno.EINVAL)
    elif not do_print:
        return _usage(out, errno.EINVAL)

    try:
        image = open_vhd(name, writable=do_set, allow_disabled=False)
    except BlktapError as exc:
        out.error(f"failed to open {name}: {-exc.errno}\n")
        return exc.errno
    code = 0
    with image:
        if do_set:
            try:
                _set_key(out, image, keypath, hash_hex, nonce_hex)
            except Failed as exc:
                out.error(f"setting key failed: {exc.err}\n")
                code = abs(exc.err)
        elif do_check:
            assert keypath is not None
            try:
                _check_key(out, image, keypath)
            except Failed as exc:
                out.error(f"key check failed: {exc.err}\n")
                code = abs(exc.err)
        if do_print:
            try:
                recorded = _read(out, image, None)
            except Failed as exc:
                # The first failure decides the exit code (the reference lets -p's result
                # overwrite an earlier -s or -c failure).
                return code or abs(exc.err)
            if recorded.cookie != 1:
                out.print("none\n")
            else:
                out.print(f"{recorded.nonce.hex()} {recorded.hash.hex()}\n")
    return code
