"""Where a workload's time goes in `blktap serve`: py-spy samples the server while fio (or
nbdcopy) runs, and the samples are summed by the function running when each was taken.

    .venv/bin/python bench/where.py TYPE:IMAGE WORKLOAD [--seconds S] [-- SERVE-OPTIONS]
    e.g. bench/where.py aio:/dev/shm/raw.img randread-qd1
         bench/where.py vhd:/dev/shm/leaf.vhd nbdcopy -- --read-only

WORKLOAD is one of bench/workloads.py's names (seqread, seqwrite, randread-qd1, ...,
nbdcopy). The output is a Markdown table: the share of the samples in each leaf function
(a leaf that makes a system call stands for the kernel's time on its behalf, plus the few
Python lines around the call), then the shares by kind: system calls against the Python
work. Samples are of
the loop's thread and the I/O threads, idle ones excluded; py-spy comes with the `bench`
extra (pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from workloads import BY_NAME, fio_argv, nbdcopy_argv  # noqa: E402

# Leaf functions whose samples are time in a system call (the kernel's work).
SYSCALL_LEAVES = {
    "Channel._send_some": "sendmsg",
    "Channel._recv_into": "recv",
    "Channel.fill": "recv",
    "Channel._receive_for_hook": "recv",
    "ThreadEngine.try_preadv": "preadv",
    "ThreadEngine.try_pwritev": "pwritev",
    "write_full": "pwritev",
    "read_full": "preadv",
    "EpollSelector.select": "epoll_wait",
    "_call": "io_submit / io_getevents",
    "sync": "fsync",
}


def summarize(raw: Path, top: int = 12) -> str:
    by_leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        leaf = stack.split(";")[-1]
        name, _, where = leaf.partition(" (")
        by_leaf[f"{name} ({where.split('/')[-1]}"] += n
    if not total:
        return "no samples (is the server busy? is py-spy allowed to attach?)\n"
    out = ["| share | leaf function (file:line) | kind |", "|---|---|---|"]
    kinds: collections.Counter[str] = collections.Counter()
    for leaf, n in by_leaf.items():
        kinds[SYSCALL_LEAVES.get(leaf.split(" (")[0], "python")] += n
    for leaf, n in by_leaf.most_common(top):
        kind = SYSCALL_LEAVES.get(leaf.split(" (")[0], "python")
        out.append(f"| {n * 100 / total:.1f}% | `{leaf}` | {kind} |")
    out.append("")
    out.append("By kind: " + ", ".join(f"{k} {n * 100 / total:.0f}%"
                                       for k, n in kinds.most_common()) + f" ({total} samples).")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="After --: more blktap serve options.")
    ap.add_argument("image", help="TYPE:PATH as blktap serve takes it")
    ap.add_argument("workload", choices=sorted(BY_NAME))
    ap.add_argument("--seconds", type=float, default=4.0, help="sampling time (default 4)")
    # Split at "--" by hand: with a positional taking the rest, argparse refused an option
    # (--seconds) written after IMAGE WORKLOAD and before the "--".
    argv = sys.argv[1:]
    serve_options: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, serve_options = argv[:cut], argv[cut + 1:]
    args = ap.parse_args(argv)
    args.serve_options = serve_options
    py_spy = shutil.which("py-spy", path=f"{ROOT / '.venv/bin'}:{os.environ.get('PATH', '')}")
    if py_spy is None:
        ap.error("py-spy not found: pip install -e '.[bench]'")
    with tempfile.TemporaryDirectory(prefix="blktap-where.", dir="/dev/shm") as tmp:
        sock = Path(tmp) / "sock"
        server = subprocess.Popen(
            [str(ROOT / ".venv/bin/blktap"), "serve", args.image, "--socket", str(sock),
             *args.serve_options], stdout=subprocess.PIPE, text=True)
        load = None
        try:
            assert server.stdout is not None
            uri = server.stdout.readline().strip()
            if not uri:
                print("the server did not start", file=sys.stderr)
                return 1
            runtime = args.seconds + 2
            if args.workload == "nbdcopy":
                copy = " ".join(f"'{a}'" for a in nbdcopy_argv(uri))
                loop = f"end=$((SECONDS+{int(runtime) + 1})); while [ $SECONDS -lt $end ]; " \
                       f"do {copy} || exit 1; done"
                load = subprocess.Popen(["bash", "-c", loop])
            else:
                size = int(subprocess.run(["nbdinfo", "--size", uri], capture_output=True,
                                          text=True, check=True).stdout)
                load = subprocess.Popen(fio_argv(BY_NAME[args.workload], uri, size, runtime),
                                        stdout=subprocess.DEVNULL)
            time.sleep(1)
            raw = Path(tmp) / "profile.txt"
            subprocess.run([py_spy, "record", "--pid", str(server.pid), "--duration",
                            str(int(args.seconds)), "--rate", "250", "--nonblocking",
                            "--format", "raw", "--output", str(raw)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            print(f"`{args.workload}` on `{args.image}`, {args.seconds:g} s of samples:\n")
            print(summarize(raw))
        finally:
            if load is not None:
                load.wait()
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
