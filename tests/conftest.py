"""Session-wide test setup."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _cpu_kernel_built():
    """Build (or load) the grouped-LoRA CPU kernel once, before any test runs: the first build takes
    ~40 s, and inside a test it would land in some request's first decode step, where a test that
    waits for that step would race it. Without a compiler this returns None and the torch path runs."""
    from loramux import cpu_kernel

    cpu_kernel.load()
    yield
