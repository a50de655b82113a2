"""Going to the background the way tapdisk and tapback both do it.

The started process forks; the parent waits until the child says it serves, then exits 0
(so that whoever started it knows the service is up), or, when the child dies first,
exits with the child's code. The child runs in a session of its own, with its standard
streams on /dev/null once it has said it is ready.
"""

from __future__ import annotations

import os


def detach_until_ready() -> int:
    """Fork. In the parent this never returns; in the child it returns the fd that
    :func:`say_ready` writes to."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        answer = b""
        while chunk := os.read(r, 16):
            answer += chunk
        if answer == b"ok":
            os._exit(0)
        # The child failed before serving (it said why on stderr).
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code > 0 else 1)
    os.close(r)
    os.setsid()
    return w


def null_stdio() -> None:
    """Standard input, output and error to /dev/null."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def say_ready(fd: int) -> None:
    """The child serves: its streams go to /dev/null and the waiting parent exits 0."""
    null_stdio()
    os.write(fd, b"ok")
    os.close(fd)
