"""The tapback daemon: one watch over a backend type, one task per VBD.

``/local/domain/<self>/backend/<name>`` (``vbd3`` by default) is watched as a whole: an
event under ``<domid>/<devid>`` pokes that VBD (creating it when its directory appears);
an event higher up rescans the level it names. Each VBD also watches its frontend's
``state``. A poke wakes the VBD's task, which runs steps until XenStore stops changing
under it; pokes that arrive during a step make one more step, never a queue of them.

On start the watch fires at once, so the scan finds the VBDs that exist (after a restart,
their rings are still served by the tapdisks: each VBD takes up where XenStore says it
was). SIGTERM ends the daemon without touching the rings, so that it can be restarted.

Where the reference differs: it forks one process per domain (``tapback -x DOMID``); we
serve every domain from one event loop (``-x`` still restricts us to one domain).
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable

from blktap.errors import XenStoreError
from blktap.tapback.link import TapdiskLink
from blktap.tapback.vbd import Options, Phase, Vbd
from blktap.tapback.xenstore import Watch, XenStore

log = logging.getLogger("blktap.tapback")
BACKEND_TOKEN = "tapback-backend"
UNWATCH_WAIT = 1.0  # seconds a stopping tapback waits for xenstored to drop its watch
RETRY_DELAY = 1.0  # seconds before a VBD whose tapdisk did not answer is looked at again


async def my_domid(xs: XenStore) -> int:
    """The domain we run in: the relative key ``domid``, absent in dom0."""
    text = await xs.read_or("domid")
    try:
        return int(text) if text is not None else 0
    except ValueError:
        return 0


class _Agent:
    """The task that runs one VBD's steps."""

    def __init__(self, vbd: Vbd, on_done: Callable[[_Agent], None]) -> None:
        self.vbd = vbd
        self.wake = asyncio.Event()
        self.wake.set()
        self.frontend_watch: Watch | None = None
        self._on_done = on_done
        self.task = asyncio.get_running_loop().create_task(self._run(),
                                                           name=f"vbd-{vbd.name}")

    def poke(self, *_: object) -> None:
        self.wake.set()

    async def _run(self) -> None:
        vbd = self.vbd
        failures = 0
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                try:
                    phase = await vbd.step()
                    failures = 0
                except XenStoreError as exc:
                    if exc.errno == errno.EPIPE:
                        raise
                    failures += 1
                    log.error("%s: step failed: %s", vbd.name, exc)
                    # try again later (a transaction still conflicting, a refused write)
                    await asyncio.sleep(min(0.1 * failures, 2.0))
                    self.wake.set()
                    continue
                await self._watch_frontend()
                if phase is Phase.GONE:
                    return
                if vbd.retry:
                    asyncio.get_running_loop().call_later(RETRY_DELAY, self.poke)
        except asyncio.CancelledError:
            # Shutting down: the connection's close drops the watches with it (a request
            # now could wait on a peer that is going away).
            if self.frontend_watch is not None:
                self.vbd.xs.forget(self.frontend_watch)
                self.frontend_watch = None
            raise
        except Exception:
            log.exception("%s: state machine failed", vbd.name)
        finally:
            await self._unwatch()
            self._on_done(self)

    async def _watch_frontend(self) -> None:
        fe = self.vbd.frontend
        if fe is None or self.frontend_watch is not None:
            return
        token = f"tapback-front-{self.vbd.domid}-{self.vbd.devid}"
        try:
            self.frontend_watch = await self.vbd.xs.watch(f"{fe}/state", token, self.poke)
        except (XenStoreError, ValueError) as exc:
            log.error("%s: cannot watch the frontend %s: %s", self.vbd.name, fe, exc)

    async def _unwatch(self) -> None:
        if self.frontend_watch is not None:
            watch, self.frontend_watch = self.frontend_watch, None
            try:
                await watch.close()
            except XenStoreError:
                pass


class Tapback:
    """Serve every VBD of backend type ``name`` (only domain ``only_domid`` if given)."""

    def __init__(self, xs: XenStore, link: TapdiskLink, options: Options | None = None,
                 name: str = "vbd3", only_domid: int | None = None) -> None:
        self.xs, self.link = xs, link
        self.options = options or Options()
        self.name, self.only_domid = name, only_domid
        self.root = ""
        self.agents: dict[tuple[int, int], _Agent] = {}
        self._watch: Watch | None = None
        self._rescan = asyncio.Event()
        self._stopped = asyncio.Event()
        self._domain_seen = False
        self._scanner: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Watch the backend directory (events flow from here on)."""
        domid = await my_domid(self.xs)
        self.root = f"/local/domain/{domid}/backend/{self.name}"
        where = self.root if self.only_domid is None else f"{self.root}/{self.only_domid}"
        self._scanner = asyncio.get_running_loop().create_task(self._scan_loop())
        self._watch = await self.xs.watch(where, BACKEND_TOKEN, self._on_event)
        log.info("watching %s", where)

    async def run(self) -> None:
        """Serve until :meth:`stop` or until the XenStore connection breaks."""
        if self._watch is None:
            await self.start()
        assert self._watch is not None
        ended = asyncio.get_running_loop().create_task(self._watch_ended())
        try:
            await self._stopped.wait()
        finally:
            ended.cancel()
            await self.close()

    async def _watch_ended(self) -> None:
        assert self._watch is not None
        async for _ in self._watch:  # callback watches never queue; this waits for the end
            pass
        if not self._stopped.is_set():
            log.error("lost the connection to XenStore")
            self._stopped.set()

    def stop(self) -> None:
        self._stopped.set()

    async def close(self) -> None:
        if self._scanner is not None:
            self._scanner.cancel()
        for agent in list(self.agents.values()):
            agent.task.cancel()
        await asyncio.gather(*(a.task for a in list(self.agents.values())),
                             return_exceptions=True)
        if self._watch is not None:
            watch, self._watch = self._watch, None
            # Closing the connection would end the watch too: do not wait long for it.
            try:
                async with asyncio.timeout(UNWATCH_WAIT):  # (wait_for can lose a cancel)
                    await watch.close()
            except (XenStoreError, TimeoutError):
                self.xs.forget(watch)

    # ------------------------------------------------------------------ events
    def _on_event(self, path: str, _token: str) -> None:
        rest = path[len(self.root):].strip("/") if path.startswith(self.root) else None
        parts = rest.split("/") if rest else []
        if rest is None or len(parts) < 2:
            self._rescan.set()  # the root or a whole domain: look at everything again
            return
        try:
            key = (int(parts[0]), int(parts[1]))
        except ValueError:
            return
        agent = self.agents.get(key)
        if agent is not None:
            agent.poke()
        else:
            self._add(*key)

    def _add(self, domid: int, devid: int) -> None:
        if (domid, devid) in self.agents:
            return
        if self.only_domid is not None and domid != self.only_domid:
            return
        path = f"{self.root}/{domid}/{devid}"
        vbd = Vbd(self.xs, self.link, self.options, path, domid, devid)
        self.agents[(domid, devid)] = _Agent(vbd, self._agent_done)

    def _agent_done(self, agent: _Agent) -> None:
        key = (agent.vbd.domid, agent.vbd.devid)
        if self.agents.get(key) is agent:
            del self.agents[key]
        if agent.vbd.phase is not Phase.GONE:
            return
        # The directory may have come back while the agent wound down.
        self._rescan.set()

    async def _scan_loop(self) -> None:
        while True:
            await self._rescan.wait()
            self._rescan.clear()
            try:
                await self._scan()
            except XenStoreError as exc:
                if exc.errno == errno.EPIPE:
                    return
                log.error("scanning %s: %s", self.root, exc)

    async def _scan(self) -> None:
        domains = ([str(self.only_domid)] if self.only_domid is not None
                   else await self._children(self.root) or [])
        found: set[tuple[int, int]] = set()
        for d in domains:
            if not d.isdigit():
                continue
            devs = await self._children(f"{self.root}/{d}")
            if self.only_domid is not None:
                if devs is None:
                    if self._domain_seen:
                        log.info("domain %s removed, exiting", d)
                        self.stop()
                    continue
                self._domain_seen = True
            for dev in devs or ():
                if dev.isdigit():
                    found.add((int(d), int(dev)))
        for key in found:
            self._add(*key)
        for key, agent in list(self.agents.items()):
            if key not in found:
                agent.poke()  # its step will find the directory gone

    async def _children(self, path: str) -> list[str] | None:
        try:
            return await self.xs.directory(path)
        except XenStoreError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
