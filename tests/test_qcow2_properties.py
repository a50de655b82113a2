"""Property test (hypothesis, bounded): random operations on a qcow2 image, with and
without a backing file, match a flat shadow; the image stays clean for our check and for
``qemu-img check``, and qemu reads the same bytes."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blktap.image.chain import Chain
from blktap.image.qcow2.check import check
from blktap.image.qcow2.create import create
from qcow2_helpers import MiB, qemu_check, qemu_raw

SIZE = 3 * MiB
SECTORS = SIZE // 512

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

ops = st.lists(st.one_of(
    st.tuples(st.just("pwrite"), st.integers(0, SIZE - 1), st.integers(1, 200_000),
              st.integers(0, 2**32 - 1)),
    st.tuples(st.sampled_from(["zero", "discard"]), st.integers(0, SECTORS - 1),
              st.integers(1, 1200), st.just(0)),
    st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(0)),
), min_size=1, max_size=25)

layouts = st.sampled_from([
    {"cluster_size": 512}, {"cluster_size": 65536}, {"cluster_size": 2 * MiB},
    {"cluster_size": 65536, "compat": "0.10"}, {"cluster_size": 32768, "extended_l2": True},
    {"cluster_size": 4096, "refcount_bits": 2},
])


@SETTINGS
@given(layout=layouts, backing=st.booleans(), program=ops)
def test_random_operations_match_a_shadow(layout: dict, backing: bool,
                                          program: list[tuple[str, int, int, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        img = folder / "p.qcow2"
        shadow = bytearray(SIZE)
        kw = dict(layout)
        if backing:
            base = folder / "base.raw"
            shadow[:] = random.Random(1).randbytes(SIZE)
            base.write_bytes(shadow)
            kw.update(backing_file="base.raw", backing_fmt="raw")
        create(str(img), SIZE, **kw)
        chain = Chain.open(f"qcow2:{img}", writable=True)
        try:
            for kind, a, b, seed in program:
                if kind == "pwrite":
                    length = min(b, SIZE - a)
                    data = random.Random(seed).randbytes(length)
                    chain.pwrite(a, data)
                    shadow[a : a + length] = data
                elif kind == "reopen":
                    chain.close()
                    chain = Chain.open(f"qcow2:{img}", writable=True)
                else:
                    n = min(b, SECTORS - a)
                    lo, hi = a * 512, (a + n) * 512
                    if kind == "zero":
                        chain.leaf.write_zeroes(a, n)
                        shadow[lo:hi] = bytes(hi - lo)
                    else:
                        chain.leaf.discard(a, n)
                        got = chain.read(a, n)
                        # Discarded clusters read as zeros or as below; the rest is kept.
                        for pos in range(lo, hi, 512):
                            sect = got[pos - lo : pos - lo + 512]
                            if sect != shadow[pos : pos + 512]:
                                assert sect == bytes(512) or backing
                        shadow[lo:hi] = got
            assert chain.read(0, SECTORS) == shadow
        finally:
            chain.close()
        assert check(str(img)).exit_code == 0
        assert qemu_check(img)[0] == 0
        assert qemu_raw(img, folder) == shadow
