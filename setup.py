"""Build the one C extension: release/acquire loads and stores for the shared-memory ring."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("ipc._atomic", sources=["ipc/_atomic.c"], extra_compile_args=["-O2"]),
    ]
)
