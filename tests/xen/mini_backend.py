"""A minimal, TEST-ONLY blkif backend for the Xen testbed: proves tapdisk's ring alone.

This is not tapback. It does just enough of the XenStore handshake, with dom0's
xenstore-read/-write/-watch, to hand one guest's ring to our tapdisk:

1. ``tap-ctl create -a aio:IMAGE`` (the library's TapCtl), DISK_INFO for the size;
2. watch ``$XENSTORE_BACKEND_ROOT``; on the vbd's backend dir in state 1, write the
   disk keys and what we advertise, then state 2 (InitWait);
3. watch the frontend; on state 3/4, read ``ring-page-order``, ``ring-ref[N]``,
   ``event-channel``, ``protocol`` and send XENBLKIF_CONNECT; then state 4 (Connected);
4. on Closing/Closed (either side): XENBLKIF_DISCONNECT, state 6;
5. on SIGTERM: ``tap-ctl stats`` into ``$TESTBED_OUT/tapdisk-stats.json``, destroy, exit 0.

Usage in the testbed (``tests/xen/run_testbed.sh`` stages the payload):
``python3 /opt/payload/tests/xen/mini_backend.py $DISK_IMAGE``.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time

from blktap.control import message as m
from blktap.control.client import TapCtl
from blktap.control.message import Message
from blktap.control.message import MessageType as T
from blktap.control.rundir import RunDir

ROOT = os.environ.get("XENSTORE_BACKEND_ROOT", "/local/domain/0/backend/vbd")
DEVID = int(os.environ.get("VBD_DEVID", "51712"))
OUT = os.environ.get("TESTBED_OUT", "/tmp")
READY = os.environ.get("BACKEND_READY_FILE", "/run/backend-ready")
PROTOCOLS = {"x86_32-abi": 2, "x86_64-abi": 3}
# What we advertise (docs/protocols/xen-blkif.md).
FEATURES = {
    "feature-flush-cache": "1",
    "feature-barrier": "1",
    "feature-discard": "1",
    "discard-granularity": "4096",
    "discard-alignment": "0",
    "discard-secure": "0",
    "feature-max-indirect-segments": "256",
    "max-ring-page-order": "3",
}


def say(text: str) -> None:
    print(f"mini-backend[{time.monotonic():8.2f}]: {text}", flush=True)


def xs(argv: list[str]) -> subprocess.CompletedProcess:
    """Run a xenstore tool, again if it died of a signal (the testbed's TCG dom0 has
    been seen to crash user space now and then under load)."""
    for _ in range(5):
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode >= 0:
            return r
        say(f"{argv[0]} died of signal {-r.returncode}; again")
    return r


def xs_read(path: str) -> str | None:
    r = xs(["xenstore-read", path])
    return r.stdout.strip() if r.returncode == 0 else None


def xs_write(base: str, pairs: dict[str, str]) -> None:
    args = []
    for k, v in pairs.items():
        args += [f"{base}/{k}", v]
    r = xs(["xenstore-write", *args])
    if r.returncode:
        raise SystemExit(f"xenstore-write failed: {r.stderr}")


def ask(tid: int, msg: Message) -> Message:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(RunDir().control_socket(tid))
        m.write_message(s, msg)
        return m.read_message(s)


class Backend:
    def __init__(self, image: str) -> None:
        self.ctl = TapCtl()
        self.tid, self.minor, _ = self.ctl.create(f"aio:{image}")
        info = ask(self.tid, Message(T.DISK_INFO, self.minor)).payload
        assert isinstance(info, m.Image)
        self.info = info
        say(f"tapdisk {self.tid} minor {self.minor}: {info}")
        self.watchers: list[subprocess.Popen] = []
        self.watched: set[str] = set()
        self.domid: int | None = None
        self.initwait = False
        self.connected = False
        self.closed = False

    def watch(self, path: str) -> None:
        if path in self.watched:
            return
        self.watched.add(path)
        self.watchers.append(subprocess.Popen(["xenstore-watch", path], stdout=subprocess.PIPE,
                                              text=True, bufsize=1))

    def step(self) -> None:
        if self.domid is None:
            listing = xs(["xenstore-list", ROOT])
            doms = [int(d) for d in listing.stdout.split()] if listing.returncode == 0 else []
            if not doms:
                return
            self.domid = doms[0]
            say(f"domain {self.domid}")
        be = f"{ROOT}/{self.domid}/{DEVID}"
        state = xs_read(f"{be}/state")
        if state is None and xs_read(be) is not None:
            return  # a read that failed under load, not a vanished directory
        if state is None:
            if self.connected or self.initwait:
                say("backend dir gone")
                self.disconnect()
                self.domid, self.initwait, self.closed = None, False, False
            return
        fe = xs_read(f"{be}/frontend")
        if fe is None:
            return
        self.watch(fe)
        fe_state = xs_read(f"{fe}/state")
        if state in ("2", "3", "4"):
            self.initwait = True  # (also after a restart of this script's view)
        if state == "1" and not self.initwait:
            keys = {"sectors": str(self.info.sectors), "sector-size": str(self.info.sector_size),
                    "info": str(self.info.info), "kthread-pid": str(self.ctl.pid(self.tid)),
                    **FEATURES}
            xs_write(be, keys)
            xs_write(be, {"state": "2"})
            self.initwait = True
            say("InitWait")
        if self.closed and fe_state == "1":
            # The frontend starts again (blkfront reloaded): InitWait, as blkback does.
            xs_write(be, {"state": "2"})
            self.closed = False
            say("InitWait again (the frontend reconnects)")
        if fe_state in ("3", "4") and self.initwait and not self.connected and not self.closed:
            self.connect(be, fe)
        if (fe_state in ("5", "6") or state == "5") and not self.closed:
            self.disconnect()
            xs_write(be, {"state": "6"})
            self.closed = True
            say("Closed")

    def connect(self, be: str, fe: str) -> None:
        order = int(xs_read(f"{fe}/ring-page-order") or 0)
        if order:
            grefs = tuple(int(xs_read(f"{fe}/ring-ref{i}") or 0) for i in range(1 << order))
        else:
            grefs = (int(xs_read(f"{fe}/ring-ref") or 0),)
        port = int(xs_read(f"{fe}/event-channel") or 0)
        proto = PROTOCOLS.get(xs_read(f"{fe}/protocol") or "x86_32-abi", 1)
        assert self.domid is not None
        msg = Message(T.XENBLKIF_CONNECT, self.minor,
                      m.Blkif(self.domid, DEVID, grefs + (0,) * (8 - len(grefs)), order, proto,
                              "", port))
        reply = ask(self.tid, msg)
        say(f"CONNECT order {order} grefs {grefs} port {port} proto {proto}: {reply.type.name}"
            f" {reply.payload}")
        if reply.type is not T.XENBLKIF_CONNECT_RSP:
            raise SystemExit(f"connect failed: {reply.payload}")
        xs_write(be, {"state": "4"})
        self.connected = True
        with open(os.path.join(OUT, "mini-backend-xenstore.txt"), "w") as f:
            for path in (be, fe):
                f.write(subprocess.run(["xenstore-ls", "-f", path], capture_output=True,
                                       text=True).stdout)
        say("Connected")

    def disconnect(self) -> None:
        if not self.connected or self.domid is None:
            return
        self.save_stats("after-guest")
        reply = ask(self.tid, Message(T.XENBLKIF_DISCONNECT, self.minor,
                                      m.Blkif(self.domid, DEVID)))
        say(f"DISCONNECT: {reply.type.name}")
        self.connected = False

    def save_stats(self, tag: str) -> None:
        try:
            text = self.ctl.stats(self.tid, self.minor)
        except Exception as exc:  # noqa: BLE001 (a test helper: report and go on)
            say(f"stats: {exc}")
            return
        with open(os.path.join(OUT, f"tapdisk-stats-{tag}.json"), "wb") as f:
            f.write(text)

    def run(self) -> None:
        self.watch(ROOT)
        open(READY, "w").close()
        say("ready")
        start_diagnostics()
        while True:
            pipes = [w.stdout for w in self.watchers]
            ready, _, _ = select.select(pipes, [], [], 0.5)
            for p in ready:
                if not p.readline():  # type: ignore[union-attr]
                    self.unwatch(p)
            self.step()

    def unwatch(self, pipe: object) -> None:
        for w in self.watchers:
            if w.stdout is pipe:
                say(f"xenstore-watch {w.args[1]} ended (rc {w.wait()})")
                self.watchers.remove(w)
                self.watched.discard(w.args[1])
                return

    def stop(self) -> None:
        self.save_stats("final")
        for w in self.watchers:
            w.kill()
        try:
            self.disconnect()
        except Exception as exc:  # noqa: BLE001 (report, then still stop tapdisk)
            say(f"disconnect: {exc}")
        logdir = os.environ.get("BLKTAP_LOG_DIR")
        if logdir and os.path.isdir(logdir):  # the log goes at a clean exit: keep a copy
            for name in os.listdir(logdir):
                with open(os.path.join(logdir, name), "rb") as src, \
                        open(os.path.join(OUT, f"copy-{name}"), "wb") as dst:
                    dst.write(src.read())
        try:
            self.ctl.destroy(self.tid, self.minor)
            say("tapdisk destroyed")
        except Exception as exc:  # noqa: BLE001
            say(f"destroy: {exc}")


DIAG_STARTED = False
CLK_TCK = os.sysconf("SC_CLK_TCK")


def spinners() -> list[int]:
    """User processes other than ours that have used more than 5 s of CPU."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (os.getpid(), 1):
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kthread = int(fields[6]) & 0x00200000  # PF_KTHREAD
        if int(fields[11]) + int(fields[12]) > 5 * CLK_TCK and not kthread:
            found.append(int(name))
    return found


def proc_facts(pid: int) -> str:
    facts = []
    for what in ("cmdline", "stat", "syscall", "wchan", "stack", "status"):
        try:
            with open(f"/proc/{pid}/{what}", "rb") as f:
                text = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError as exc:
            text = str(exc)
        if what == "status":
            text = " ".join(ln for ln in text.splitlines()
                            if ln.startswith(("State", "SigPnd", "ShdPnd", "SigBlk",
                                              "SigCgt", "voluntary", "nonvoluntary")))
        facts.append(f"{what}={' | '.join(text.split(chr(10)))[:400]}")
    return " ; ".join(facts)


def start_diagnostics() -> None:
    """Issue 12's open question: the testbed's dom0 fell silent after a guest was gone.
    Every 20 s, dom0's processes (state, kernel wait channel) and xl's view, on the
    serial log."""
    import threading

    global DIAG_STARTED
    if DIAG_STARTED:
        return
    DIAG_STARTED = True

    def loop() -> None:
        while True:
            time.sleep(20)
            for argv in (["ps", "-eo", "pid,ppid,stat,wchan:28,time,args", "--sort", "-time"],
                         ["xl", "list"]):
                try:
                    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
                    text = r.stdout + r.stderr
                except (OSError, subprocess.TimeoutExpired) as exc:
                    text = f"{argv[0]}: {exc}"
                for line in text.splitlines()[:40]:
                    if "[" in line.split(None, 5)[-1][:1]:
                        continue  # kernel threads
                    say(f"diag: {line}")
            for pid in spinners():
                say(f"diag: spinner {pid}: {proc_facts(pid)}")

    threading.Thread(target=loop, daemon=True).start()


def main() -> None:
    backend = Backend(sys.argv[1])

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    try:
        backend.run()
    finally:
        backend.stop()


if __name__ == "__main__":
    main()
