"""Command-line front-ends: the modern ``blktap`` command and the drop-in ``vhd-util``.

Every console script imports this package first, so a platform other than Linux is
refused here, once, with a clear message: the daemons rely on Linux interfaces (io_submit,
O_DIRECT, abstract UNIX sockets, /proc, the Xen grant devices) and the tools on Linux's
sparse-file and locking semantics. The library (``blktap.image``) stays importable.
"""

import sys

if not sys.platform.startswith("linux"):
    sys.stderr.write(f"blktap: runs on Linux only (this is {sys.platform}); the image "
                     "library blktap.image may still be imported\n")
    raise SystemExit(95)  # EOPNOTSUPP
