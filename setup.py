"""The compiled part of blktap, optional: without a C compiler (or Python's headers) the
build says so and goes on, and the pure-Python paths serve instead (docs/architecture.md,
"Compiled inline path")."""

from setuptools import Extension, setup

# The disk as the compiled passes see it (layers, maps, reads and writes), shared by both.
DISK_HEADER = "src/blktap/tapdisk/_inline_disk.h"
EXTENSIONS = [
    ("blktap.transport.nbd._inline", "src/blktap/transport/nbd/_inline.c"),
    ("blktap.transport.nbd._handshake", "src/blktap/transport/nbd/_handshake.c"),
    ("blktap.transport.xen._ring", "src/blktap/transport/xen/_ring.c"),
    ("blktap.io._poll", "src/blktap/io/_poll.c"),
]

setup(
    ext_modules=[
        Extension(
            name,
            [source],
            include_dirs=["src/blktap/tapdisk", "src/blktap/io"],
            depends=[DISK_HEADER, "src/blktap/transport/nbd/_inline_async.h",
                     "src/blktap/transport/nbd/_inline_link.h",
                     "src/blktap/transport/nbd/_wire.h", "src/blktap/io/_hook.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
        for name, source in EXTENSIONS
    ],
)
