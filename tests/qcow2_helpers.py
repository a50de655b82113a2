"""Helpers for the qcow2 tests: qemu-img/qemu-io calls and a shadow of the disk."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from blktap.image.chain import Chain
from conftest import need, run

MiB = 1 << 20


def qemu_img(*args: str | Path, ok: bool = True) -> str:
    res = run([need("qemu-img"), *map(str, args)], text=True)
    if ok:
        assert res.returncode == 0, (args, res.stdout, res.stderr)
    return res.stdout


def qemu_io(path: str | Path, *commands: str, fmt: str = "qcow2") -> None:
    argv = [need("qemu-io"), "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    res = run([*argv, str(path)], text=True)
    assert res.returncode == 0 and "error" not in res.stdout.lower(), (res.stdout, res.stderr)


def qemu_check(path: str | Path) -> tuple[int, dict]:
    res = run([need("qemu-img"), "check", "--output=json", str(path)], text=True)
    try:
        info = json.loads(res.stdout)
    except json.JSONDecodeError:
        info = {"raw": res.stdout + res.stderr}
    return res.returncode, info


def qemu_raw(path: str | Path, tmp: Path) -> bytes:
    out = tmp / (Path(path).name + ".qemu.raw")
    if out.exists():
        out.unlink()
    qemu_img("convert", "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def our_raw(path: str | Path) -> bytes:
    with Chain.open(f"qcow2:{path}") as chain:
        return bytes(chain.read(0, chain.sectors))


def random_ops(chain: Chain, shadow: bytearray, rng: random.Random, count: int, *,
               max_sectors: int = 300) -> None:
    """Random writes, write-zeroes and discards through a chain, mirrored in ``shadow``
    (what a discarded range reads as afterwards is taken from the chain: it is whatever
    the format makes of it, checked against qemu by the callers)."""
    size = len(shadow)
    leaf = chain.leaf
    for _ in range(count):
        op = rng.random()
        sector = rng.randrange(size // 512)
        n = min(size // 512 - sector, rng.randrange(1, max_sectors))
        off, length = sector * 512, n * 512
        if op < 0.6:
            data = os.urandom(length)
            chain.write(sector, data)
            shadow[off : off + length] = data
        elif op < 0.8:
            leaf.write_zeroes(sector, n)
            shadow[off : off + length] = bytes(length)
        else:
            leaf.discard(sector, n)
            shadow[off : off + length] = chain.read(sector, n)
