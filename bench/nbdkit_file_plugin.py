"""A minimal pure-Python file plugin for nbdkit's python plugin (the benchmark's
"nbdkit python" server): one file, read and write with os.preadv/os.pwrite, flush with
fdatasync. Nothing else (no zero, trim or extents), so nbdkit emulates or refuses those.

    nbdkit python bench/nbdkit_file_plugin.py file=PATH
"""

import os

import nbdkit

API_VERSION = 2
path = None


def thread_model():
    # Requests may run on nbdkit's threads in parallel; os.pread/os.pwrite release the GIL.
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    global path
    if key != "file":
        raise RuntimeError(f"unknown parameter {key}")
    path = value


def config_complete():
    if path is None:
        raise RuntimeError("file=PATH is required")


def open(readonly):  # noqa: A001 - the name nbdkit calls
    return os.open(path, os.O_RDONLY if readonly else os.O_RDWR)


def close(fd):
    os.close(fd)


def get_size(fd):
    return os.fstat(fd).st_size


def pread(fd, buf, offset, flags):
    done = 0
    view = memoryview(buf)
    while done < len(buf):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError("short read")
        done += n


def pwrite(fd, buf, offset, flags):
    done = 0
    view = memoryview(buf)
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def flush(fd, flags):
    os.fdatasync(fd)
