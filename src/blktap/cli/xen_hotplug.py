"""``blktap-xen-hotplug add|remove``: the disk hotplug script for xl (``script=``).

libxl runs it with ``$XENBUS_PATH`` set to the backend directory; see
:mod:`blktap.tapback.hotplug` and docs/xen.md for the xl disk line. ``online``/``offline``
are accepted as synonyms of ``add``/``remove`` (udev's names). Errors: one line on stderr
(libxl copies it into its log), ``hotplug-error`` in XenStore, exit status = errno.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from blktap.cli.common import print_version_if_asked
from blktap.errors import BlktapError

PROG = "blktap-xen-hotplug"
ACTIONS = {"add": "add", "online": "add", "remove": "remove", "offline": "remove"}


async def _run(action: str, path: str, xenstore: str | None) -> None:
    from blktap.tapback import hotplug
    from blktap.tapback.xenstore import XenStore

    async with await XenStore.open(xenstore) as xs:
        if action == "add":
            try:
                await hotplug.add(xs, path)
            except BlktapError as exc:
                await hotplug.report_failure(xs, path, str(exc))
                raise
        else:
            await hotplug.remove(xs, path)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if print_version_if_asked(PROG, args):
        return 0
    if len(args) != 1 or args[0] not in ACTIONS:
        print(f"usage: {PROG} add|remove   (with XENBUS_PATH set, as libxl runs it)",
              file=sys.stderr)
        return 22
    path = os.environ.get("XENBUS_PATH")
    if not path:
        print(f"{PROG}: XENBUS_PATH is not set", file=sys.stderr)
        return 22
    logging.basicConfig(level=logging.INFO, format=f"{PROG}: %(message)s")
    try:
        asyncio.run(_run(ACTIONS[args[0]], path, os.environ.get("XENSTORED_PATH")))
    except (BlktapError, OSError) as exc:
        print(f"{PROG}: {args[0]} {path}: {exc}", file=sys.stderr)
        return getattr(exc, "errno", None) or 5
    return 0


if __name__ == "__main__":
    sys.exit(main())
