"""The kernels that stream weights run without the GIL: another Python thread (the server's event loop) runs while a
decode step is inside them, instead of waiting the whole step.

No timing: the switch interval is set far beyond the test, so a thread holding the GIL keeps it until it releases
it itself. The worker thread sets an event (waking the main thread, which then needs the GIL) and calls the kernel at
once: the main thread can only run before the worker's next line if the kernel released the GIL. Whether the woken
thread gets there within one call is up to the OS scheduler, so a probe that does not see it is repeated (it never
sees a call that holds the GIL: the control below); the attempt count is only a guard.
"""
from __future__ import annotations

import sys
import threading

import pytest
import torch

from loramux import cpu_kernel


@pytest.fixture
def long_switch_interval():
    saved = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    yield
    sys.setswitchinterval(saved)


ATTEMPTS = 200


def _ran_beside(call) -> bool:
    """Whether the main thread ran Python while ``call()`` was running on another thread, in one of ``ATTEMPTS``
    tries. ``call`` must make no torch call of its own (torch's bindings release the GIL): arguments are built first."""
    return any(_one_probe(call) for _ in range(ATTEMPTS))


def _one_probe(call) -> bool:
    entered, state = threading.Event(), {"returned": False, "error": None}

    def work():
        entered.set()
        try:
            result = call()  # kept until the flag is set: freeing a returned tensor may release the GIL itself
        except Exception as exc:  # noqa: BLE001 - a failed call must fail the test, not look like a release
            state["error"] = exc
            return
        state["returned"] = True
        del result

    worker = threading.Thread(target=work)
    worker.start()
    entered.wait()
    beside = not state["returned"]  # the first line the main thread runs once it has the GIL again
    worker.join()
    if state["error"] is not None:
        raise state["error"]
    return beside


def _decode_calls(kernel):
    x = torch.randn(1, 512)
    w = torch.randn(1024, 512)  # 2 MiB: a call long enough for the woken thread to get in most times
    q = torch.randint(-127, 128, (1024, 512), dtype=torch.int8)
    scale = torch.rand(1024)
    return {"decode_linear": lambda: kernel.decode_linear(x, w, None, 64),
            "decode_linear_group": lambda: kernel.decode_linear_group(x, [w, w], [None, None], 64),
            "int8_linear": lambda: kernel.int8_linear(x, q, scale, None, 64)}


@pytest.mark.parametrize("name", ["decode_linear", "decode_linear_group", "int8_linear"])
def test_decode_gemm_calls_release_the_gil(decode_gemm_kernel, long_switch_interval, name):
    assert _ran_beside(_decode_calls(decode_gemm_kernel)[name])


def test_grouped_lora_add_releases_the_gil(long_switch_interval):
    kernel = cpu_kernel.load()
    if kernel is None:
        pytest.skip("no grouped-LoRA kernel here (its build is tested in test_cpu_kernel.py)")
    y, x, tokens = torch.zeros(2, 1024), torch.randn(2, 512), torch.arange(2)
    A, B_t = [torch.randn(64, 512)], [torch.randn(64, 1024)]
    assert _ran_beside(lambda: kernel.grouped_lora_add(y, x, tokens, [0], [2], A, B_t))


def test_the_check_sees_a_call_that_holds_the_gil(long_switch_interval):
    """The probe itself: a call that keeps the GIL (a builtin looping in C) is never seen from the main thread."""
    assert not _ran_beside(lambda: sum(range(20000)))


def _captured_stack_call(kernel):
    """The arguments of one real ``decode_stack`` call: a decode step of a small Llama (4 layers of 17 MB in all, so
    the call is long enough to be seen), on the engine's cache."""
    from loramux import MultiLoraModel, decode_stack
    from loramux.engine.kv import RowsKV

    from lora_fixtures import tiny_llama

    lm = MultiLoraModel(tiny_llama(seed=1, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2))
    captured = []

    class Capturing:
        def __getattr__(self, name):
            if name == "decode_stack":
                return lambda *args: captured.append(args) or kernel.decode_stack(*args)
            return getattr(kernel, name)

    with torch.inference_mode():
        cache, ids = RowsKV(), torch.randint(3, 90, (1, 6))
        lm(input_ids=ids, past_key_values=cache, use_cache=True)
        real, decode_stack._KERNEL = decode_stack._KERNEL, Capturing()
        try:
            lm(input_ids=ids[:, :1], attention_mask=torch.ones(1, 7, dtype=torch.long), past_key_values=cache,
               use_cache=True)
        finally:
            decode_stack._KERNEL = real
    (args,) = captured
    return args


def test_decode_stack_releases_the_gil(decode_gemm_kernel, long_switch_interval):
    """The whole-step call, on a real step's arguments (it writes the same KV column again: the same values)."""
    args = _captured_stack_call(decode_gemm_kernel)
    hidden, cos, buffers = torch.randn(1, 1, 8), torch.ones(1, 1, 4), [torch.zeros(1, 1, 2, 4)]
    with pytest.raises(RuntimeError, match="one KV buffer pair"):  # refused, the GIL taken back for the exception
        decode_gemm_kernel.decode_stack(hidden, [], buffers, [], 0, 0, None, cos, cos, [], [], 64)
    assert _ran_beside(lambda: decode_gemm_kernel.decode_stack(*args))
