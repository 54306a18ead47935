"""Session-wide test setup."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _cpu_kernel_built():
    """Build (or load) the CPU kernels once, before any test runs: a first build takes ~40 s each, and
    inside a test it would land in some request's first decode step (or a server subprocess's start),
    where a test that waits for that would race it. Without a compiler they return None and the torch
    paths run."""
    from loramux import cpu_kernel

    cpu_kernel.load()
    try:
        from loramux import dense_kernel
    except ImportError:
        dense_kernel = None
    if dense_kernel is not None:
        dense_kernel.load()
    yield
