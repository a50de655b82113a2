"""The one table of driver types: built-in drivers and plugins, by ``type:`` name.

:data:`BUILTIN` lists the reference tapdisk's type names (``tapdisk-disktype.c``) and
ours: each maps to the ``module:Class`` that implements it, or to None for a name the
reference knows that is not built here (opening it answers ENOSYS, as there). Adding a
built-in driver is one line in it (docs/drivers.md). Plugins come from the Python entry
points of group ``blktap.drivers`` (``name = "module:Class"``): installing a package that
declares one makes ``name:ARGS`` work everywhere a ``type:path`` is taken. A built-in
name wins over a plugin of the same name; a plugin may provide a name the reference
knows and we do not build. Any other name is ENOENT.

Plugins are imported when their name is first used, so a broken one (an import error, a
wrong API version, not a Driver) fails only the disks that name it, with a
:class:`~blktap.errors.DriverError` (ELIBBAD) naming the plugin and its package.
"""

from __future__ import annotations

import errno
import importlib
import re
from dataclasses import dataclass
from importlib import metadata

from blktap.errors import BlktapError, DriverError
from blktap.tapdisk.driver import API_VERSION, Driver

ENTRY_POINT_GROUP = "blktap.drivers"

# name -> "module:Class", or None: the reference's name, not built here (ENOSYS).
BUILTIN: dict[str, str | None] = {
    "aio": "blktap.tapdisk.drivers.aio:AioDriver",
    "sync": None,
    "vmdk": None,
    "vhdsync": None,
    "vhd": "blktap.tapdisk.drivers.vhd:VhdDriver",
    "ram": "blktap.tapdisk.drivers.ram:RamDriver",
    "qcow": "blktap.tapdisk.drivers.qcow:QcowDriver",
    "bc": None,
    "vhdi": None,
    "log": None,
    "remus": None,
    "lc": None,
    "lle": None,
    "llp": None,
    "valve": "blktap.tapdisk.drivers.valve:ValveDriver",
    "nbd": "blktap.tapdisk.drivers.nbd:NbdDriver",
    "qcow2": "blktap.tapdisk.drivers.qcow2:Qcow2Driver",
    "rbd": "blktap.tapdisk.drivers.rbd:RbdDriver",
}

NAME = re.compile(r"^[a-z][a-z0-9+_-]*$")


@dataclass(frozen=True)
class Entry:
    """One row of the table."""

    name: str
    # "module:Class", or None: known, not built.
    target: str | None
    # "built-in (module:Class)", or "plugin 'NAME' (module:Class, from DIST VERSION)".
    origin: str
    plugin: bool = False


_table: dict[str, Entry] | None = None
_loaded: dict[str, type[Driver]] = {}
# Plugin names that an entry point offered but that could not be used, with why.
_skipped: dict[str, str] = {}


def _plugin_entries() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def table() -> dict[str, Entry]:
    """Every known type name (built-in first, then plugins), read once per process."""
    global _table
    if _table is None:
        rows = {name: Entry(name, target, f"built-in ({target})" if target
                            else "the reference's name, not built here")
                for name, target in BUILTIN.items()}
        for ep in _plugin_entries():
            dist = ep.dist
            where = f"{dist.name} {dist.version}" if dist is not None else "an unknown package"
            origin = f"plugin {ep.name!r} ({ep.value}, from {where})"
            if not NAME.match(ep.name):
                _skipped[ep.name] = f"{origin}: not a valid type name"
                continue
            if BUILTIN.get(ep.name) is not None:
                _skipped[ep.name] = f"{origin}: the built-in driver of that name wins"
                continue
            if ep.name in rows and rows[ep.name].plugin:
                _skipped[ep.name] = f"{origin}: {rows[ep.name].origin} has that name too"
                continue
            rows[ep.name] = Entry(ep.name, ep.value, origin, plugin=True)
        _table = rows
    return _table


def refresh() -> None:
    """Forget the table (after packages were installed or removed in this process)."""
    global _table
    _table = None
    _loaded.clear()
    _skipped.clear()


def implemented() -> tuple[str, ...]:
    """The type names that can be opened: built-in ones, then plugins."""
    return tuple(name for name, row in table().items() if row.target is not None)


def skipped() -> dict[str, str]:
    """Entry points that were not put in the table, and why (``blktap drivers``)."""
    table()
    return dict(_skipped)


def listing() -> list[dict[str, str]]:
    """The table as ``blktap drivers`` shows it: every name with its status (``built-in``,
    ``not built``, ``plugin``, ``broken``: the plugin is imported to tell), its origin,
    and for a broken or skipped plugin why."""
    rows: list[dict[str, str]] = []
    for name, row in table().items():
        item = {"name": name, "origin": row.origin,
                "status": ("plugin" if row.plugin else "built-in") if row.target
                else "not built"}
        if row.plugin:
            try:
                driver_class(name)
            except BlktapError as exc:
                item["status"] = "broken"
                item["error"] = str(exc)
        rows.append(item)
    for name, why in skipped().items():
        origin, _, reason = why.rpartition(": ")
        rows.append({"name": name, "origin": origin, "status": "skipped", "error": reason})
    return rows


def is_openable(kind: str) -> bool:
    row = table().get(kind)
    return row is not None and row.target is not None


def driver_class(kind: str, spec: str = "") -> type[Driver]:
    """The class that opens ``kind``: imported (once) and checked.

    ENOENT for an unknown name, ENOSYS for one known and not built, ELIBBAD for a
    plugin that cannot be used; ``spec`` prefixes the message."""
    cls = _loaded.get(kind)
    if cls is not None:
        return cls
    where = f"{spec}: " if spec else ""
    row = table().get(kind)
    if row is None:
        raise BlktapError(f"{where}unknown driver type {kind!r} "
                          f"(use {', '.join(implemented())})", errno.ENOENT)
    if row.target is None:
        raise BlktapError(f"{where}driver {kind!r} is not implemented", errno.ENOSYS)
    module_name, _, attr = row.target.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
    except Exception as exc:  # whatever a plugin's import raises: it is the plugin's
        raise DriverError(f"{where}{row.origin} failed to load: "
                          f"{type(exc).__name__}: {exc}", errno.ELIBBAD) from exc
    if not (isinstance(obj, type) and issubclass(obj, Driver)):
        raise DriverError(f"{where}{row.origin} is not a blktap.driver.Driver subclass",
                          errno.ELIBBAD)
    if row.plugin:
        version = getattr(obj, "api_version", None)
        if version is None:
            raise DriverError(f"{where}{row.origin} does not say which driver API it was "
                              f"written for (api_version = blktap.driver.API_VERSION)",
                              errno.ELIBBAD)
        if version != API_VERSION:
            raise DriverError(f"{where}{row.origin} was written for driver API {version}; "
                              f"this blktap has API {API_VERSION}", errno.ELIBBAD)
    _loaded[kind] = obj
    return obj


__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "Entry", "driver_class", "implemented",
           "is_openable", "listing", "refresh", "skipped", "table"]
