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


@pytest.fixture(scope="session")
def decode_gemm_kernel():
    """The decode-GEMM extension; a failed build FAILS where a compiler and AVX2 exist, else the test skips
    (the torch paths are tested on their own)."""
    import shutil

    from loramux import cpu_kernel, dense_kernel

    module = dense_kernel.load()
    if module is None:
        has_compiler = shutil.which("c++") is not None or shutil.which("g++") is not None
        if has_compiler and cpu_kernel.enabled() and cpu_kernel.isa() is not None:
            pytest.fail("a C++ compiler and AVX2 are here but the decode GEMM kernel did not build (see the warning log)")
        pytest.skip("no compiler, no AVX2, or LORAMUX_CPU_KERNEL=0: the torch path is tested elsewhere")
    return module


@pytest.fixture
def threads():
    """Tests that set torch's thread count get it restored afterwards."""
    import torch

    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)
