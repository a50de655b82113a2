"""Encrypted VHDs: the AES-XTS-plain cipher, key hashes, reading and writing through a chain
with a key, `vhd-util key` and `vhd-util copy`.

The cipher is held to the IEEE 1619 vectors (through our sector -> IV rule), to an XTS built
here by hand from single AES block operations, and to qemu's own aes-xts-plain (a LUKS
image: qemu encrypts, we decrypt, and the other way round, past sector 2^32).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from blktap.errors import EncryptionError
from blktap.image import Chain
from blktap.image.crypto import XtsCipher, check_key, key_file_name, key_hash, plain_iv
from blktap.image.vhd import VhdImage, create, snapshot
from blktap.image.vhd import check as vhd_check
from blktap.image.vhd.keyhash import KEYHASH_XATTR, KeyHash, read_keyhash, write_keyhash
from conftest import named, need, run, tool
from faults import count_mutations, crash_after, kill_points

MB = 1 << 20
SECTOR = 512
# Keys whose halves differ (XTS refuses equal halves).
KEY64 = bytes(range(64))
KEY32 = bytes(range(100, 132))
OTHER64 = bytes(range(1, 65))

# IEEE 1619-2007, annex B: 512-byte data units over the plaintext 00 01 .. ff 00 01 .. ff.
PT512 = bytes(range(256)) * 2
V4_KEY = bytes.fromhex("27182818284590452353602874713526"
                       "31415926535897932384626433832795")
V4_CT = bytes.fromhex(
    "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c"
    "c78cf7f5e543445f8333d8fa7f56000005279fa5d8b5e4ad40e736ddb4d35412"
    "328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc512c8866c7e860ce"
    "93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad0265"
    "5ea92dc4c4e41a8952c651d33174be51a10c421110e6d81588ede82103a252d8"
    "a750e8768defffed9122810aaeb99f9172af82b604dc4b8e51bcb08235a6f434"
    "1332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f1badd03c"
    "5ccf2a55d705ddcd86d449511ceb7ec30bf12b1fa35b913f9f747a8afd1b130e"
    "94bff94effd01a91735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc"
    "1e08298516e2c9ed03ff3c1b7860f6de76d4cecd94c8119855ef5297ca67e9f3"
    "e7ff72b1e99785ca0a7e7720c5b36dc6d72cac9574c8cbbc2f801e23e56fd344"
    "b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd"
    "74d20cc39881c213ee770b1010e4bea718846977ae119f7a023ab58cca0ad752"
    "afe656bb3c17256a9f6e9bf19fdd5a38fc82bbe872c5539edb609ef4f79c203e"
    "bb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18d"
    "eb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568")
V10_KEY = bytes.fromhex(
    "2718281828459045235360287471352662497757247093699959574966967627"
    "3141592653589793238462643383279502884197169399375105820974944592")
V10_SECTOR = 0xFF
V10_CT = bytes.fromhex(
    "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b"
    "5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd"
    "5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0"
    "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca"
    "2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0"
    "b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f"
    "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec"
    "583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a"
    "84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1"
    "505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae"
    "9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29"
    "a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac"
    "6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f"
    "645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385"
    "1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa"
    "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151")


def xts_by_hand(key: bytes, sector: int, data: bytes, encrypt: bool = True) -> bytes:
    """XTS from single AES block operations: the tweak is E_K2(IV), multiplied by x in
    GF(2^128) (little-endian) from one 16-byte block to the next. The IV is built here
    from the rule: the low 32 bits of the sector, little-endian, padded with zeros."""
    half = len(key) // 2
    k1, k2 = key[:half], key[half:]
    iv = struct.pack("<I", sector % (1 << 32)) + bytes(12)
    tweak = int.from_bytes(Cipher(algorithms.AES(k2), modes.ECB()).encryptor().update(iv),
                           "little")
    block_cipher = Cipher(algorithms.AES(k1), modes.ECB())
    out = bytearray()
    for pos in range(0, len(data), 16):
        t = tweak.to_bytes(16, "little")
        x = bytes(a ^ b for a, b in zip(data[pos : pos + 16], t, strict=True))
        ctx = block_cipher.encryptor() if encrypt else block_cipher.decryptor()
        y = ctx.update(x)
        out += bytes(a ^ b for a, b in zip(y, t, strict=True))
        tweak = ((tweak << 1) ^ (0x87 if tweak >> 127 else 0)) & ((1 << 128) - 1)
    return bytes(out)


def make_encrypted(path: Path, size: int = 8 * MB, key: bytes = KEY64,
                   nonce: bytes = bytes(32)) -> Path:
    create(str(path), size)
    with VhdImage.open(str(path), writable=True) as img:
        write_keyhash(img, KeyHash(1, nonce, key_hash(key, nonce)))
    return path


def vu(*args: str, stdin: bytes | None = None, cwd: Path | None = None
       ) -> subprocess.CompletedProcess:
    proc = run([tool("vhd-util"), *args], input=stdin, cwd=cwd)
    proc.stdout = proc.stdout.decode()
    proc.stderr = proc.stderr.decode()
    return proc


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def disk_sha(path: Path, key: bytes | None) -> str:
    h = hashlib.sha256()
    with Chain.open(f"vhd:{path}", key=key) as chain:
        step = 2048
        for sector in range(0, chain.sectors, step):
            h.update(chain.read(sector, min(step, chain.sectors - sector)))
    return h.hexdigest()


# ================================================================== the cipher
def test_ieee1619_vector4_is_sector_0_aes128() -> None:
    cipher = XtsCipher(V4_KEY)
    assert cipher.key_bits == 256
    assert cipher.encrypt(0, PT512) == V4_CT
    assert cipher.decrypt(0, V4_CT) == PT512


def test_ieee1619_vector10_is_sector_255_aes256() -> None:
    cipher = XtsCipher(V10_KEY)
    assert cipher.key_bits == 512
    assert cipher.encrypt(V10_SECTOR, PT512) == V10_CT
    buf = bytearray(V10_CT)
    cipher.decrypt_in_place(V10_SECTOR, buf)
    assert buf == PT512


def test_plain_iv_keeps_low_32_bits_little_endian() -> None:
    assert plain_iv(0) == bytes(16)
    assert plain_iv(0x01020304) == bytes([4, 3, 2, 1]) + bytes(12)
    assert plain_iv((5 << 32) | 0x0102) == bytes([2, 1, 0, 0]) + bytes(12)


@pytest.mark.parametrize("key", [KEY32, KEY64], ids=["aes128", "aes256"])
def test_runs_match_xts_built_from_aes_blocks(key: bytes) -> None:
    rng = random.Random(len(key))
    cipher = XtsCipher(key)
    for first in (0, 1, 4095, 0xFFFFFFFE, (1 << 32) + 3, (7 << 40) + 12345):
        count = rng.randrange(1, 5)
        data = rng.randbytes(count * SECTOR)
        by_hand = b"".join(xts_by_hand(key, first + i, data[i * SECTOR : (i + 1) * SECTOR])
                           for i in range(count))
        assert cipher.encrypt(first, data) == by_hand
        assert cipher.decrypt(first, by_hand) == data
        assert xts_by_hand(key, first, by_hand[:SECTOR], encrypt=False) == data[:SECTOR]


def test_iv_truncation_past_2_to_the_32() -> None:
    """'plain', not 'plain64': sector 2^32 + 255 encrypts like sector 255 (vector 10),
    and unlike a 64-bit tweak would."""
    cipher = XtsCipher(V10_KEY)
    far = (1 << 32) + V10_SECTOR
    assert cipher.encrypt(far, PT512) == V10_CT
    plain64 = Cipher(algorithms.AES(V10_KEY), modes.XTS(far.to_bytes(16, "little")))
    assert plain64.encryptor().update(PT512) != V10_CT


def test_in_place_and_into_other_buffers_agree() -> None:
    cipher = XtsCipher(KEY64)
    data = random.Random(1).randbytes(8 * SECTOR)
    out = bytearray(len(data))
    cipher.encrypt_into(77, data, out)
    same = bytearray(data)
    cipher.encrypt_into(77, same, same)
    assert out == same == cipher.encrypt(77, memoryview(data))
    cipher.decrypt_in_place(77, memoryview(same)[:])
    assert same == data


@pytest.mark.parametrize("size", [0, 1, 16, 31, 33, 48, 63, 65, 128])
def test_key_of_wrong_length_refused(size: int) -> None:
    with pytest.raises(EncryptionError) as err:
        XtsCipher(bytes(range(size)))
    assert err.value.errno == errno.EINVAL
    assert "32 or 64 bytes" in str(err.value)


def test_key_with_equal_halves_refused() -> None:
    with pytest.raises(EncryptionError, match="halves") as err:
        check_key(bytes(32) + bytes(32))
    assert err.value.errno == errno.EINVAL


def test_partial_sector_refused() -> None:
    with pytest.raises(EncryptionError):
        XtsCipher(KEY64).encrypt(0, bytes(100))


def test_key_hash_is_sha256_of_nonce_then_key() -> None:
    nonce = bytes(range(32, 64))
    h = hashlib.sha256()
    h.update(nonce)
    h.update(KEY64)
    assert key_hash(KEY64, nonce) == h.digest()
    assert key_hash(KEY64) == hashlib.sha256(bytes(32) + KEY64).digest()
    with pytest.raises(EncryptionError):
        key_hash(KEY64, bytes(31))


def test_key_file_name_convention() -> None:
    assert key_file_name("/sr/abc.vhd", 512) == "abc,aes-xts-plain,512.key"
    assert key_file_name("abc.vhd.tmp", 256) == "abc,aes-xts-plain,256.key"
    assert key_file_name("raw-name", 256) == "raw-name,aes-xts-plain,256.key"


# ================================================================== qemu as a peer
def _luks_master_key(path: Path, password: bytes) -> tuple[bytes, int]:
    """Recover the volume key of a LUKS1 image (PBKDF2 unlocks a key slot, AF-merge joins
    its stripes, the header's digest confirms it). Returns (key, payload offset in
    sectors)."""
    hdr = path.read_bytes()[:592] if path.stat().st_size < 4096 else _head(path, 592)
    assert hdr[:6] == b"LUKS\xba\xbe"
    hname = hdr[72:104].rstrip(b"\0").decode()
    payload, key_bytes = struct.unpack(">II", hdr[104:112])
    mk_digest, mk_salt = hdr[112:132], hdr[132:164]
    (mk_iter,) = struct.unpack(">I", hdr[164:168])
    for i in range(8):
        slot = hdr[208 + 48 * i : 256 + 48 * i]
        active, iters = struct.unpack(">II", slot[:8])
        km_off, stripes = struct.unpack(">II", slot[40:48])
        if active != 0x00AC71F3:
            continue
        slot_key = hashlib.pbkdf2_hmac(hname, password, slot[8:40], iters, key_bytes)
        n = key_bytes * stripes
        with open(path, "rb") as f:
            f.seek(km_off * SECTOR)
            material = f.read(-(-n // SECTOR) * SECTOR)
        split = XtsCipher(slot_key).decrypt(0, material)[:n]

        def diffuse(block: bytes) -> bytes:
            return b"".join(
                hashlib.new(hname, struct.pack(">I", j) + block[j * 32 : (j + 1) * 32])
                .digest()[: len(block[j * 32 : (j + 1) * 32])]
                for j in range(-(-len(block) // 32)))

        d = bytes(key_bytes)
        for s in range(stripes - 1):
            stripe = split[s * key_bytes : (s + 1) * key_bytes]
            d = diffuse(bytes(a ^ b for a, b in zip(d, stripe, strict=True)))
        mk = bytes(a ^ b for a, b in zip(d, split[(stripes - 1) * key_bytes :], strict=True))
        if hashlib.pbkdf2_hmac(hname, mk, mk_salt, mk_iter, 20) == mk_digest:
            return mk, payload
    raise AssertionError("no LUKS key slot opened")


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


@pytest.fixture(scope="module")
def luks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, int]:
    """A 3 TiB (sparse) LUKS image whose payload qemu encrypts with aes-128-xts-plain."""
    qemu_img = need("qemu-img")
    path = tmp_path_factory.mktemp("luks") / "disk.luks"
    argv = [qemu_img, "create", "--object", "secret,id=sec0,data=pw", "-f", "luks",
            "-o", "key-secret=sec0,cipher-alg=aes-128,cipher-mode=xts,ivgen-alg=plain,"
            "hash-alg=sha256,iter-time=10", str(path), "3T"]
    # qemu-img times PBKDF2 with the thread's CPU clock, which ticks in jiffies on some
    # kernels: a timing run that falls inside one reads 0 ms and qemu-img gives up
    # ("Unable to get accurate CPU usage"; 14 of 20 attempts here on a loaded machine).
    # A failed attempt costs milliseconds, and another one times it again.
    for _ in range(20):
        proc = run(argv, text=True)
        if proc.returncode == 0 or "accurate CPU usage" not in proc.stderr:
            break
    if proc.returncode != 0:
        pytest.skip(f"qemu-img cannot make a LUKS image here: {proc.stderr.strip()}")
    key, payload = _luks_master_key(path, b"pw")
    return path, key, payload


def _qemu_io(path: Path, *commands: str) -> subprocess.CompletedProcess:
    argv = [need("qemu-io"), "--object", "secret,id=sec0,data=pw", "--image-opts",
            f"driver=luks,key-secret=sec0,file.filename={path}"]
    for command in commands:
        argv += ["-c", command]
    return run(argv, text=True)


FAR = (1 << 32) + 9  # past 2^32: the IV wraps


def test_qemu_encrypts_what_we_decrypt(luks: tuple[Path, bytes, int]) -> None:
    path, key, payload = luks
    proc = _qemu_io(path, f"write -P 0x5a {7 * SECTOR} 1024",
                    f"write -P 0x3c {FAR * SECTOR} 512")
    assert proc.returncode == 0, proc.stderr
    cipher = XtsCipher(key)
    with open(path, "rb") as f:
        f.seek((payload + 7) * SECTOR)
        near = f.read(1024)
        f.seek((payload + FAR) * SECTOR)
        far = f.read(SECTOR)
    assert near != b"\x5a" * 1024
    assert cipher.decrypt(7, near) == b"\x5a" * 1024
    assert cipher.decrypt(FAR, far) == b"\x3c" * SECTOR
    assert cipher.encrypt(FAR, b"\x3c" * SECTOR) == cipher.encrypt(9, b"\x3c" * SECTOR) == far


def test_we_encrypt_what_qemu_decrypts(luks: tuple[Path, bytes, int]) -> None:
    path, key, payload = luks
    cipher = XtsCipher(key)
    with open(path, "r+b") as f:
        for sector, byte in ((100, 0xA7), (FAR + 1, 0x6E)):
            f.seek((payload + sector) * SECTOR)
            f.write(cipher.encrypt(sector, bytes([byte]) * 2 * SECTOR))
    proc = _qemu_io(path, f"read -P 0xa7 {100 * SECTOR} 1024",
                    f"read -P 0x6e {(FAR + 1) * SECTOR} 1024")
    assert proc.returncode == 0 and "verification failed" not in proc.stdout, proc.stdout


# ================================================================== library: Chain
def test_chain_reads_and_writes_through_the_key(tmp_path: Path) -> None:
    img = make_encrypted(tmp_path / "e.vhd")
    rng = random.Random(7)
    data = rng.randbytes(3 * SECTOR)
    with Chain.open(f"vhd:{img}", key=KEY64, writable=True) as chain:
        chain.write(4096 + 8, data)  # block 1, sectors 8..10
        chain.pwrite(100, b"unaligned")  # read-modify-write of sector 0
    with Chain.open(named(img), key=KEY64) as chain:
        assert chain.read(4096 + 8, 3) == data
        assert chain.pread(100, 9) == b"unaligned"
        assert chain.pread(0, 100) == bytes(100)
    # On disk: the ciphertext of each sector at its *virtual* sector number.
    with VhdImage.open(str(img)) as raw:
        ((first, n, off),) = list(raw.extents(4096 + 8, 3))
    stored = _head(img, off + 3 * SECTOR)[off:]
    assert stored != data
    assert stored == XtsCipher(KEY64).encrypt(4096 + 8, data)
    assert vhd_check.check(str(img)).results[0].ok


def test_holes_and_unwritten_sectors_read_as_zeros(tmp_path: Path) -> None:
    img = make_encrypted(tmp_path / "h.vhd", key=KEY32)
    with Chain.open(named(img), key=KEY32, writable=True) as chain:
        chain.write(10, b"\xee" * SECTOR)
    with Chain.open(named(img), key=KEY32) as chain:
        block = chain.read(0, 4096)
        assert block[10 * SECTOR : 11 * SECTOR] == b"\xee" * SECTOR
        assert block.count(0) == len(block) - SECTOR  # the rest of the block: zeros
        assert chain.read(4096, 8192) == bytes(8192 * SECTOR)  # unallocated blocks


@pytest.mark.parametrize("case", ["no key", "wrong key", "key for clear image",
                                  "short key", "equal halves", "raw image"])
def test_chain_open_refuses(tmp_path: Path, case: str) -> None:
    enc = make_encrypted(tmp_path / "e.vhd")
    clear = tmp_path / "c.vhd"
    create(str(clear), 4 * MB)
    raw = tmp_path / "r.img"
    raw.write_bytes(bytes(MB))
    spec, key, code = {
        "no key": (f"vhd:{enc}", None, errno.EINVAL),
        "wrong key": (f"vhd:{enc}", OTHER64, errno.ENOKEY),
        "key for clear image": (f"vhd:{clear}", KEY64, errno.EINVAL),
        "short key": (f"vhd:{enc}", KEY64[:40], errno.EINVAL),
        "equal halves": (f"vhd:{enc}", bytes(64), errno.EINVAL),
        "raw image": (f"raw:{raw}", KEY64, errno.EINVAL),
    }[case]
    before = {p: digest(p) for p in (enc, clear, raw)}
    with pytest.raises(EncryptionError) as err:
        Chain.open(spec, key=key, writable=True)
    assert err.value.errno == code
    assert str(err.value).count("\n") == 0
    assert {p: digest(p) for p in (enc, clear, raw)} == before


def test_ciphertext_mode_serves_stored_bytes(tmp_path: Path) -> None:
    img = make_encrypted(tmp_path / "e.vhd")
    with Chain.open(named(img), key=KEY64, writable=True) as chain:
        chain.write(0, b"\x11" * SECTOR)
    with Chain.open(named(img), ciphertext=True) as chain:
        assert chain.read(0, 1) == XtsCipher(KEY64).encrypt(0, b"\x11" * SECTOR)
        assert len(chain) == 1


def test_snapshot_inherits_keyhash_and_reads_through_chain(tmp_path: Path) -> None:
    nonce = bytes(range(32))
    base = make_encrypted(tmp_path / "base.vhd", nonce=nonce)
    with Chain.open(named(base), key=KEY64, writable=True) as chain:
        chain.write(0, b"\x01" * 8 * SECTOR)
        chain.write(4096, b"\x02" * 8 * SECTOR)
    child = tmp_path / "child.vhd"
    snapshot(str(child), str(base))
    with VhdImage.open(str(child)) as c, VhdImage.open(str(base)) as b:
        assert read_keyhash(c) == read_keyhash(b) == KeyHash(1, nonce, key_hash(KEY64, nonce))
    with Chain.open(named(child), key=KEY64, writable=True) as chain:
        assert chain.read(0, 8) == b"\x01" * 8 * SECTOR  # from the parent, decrypted
        chain.write(4, b"\x03" * 2 * SECTOR)
    with Chain.open(named(child), key=KEY64) as chain:
        assert chain.read(0, 8) == b"\x01" * 4 * SECTOR + b"\x03" * 2 * SECTOR + \
            b"\x01" * 2 * SECTOR
        assert chain.read(4096, 8) == b"\x02" * 8 * SECTOR
        assert chain.read(8192, 16) == bytes(16 * SECTOR)
    with pytest.raises(EncryptionError):
        Chain.open(named(child))
    assert vu("snapshot", "-n", str(tmp_path / "c2.vhd"), "-p", str(child), "-l", "10"
              ).returncode == 0  # the depth check needs no key


def _qemu_vhd(path: Path, size: str = "8M") -> None:
    proc = run([need("qemu-img"), "create", "-f", "vpc", "-o", "subformat=dynamic",
                str(path), size], text=True)
    assert proc.returncode == 0, proc.stderr


def test_vhd_without_batmap_keeps_keyhash_in_xattr(tmp_path: Path) -> None:
    """A VHD made by another tool has no batmap: the hash lives in an xattr, the key
    opens it, and a snapshot inherits the hash into its batmap."""
    base = tmp_path / "q.vhd"
    _qemu_vhd(base)
    with VhdImage.open(str(base), writable=True) as img:
        assert img.batmap_header is None
        try:
            write_keyhash(img, KeyHash(1, bytes(32), key_hash(KEY32)))
        except Exception as exc:  # noqa: BLE001 - a file system without user xattrs
            if getattr(exc, "errno", None) in (errno.ENOTSUP, errno.EPERM):
                pytest.skip("no user xattrs here")
            raise
    assert os.getxattr(base, KEYHASH_XATTR) == b"\x01" + bytes(32) + key_hash(KEY32)
    with Chain.open(named(base), key=KEY32, writable=True) as chain:
        chain.write(40, b"\x77" * SECTOR)
    child = tmp_path / "qc.vhd"
    snapshot(str(child), str(base))
    with VhdImage.open(str(child)) as c:
        assert c.batmap_header is not None
        assert read_keyhash(c) == KeyHash(1, bytes(32), key_hash(KEY32))
    with Chain.open(named(child), key=KEY32) as chain:
        assert chain.read(40, 1) == b"\x77" * SECTOR
    assert vu("key", "-p", "-n", str(base)).stdout == f"{'00' * 32} {key_hash(KEY32).hex()}\n"


def test_fixed_vhd_with_xattr_keyhash(tmp_path: Path) -> None:
    img = tmp_path / "f.vhd"
    create(str(img), 4 * MB, fixed=True)
    with VhdImage.open(str(img), writable=True) as v:
        try:
            write_keyhash(v, KeyHash(1, bytes(32), key_hash(KEY64)))
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "errno", None) in (errno.ENOTSUP, errno.EPERM):
                pytest.skip("no user xattrs here")
            raise
    with Chain.open(named(img), key=KEY64, writable=True) as chain:
        chain.write(3, b"\x42" * SECTOR)
    assert _head(img, 4 * SECTOR)[3 * SECTOR :] == XtsCipher(KEY64).encrypt(3, b"\x42" * 512)
    with Chain.open(named(img), key=KEY64) as chain:
        assert chain.read(3, 1) == b"\x42" * SECTOR


def test_ciphertext_moved_between_layers_stays_decryptable(tmp_path: Path) -> None:
    """The IV is the virtual sector: a child's block copied byte for byte into its parent
    (coalesce does this, with copy_file_range) decrypts there, although it sits at another
    file offset; the same bytes at another virtual offset do not."""
    base = make_encrypted(tmp_path / "base.vhd")
    with Chain.open(named(base), key=KEY64, writable=True) as chain:
        chain.write(0, b"\x10" * 4096 * SECTOR)  # block 0 of the parent first
    child = tmp_path / "child.vhd"
    snapshot(str(child), str(base))
    payload = random.Random(3).randbytes(16 * SECTOR)
    with Chain.open(named(child), key=KEY64, writable=True) as chain:
        chain.write(4096 + 32, payload)  # block 1, sectors 32..47
    with VhdImage.open(str(child)) as c, VhdImage.open(str(base), writable=True) as b:
        bitmap = c.bitmap(1)
        child_data = (c.bat[1] + c.bitmap_secs) * SECTOR
        b.merge_block(1, bitmap, c.fd, child_data)
        parent_data = (b.bat[1] + b.bitmap_secs) * SECTOR
        assert parent_data != child_data
        b.merge_block(2, bitmap, c.fd, child_data)  # the same bytes one block further
    with Chain.open(named(base), key=KEY64) as chain:
        assert chain.read(4096 + 32, 16) == payload
        moved = chain.read(2 * 4096 + 32, 16)
        assert moved != payload and len(moved) == len(payload)
        assert chain.read(0, 1) == b"\x10" * SECTOR
    assert vhd_check.check(str(base)).results[0].ok


def test_writes_killed_at_every_point_leave_a_valid_decryptable_image(tmp_path: Path) -> None:
    img = make_encrypted(tmp_path / "w.vhd")
    pristine = img.read_bytes()
    writes = [(0, b"\x01" * 4 * SECTOR), (4096 + 5, b"\x02" * SECTOR),
              (2 * 4096, b"\x03" * 4096 * SECTOR), (7, b"\x04" * SECTOR)]

    def workload() -> None:
        with Chain.open(named(img), key=KEY64, writable=True) as chain:
            for sector, data in writes:
                chain.write(sector, data)

    total = count_mutations(workload)
    assert total > len(writes)
    for n in kill_points(total, 40):
        img.write_bytes(pristine)
        finished = crash_after(workload, n)
        assert vhd_check.check(str(img)).results[0].ok, n
        with Chain.open(named(img), key=KEY64) as chain:
            for sector, data in writes:
                got = chain.read(sector, len(data) // SECTOR)
                if finished:
                    assert got == data, n
                else:  # each sector is old (zeros) or new, never garbage
                    for i in range(0, len(data), SECTOR):
                        assert got[i : i + SECTOR] in (data[i : i + SECTOR],
                                                       bytes(SECTOR)), (n, sector)


# ================================================================== vhd-util key
def _key_file(folder: Path, vhd: Path, key: bytes) -> Path:
    path = folder / key_file_name(str(vhd), len(key) * 8)
    path.write_bytes(key)
    return path


def test_key_calculate(tmp_path: Path) -> None:
    kf = tmp_path / "any.key"
    kf.write_bytes(KEY64)
    proc = vu("key", "-C", "-k", str(kf))
    assert (proc.returncode, proc.stdout) == (0, key_hash(KEY64).hex() + "\n")
    assert proc.stderr == f"vhd_util_read_key: using keyfile {kf}, Size (bytes) 64\n"
    nonce = bytes(range(200, 232))
    proc = vu("key", "-C", "-k", str(kf), "-N", nonce.hex().upper())
    assert proc.stdout == hashlib.sha256(nonce + KEY64).hexdigest() + "\n"


def test_key_set_check_print(tmp_path: Path) -> None:
    img = tmp_path / "disk.vhd"
    create(str(img), 8 * MB)
    assert vu("key", "-p", "-n", str(img)).stdout == "none\n"
    kf = _key_file(tmp_path, img, KEY32)
    assert kf.name == "disk,aes-xts-plain,256.key"
    nonce = bytes(range(32))
    proc = vu("key", "-s", "-n", str(img), "-k", str(kf), "-N", nonce.hex(), "-p")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{nonce.hex()} {key_hash(KEY32, nonce).hex()}\n"
    proc = vu("key", "-c", "-n", str(img), "-k", str(kf))
    assert (proc.returncode, proc.stdout) == (0, "")
    assert proc.stderr == f"vhd_util_read_key: using keyfile {kf}, Size (bytes) 32\n"
    with Chain.open(named(img), key=KEY32, writable=True) as chain:  # the library agrees
        chain.write(0, bytes(SECTOR))
    assert vu("check", "-n", str(img)).stdout == f"{img} is valid\n"
    # A different key under the right name.
    other = tmp_path / "o"
    other.mkdir()
    kf2 = _key_file(other, img, OTHER64[:32])
    proc = vu("key", "-c", "-n", str(img), "-k", str(kf2))
    assert proc.returncode == 22
    assert proc.stderr.endswith("vhd_util_check_key: vhd hash doesn't match key hash\n"
                                "key check failed: -22\n")


def test_key_set_hash_as_sm_does(tmp_path: Path) -> None:
    img = tmp_path / "v.vhd"
    create(str(img), 4 * MB)
    h = key_hash(KEY64).hex()
    proc = vu("key", "-s", "-n", str(img), "-H", h)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert vu("key", "-p", "-n", str(img)).stdout == f"{'0' * 64} {h}\n"
    with VhdImage.open(str(img)) as v:  # one sector written: the batmap stays valid
        assert v.batmap_valid
    child = tmp_path / "c.vhd"
    assert vu("snapshot", "-n", str(child), "-p", str(img)).returncode == 0
    assert vu("key", "-p", "-n", str(child)).stdout == f"{'0' * 64} {h}\n"


@pytest.mark.parametrize("argv,code", [
    ([], 22), (["-h"], 0), (["-p"], 22), (["-s", "-n", "X"], 22),
    (["-s", "-c", "-n", "X", "-k", "K"], 22), (["-s", "-n", "X", "-k", "K", "-H", "00"], 22),
    (["-c", "-n", "X"], 22), (["-c", "-n", "X", "-k", "K", "-N", "00"], 22),
    (["-n", "X"], 22), (["-p", "-n", "X", "extra"], 22), (["-C"], 22), (["-z"], 22)])
def test_key_usage(argv: list[str], code: int) -> None:
    proc = vu("key", *argv)
    assert proc.returncode == code
    assert proc.stdout == ""
    assert proc.stderr.endswith("usage:\n-C -k KEYPATH [-N NONCE]: calculate keyhash for "
                                "KEYPATH\n-s -n NAME <-k KEYPATH> | -H HASH> [-N NONCE]: set "
                                "keyhash for NAME\n-c -n NAME <-k KEYPATH>: check keyhash for "
                                "NAME\n-p -n NAME: print keyhash for NAME\n-h help\n")


def test_key_bad_input(tmp_path: Path) -> None:
    img = tmp_path / "d.vhd"
    create(str(img), 4 * MB)
    before = digest(img)
    good = _key_file(tmp_path, img, KEY64)
    # A key file whose name does not fit the VHD.
    wrong = tmp_path / "other,aes-xts-plain,512.key"
    wrong.write_bytes(KEY64)
    proc = vu("key", "-s", "-n", str(img), "-k", str(wrong))
    assert proc.returncode == 1
    assert proc.stderr == f"vhd_util_set_keyhash: Invalid key name {wrong}\n" \
                          "setting key failed: -1\n"
    # Missing key file (named right).
    (tmp_path / "g").mkdir()
    missing = tmp_path / "g" / good.name
    proc = vu("key", "-s", "-n", str(img), "-k", str(missing))
    assert proc.returncode == 2
    assert proc.stderr == (
        f"vhd_util_read_key: failed to open {missing}: 2\n"
        "vhd_util_calculate_keyhash: failed to read key: -2\n"
        "vhd_util_set_keyhash: failed to calculate keyhash: -2\n"
        "setting key failed: -2\n")
    # A 32-byte key under a 512-bit name; a 65-byte file.
    good.write_bytes(KEY32)
    proc = vu("key", "-s", "-n", str(img), "-k", str(good))
    assert proc.returncode == 22
    assert "vhd_util_calculate_keyhash: incorrect key size: 64 != 32\n" in proc.stderr
    good.write_bytes(KEY64 + b"x")
    proc = vu("key", "-s", "-n", str(img), "-k", str(good))
    assert proc.returncode == 5
    assert "vhd_util_read_key: short read of key\n" in proc.stderr
    # Bad hex for -H and -N.
    for args, msg in ((["-H", "zz" * 32], "invalid hex digit"),
                      (["-H", "ab" * 31], "invalid size for hex string"),
                      (["-H", "ab" * 32 + "a"], "invalid size for hex string"),
                      (["-H", "ab" * 32, "-N", "0g" * 32], "invalid hex digit")):
        proc = vu("key", "-s", "-n", str(img), *args)
        assert proc.returncode == 22
        assert proc.stderr == f"vhd_util_set_hex: {msg}\nsetting key failed: -22\n"
    proc = vu("key", "-C", "-k", str(wrong), "-N", "123")
    assert proc.returncode == 22
    assert proc.stderr == ("vhd_util_set_hex: invalid size for hex string\n"
                           "vhd_util_key: calculating keyhash failed: -22\n")
    # -C with a key that cannot be one.
    short = tmp_path / "short.key"
    short.write_bytes(b"0123456789")
    proc = vu("key", "-C", "-k", str(short))
    assert proc.returncode == 22 and proc.stdout == ""
    assert "incorrect key size: 10 is not 32 or 64" in proc.stderr
    assert digest(img) == before
    # Not a VHD, missing VHD.
    proc = vu("key", "-p", "-n", str(tmp_path / "nope.vhd"))
    assert (proc.returncode, proc.stderr) == (2, f"failed to open {tmp_path}/nope.vhd: -2\n")
    proc = vu("key", "-p", "-n", str(short))  # shorter than a footer: EIO, as the reference
    assert (proc.returncode, proc.stderr) == (5, f"failed to open {short}: -5\n")
    junk = tmp_path / "junk.vhd"
    junk.write_bytes(b"\x01" * 4096)
    assert vu("key", "-p", "-n", str(junk)).returncode == 22
    # Checking a clear VHD.
    good.write_bytes(KEY64)
    proc = vu("key", "-c", "-n", str(img), "-k", str(good))
    assert (proc.returncode, proc.stderr) == (
        22, "vhd_util_check_key: this vhd has no keyhash\nkey check failed: -22\n")


def test_key_set_refuses_fixed_and_non_empty(tmp_path: Path) -> None:
    fixed = tmp_path / "f.vhd"
    create(str(fixed), 4 * MB, fixed=True)
    used = tmp_path / "u.vhd"
    create(str(used), 4 * MB)
    with Chain.open(named(used), writable=True) as chain:
        chain.write(0, b"clear".ljust(SECTOR, b"\0"))
    for img, msg in ((fixed, "can't save key hashes for fixed vhds"),
                     (used, "can't save key hashes for non-empty vhds")):
        before = digest(img)
        proc = vu("key", "-s", "-n", str(img), "-H", "ab" * 32)
        assert proc.returncode == 22
        assert proc.stderr == f"vhd_util_set_key: {msg}\nsetting key failed: -22\n"
        assert digest(img) == before


def test_key_set_killed_at_every_point(tmp_path: Path) -> None:
    img = tmp_path / "k.vhd"
    create(str(img), 4 * MB)
    pristine = img.read_bytes()
    wanted = KeyHash(1, bytes(range(32)), key_hash(KEY64, bytes(range(32))))

    def set_it() -> None:
        with VhdImage.open(str(img), writable=True) as v:
            write_keyhash(v, wanted)

    total = count_mutations(set_it)
    assert total == 1  # one sector: all or nothing
    for n in range(total + 1):
        img.write_bytes(pristine)
        finished = crash_after(set_it, n)
        assert vhd_check.check(str(img)).results[0].ok
        with VhdImage.open(str(img)) as v:
            assert read_keyhash(v) == (wanted if finished else KeyHash())


# ================================================================== vhd-util copy
def test_copy_chain_from_stdin_key_reads_back_with_key(reference_dir: Path,
                                                       tmp_path: Path) -> None:
    new = tmp_path / "enc.vhd"
    proc = vu("copy", "-n", str(reference_dir / "snap2.vhd"), "-N", str(new), "-E",
              stdin=KEY64)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    want = (reference_dir / "expect" / "snap2.sha256").read_text().split()[0]
    assert disk_sha(new, KEY64) == want
    assert vu("key", "-p", "-n", str(new)).stdout == f"{'0' * 64} {key_hash(KEY64).hex()}\n"
    assert vu("check", "-n", str(new)).stdout == f"{new} is valid\n"
    with pytest.raises(EncryptionError):
        Chain.open(named(new))
    # Stored data is not the plaintext.
    with Chain.open(named(new), ciphertext=True) as raw, \
            Chain.open(f"vhd:{reference_dir / 'snap2.vhd'}") as src:
        assert raw.read(0, 128) != src.read(0, 128)


def test_copy_with_key_file_and_without_key(reference_dir: Path, tmp_path: Path) -> None:
    kf = tmp_path / "k"
    kf.write_bytes(KEY32)
    enc, clear = tmp_path / "e.vhd", tmp_path / "c.vhd"
    src = reference_dir / "data.vhd"
    assert vu("copy", "-n", str(src), "-N", str(enc), "-k", str(kf)).returncode == 0
    assert vu("copy", "-n", str(src), "-N", str(clear)).returncode == 0
    want = (reference_dir / "expect" / "data.sha256").read_text().split()[0]
    assert disk_sha(enc, KEY32) == disk_sha(clear, None) == want
    assert vu("key", "-p", "-n", str(clear)).stdout == "none\n"
    # The same runs are allocated as in the source.
    with Chain.open(f"vhd:{src}") as a, Chain.open(named(enc), key=KEY32) as b:
        assert [(e.offset, e.length) for e in a.map() if e.depth is not None] == \
            [(e.offset, e.length) for e in b.map() if e.depth is not None]


def test_copy_of_an_encrypted_source(tmp_path: Path) -> None:
    src = make_encrypted(tmp_path / "s.vhd")
    with Chain.open(named(src), key=KEY64, writable=True) as chain:
        chain.write(100, b"\x99" * SECTOR)
    new = tmp_path / "n.vhd"
    assert vu("copy", "-n", str(src), "-N", str(new), "-E", stdin=KEY64).returncode == 0
    with Chain.open(named(new), key=KEY64) as chain:
        assert chain.read(100, 1) == b"\x99" * SECTOR
    for stdin, code in ((None, errno.EINVAL), (OTHER64, errno.ENOKEY)):
        other = tmp_path / f"x{code}.vhd"
        args = ["copy", "-n", str(src), "-N", str(other)] + (["-E"] if stdin else [])
        proc = vu(*args, stdin=stdin)
        assert proc.returncode == code
        assert proc.stdout == f"error opening {src}: {-code}\n"
        assert not other.exists()


def test_copy_bad_input(tmp_path: Path) -> None:
    src = tmp_path / "s.vhd"
    create(str(src), 4 * MB)
    existing = tmp_path / "e.vhd"
    existing.write_bytes(b"keep me")
    kf = tmp_path / "k"
    kf.write_bytes(KEY64)
    usage = ("options: -n <name> -N <new VHD name> [-k <keyfile> | -E (pass encryption key "
             "on stdin)] [-h help] \n")
    proc = vu("copy", "-n", str(src), "-N", str(existing), "-k", str(kf))
    assert (proc.returncode, proc.stdout) == (
        22, f"VHD file {existing} already exists, chose a different name\n")
    assert existing.read_bytes() == b"keep me"
    proc = vu("copy", "-n", str(tmp_path / "no.vhd"), "-N", str(tmp_path / "x.vhd"))
    assert (proc.returncode, proc.stdout) == (2, f"error opening {tmp_path}/no.vhd: -2\n")
    proc = vu("copy", "-n", str(src), "-N", str(tmp_path / "x.vhd"), "-k", str(tmp_path / "nk"))
    assert (proc.returncode, proc.stdout) == (2, f"Failed to open key file {tmp_path}/nk: 2\n")
    for bad in (b"", b"x" * 16, KEY64 + b"!", b"y" * 2000):
        proc = vu("copy", "-n", str(src), "-N", str(tmp_path / "x.vhd"), "-E", stdin=bad)
        assert (proc.returncode, proc.stderr) == (
            1, "Unsupported keysize, use either 256 bit or 512 bit key\n")
    proc = vu("copy", "-n", str(src), "-N", str(tmp_path / "x.vhd"), "-E", stdin=bytes(64))
    assert proc.returncode == 22 and "halves" in proc.stderr
    proc = vu("copy", "-n", str(src), "-N", str(tmp_path / "x.vhd"), "-k", str(kf), "-E",
              stdin=KEY64)
    assert (proc.returncode, proc.stderr) == (1, "Only supply -E or -k once\n")
    proc = vu("copy", "-n", str(src))
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        22, usage, "Must supply both existing and new VHD names\n")
    proc = vu("copy", "-h")
    assert (proc.returncode, proc.stdout) == (22, usage)
    proc = vu("copy", "-n", str(src), "-N", str(tmp_path / "nodir" / "x.vhd"))
    assert proc.returncode == 2
    assert proc.stdout == f"error creating {tmp_path}/nodir/x.vhd: -2\n"
    assert not (tmp_path / "x.vhd").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.vhd", "k", "s.vhd"]


def test_copy_to_unwritable_folder(tmp_path: Path) -> None:
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run as another user")
    import tempfile
    shared = Path(tempfile.mkdtemp(prefix="blktap-test-", dir="/tmp"))
    try:
        src = shared / "s.vhd"
        create(str(src), 4 * MB)
        os.chmod(src, 0o444)
        os.chmod(shared, 0o755)
        proc = run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                    tool("vhd-util"), "copy", "-n", str(src), "-N", str(shared / "n.vhd")],
                   text=True)
        if "Permission denied" in proc.stderr and "python" in proc.stderr.lower():
            pytest.skip("the venv is not readable by the unprivileged user")
        assert proc.returncode == 13, (proc.stdout, proc.stderr)
        assert proc.stdout == f"error creating {shared}/n.vhd: -13\n"
        assert sorted(p.name for p in shared.iterdir()) == ["s.vhd"]
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_copy_killed_at_every_point_leaves_nothing_or_the_whole_copy(tmp_path: Path) -> None:
    from blktap.image.vhd.copy import copy_chain

    src = tmp_path / "s.vhd"
    create(str(src), 8 * MB)
    payload = random.Random(5).randbytes(40 * SECTOR)
    with Chain.open(named(src), writable=True) as chain:
        chain.write(3, payload)
        chain.write(3 * 4096 + 1, payload[: 8 * SECTOR])
    dst = tmp_path / "out" / "d.vhd"
    dst.parent.mkdir()

    def copy() -> None:
        with Chain.open(named(src)) as source:
            copy_chain(source, str(dst), key=KEY64)

    total = count_mutations(copy)
    shutil.rmtree(dst.parent)
    dst.parent.mkdir()
    for n in kill_points(total, 30):
        finished = crash_after(copy, n)
        if dst.exists():
            assert vhd_check.check(str(dst)).results[0].ok, n
            with Chain.open(named(dst), key=KEY64) as chain:
                assert chain.read(3, 40) == payload
                assert chain.read(3 * 4096 + 1, 8) == payload[: 8 * SECTOR]
        else:
            assert not finished, n
        shutil.rmtree(dst.parent)
        dst.parent.mkdir()


def test_vhd_util_read_serves_ciphertext_as_the_reference(tmp_path: Path) -> None:
    img = make_encrypted(tmp_path / "r.vhd")
    with Chain.open(named(img), key=KEY64, writable=True) as chain:
        chain.write(2, b"\x5c" * SECTOR)
    proc = run([tool("vhd-util"), "read", "-n", str(img), "-r", "2", "-c", "1"])
    assert proc.returncode == 0
    assert proc.stdout == XtsCipher(KEY64).encrypt(2, b"\x5c" * SECTOR)
