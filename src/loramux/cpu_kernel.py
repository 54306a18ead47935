"""The grouped-LoRA CPU kernel (``csrc/grouped_lora.cpp``): built on first use, optional.

Why a kernel: in a decode step each adapter of the batch has a token or two, so through torch every
(adapter, layer) pair is two tiny matmuls, each a dispatch plus an MKL call made for large shapes;
on the serving benchmark's decode step (~25 rows over ~12 adapters of rank 8-64 on all 7
projections) that was ~5,000 calls and ~80 ms, as long as half the base model's own step. The
kernel does one call per layer for all groups, split over torch's OpenMP threads (see the .cpp).

It is compiled with ``torch.utils.cpp_extension`` the first time a process needs it (about 40 s on
2 cores; ``make install`` does it ahead) into ``$LORAMUX_HOME/kernels``, and loaded from there
afterwards. Without a C++ compiler, or with ``LORAMUX_CPU_KERNEL=0``, ``load()`` returns None and
``ops.py`` keeps its torch path, which computes the same thing (tests compare both).

The build machinery here (``isa``, ``build_extension``) is shared with the dense decode GEMM
(``dense_kernel.py``, ``csrc/decode_gemm.cpp``); ``python -m loramux.cpu_kernel`` builds both.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "grouped_lora.cpp"
ENV_SWITCH = "LORAMUX_CPU_KERNEL"

_lock = threading.Lock()
_state: dict[str, object] = {}  # "module": the loaded extension or None once tried


def enabled() -> bool:
    """False when ``LORAMUX_CPU_KERNEL`` is 0/false/off: the torch path everywhere."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def isa() -> str | None:
    """The vector ISA the compiled kernels target on this CPU: "avx512", "avx2" or None (no kernel build;
    torch ops). From torch's own run-time CPU dispatch (``ATEN_CPU_CAPABILITY`` can lower it)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability())


ISA_FLAGS = {"avx2": ["-mavx2", "-mfma"], "avx512": ["-mavx512f", "-mavx2", "-mfma"]}


def _flags() -> tuple[str, list[str]]:
    """(module name, compiler flags): AVX2+FMA where the CPU has them, else the compiler's baseline.
    The name differs per flag set, so a build for one CPU is never loaded on a lesser one."""
    flags = ["-O3", "-fopenmp"]
    if isa() is not None:
        return "loramux_grouped_lora_avx2", flags + ISA_FLAGS["avx2"]
    return "loramux_grouped_lora", flags


def build_dir() -> Path:
    from loramux.base import loramux_home

    return loramux_home() / "kernels"


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled kernel module, building it once if needed; None if disabled or it cannot build.

    Called by every wrapped layer of a decode step, so after the first call it is one dict lookup:
    ``LORAMUX_CPU_KERNEL`` is read once per process, and a failed build is logged once, not retried.
    """
    if "module" in _state:
        return _state["module"]  # type: ignore[return-value]
    with _lock:
        if "module" not in _state:
            _state["module"] = _build(verbose) if enabled() else None
    return _state["module"]  # type: ignore[return-value]


def _build(verbose: bool) -> ModuleType | None:
    name, flags = _flags()
    return build_extension(name, SOURCE, flags, "grouped-LoRA", verbose)


def build_extension(name: str, source: Path, flags: list[str], label: str, verbose: bool = False) -> ModuleType | None:
    """Compile (once, into ``$LORAMUX_HOME/kernels/<name>``) and import a C++ extension; None if that fails.

    Shared by the kernels of the package (grouped LoRA here, the dense decode GEMM in dense_kernel.py):
    ``name`` must encode the flags' ISA so that a build for one CPU is never loaded on a lesser one.
    The module name also carries a hash of the source, the flags and torch's version: checkouts of
    different versions sharing one ``$LORAMUX_HOME`` (seen here: several developers' test runs) each
    get their own build instead of rebuilding over each other's and loading a binary of another source.
    """
    import hashlib

    from torch.utils import cpp_extension

    digest = hashlib.sha256(source.read_bytes() + "\0".join([*flags, torch.__version__]).encode()).hexdigest()[:12]
    name = f"{name}_{digest}"
    directory = build_dir() / name
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _put_ninja_on_path()
        logger.info("loading the %s CPU kernel from %s (compiled on first use, ~40 s)", label, directory)
        with _build_lock(directory):
            module = cpp_extension.load(name=name, sources=[str(source)], extra_cflags=flags,
                                        extra_ldflags=["-fopenmp"], build_directory=str(directory), verbose=verbose)
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a read-only cache: the torch path still works
        logger.warning("the %s CPU kernel is not available (%s: %s); using torch ops instead. "
                       "Install a C++ compiler (g++) to get it, or set %s=0 to skip trying.",
                       label, type(exc).__name__, _reason(exc), ENV_SWITCH)
        return None
    return module


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Hold an OS file lock on ``directory`` while torch builds or loads into it.

    torch's builder guards a build with a plain ``lock`` file and waits forever while it exists; a
    process killed mid-build (Ctrl-C, a test timeout) leaves it behind and every later engine start
    hangs (seen here). ``flock`` is released by the kernel when its holder dies, so whoever holds it
    knows a ``lock`` file it finds is stale and removes it.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file only
        yield
        return
    with open(directory / "loramux.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = directory / "lock"
            if stale.exists():
                logger.warning("removing %s, left by a kernel build that was killed", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _reason(exc: BaseException) -> str:
    """The telling line of a build failure: the compiler's first error, else the message's last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if ("error:" in line.lower() or "not found" in line.lower())
              and not line.startswith("Error building extension")]
    return (errors[0] if errors else lines[-1] if lines else "")[:300]


def _put_ninja_on_path() -> None:
    """torch's extension builder runs ``ninja`` from PATH; the ``ninja`` wheel puts it in the venv's bin,
    which is not on PATH when the venv's python is run without activating it."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def _reset_for_tests() -> None:
    _state.clear()


if __name__ == "__main__":  # `python -m loramux.cpu_kernel`: build every kernel ahead of time (make install)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from loramux import dense_kernel

    grouped = load() is not None
    dense = dense_kernel.load() is not None or isa() is None  # no AVX2: nothing to build, torch ops
    raise SystemExit(0 if grouped and dense else 1)
