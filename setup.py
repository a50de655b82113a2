"""The compiled part of blktap, optional: without a C compiler (or Python's headers) the
build says so and goes on, and the pure-Python paths serve instead (docs/architecture.md,
"Compiled inline path")."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "blktap.transport.nbd._inline",
            ["src/blktap/transport/nbd/_inline.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
    ],
)
