"""Reading a PEFT LoRA adapter directory: its config and its weights, validated, no torch.nn here.

``read_adapter(path)`` returns an :class:`AdapterFile`: the parsed :class:`AdapterConfig` and the
tensors grouped by the module they belong to. Matching them against a base model (shapes, which
modules exist) happens in ``loading.py``, because only there is the model known. The config half
(``AdapterConfig``, ``read_config``) is ``adapter_config.py``, re-exported here.

The format is exactly what ``PeftModel.save_pretrained`` writes::

    adapter_config.json
    adapter_model.safetensors   # base_model.model.<module>.lora_A.weight        (r, d_in)
                                # base_model.model.<module>.lora_B.weight        (d_out, r)
                                # base_model.model.<module>.lora_B.bias          (d_out,)   lora_bias
                                # base_model.model.<module>.lora_embedding_A     (r, num_embeddings)
                                # base_model.model.<module>.lora_embedding_B     (dim, r)
                                # base_model.model.<module>.lora_magnitude_vector (d_out,)  DoRA
                                # base_model.model.<module>.<param>              modules_to_save
                                # base_model.model.<module>.base_layer.weight    saved embeddings
"""
from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from loramux.adapter_config import (  # noqa: F401 - re-exported: the config half of reading an adapter
    CONFIG_NAME, MAX_CONFIG_BYTES, PICKLE_NAME, SAFETENSORS_NAME, AdapterConfig, pattern_key, read_config)
from loramux.config_schema import show
from loramux.errors import AdapterError, AdapterNotFoundError, AdapterWeightsError
from loramux.st_header import FLOAT_DTYPES, TensorSpec, read_header
from loramux.st_read import TORCH_DTYPES, read_tensors

logger = logging.getLogger(__name__)

_PREFIX = "base_model.model."


@dataclass
class ModuleWeights:
    """The LoRA tensors of one target module, as stored (unscaled)."""

    lora_A: torch.Tensor | None = None           # (r, d_in), or (r, num_embeddings) for embeddings
    lora_B: torch.Tensor | None = None           # (d_out, r), or (dim, r) for embeddings
    lora_B_bias: torch.Tensor | None = None      # (d_out,) with lora_bias
    magnitude: torch.Tensor | None = None        # (d_out,) with DoRA
    embedding: bool = False
    base_copy: dict[str, torch.Tensor] = field(default_factory=dict)  # saved base_layer.* tensors


@dataclass
class AdapterFile:
    """A parsed adapter directory: config, per-module LoRA weights and modules_to_save tensors."""

    path: Path
    config: AdapterConfig
    modules: dict[str, ModuleWeights]                      # module name in the base model -> weights
    extra: dict[str, torch.Tensor]                         # other keys (modules_to_save candidates)
    finite_checked: bool = False  # read_adapter found every tensor finite (plan_load need not check A again)
    disjoint: bool = False  # no two tensors share bytes (read from safetensors, whose offsets may not overlap)

    @property
    def nbytes(self) -> int:
        tensors = list(self.extra.values())
        for mw in self.modules.values():
            tensors += [t for t in (mw.lora_A, mw.lora_B, mw.lora_B_bias, mw.magnitude) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


_LORA_SUFFIXES = {
    ".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_B.bias": "lora_B_bias",
    ".lora_embedding_A": "lora_A", ".lora_embedding_B": "lora_B", ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}
_LORA_ROLES = set(_LORA_SUFFIXES.values())


@functools.lru_cache(maxsize=1 << 16)  # a load asks three times per key (structure, base check, grouping)
def key_role(key: str) -> tuple[str, str, bool]:
    """(module, role, embedding) of a weights-file key. role: lora_A, lora_B, lora_B_bias, magnitude,
    ``base_layer.<param>`` (a saved copy of a base parameter) or ``extra`` (module = the whole name: a
    modules_to_save candidate, grouped by ``loading.py``, which knows the model's modules)."""
    name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    for suffix, role in _LORA_SUFFIXES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], role, "embedding" in suffix
    if ".base_layer." in name:
        module, param = name.split(".base_layer.", 1)
        return module, "base_layer." + param, False
    return name, "extra", False


def check_structure(source: Path, config: AdapterConfig, specs: Mapping[str, TensorSpec]) -> None:
    """The tensors agree with each other and with the config (ranks, A/B pairs, dtypes): no base model needed.

    Runs on the safetensors header before any data is read, and again on tensors read from a pickle."""
    per_module: dict[str, dict[str, tuple[int, ...]]] = {}
    embeddings: set[str] = set()
    has_extra = False
    for key, spec in specs.items():
        module, role, embedding = key_role(key)
        if role == "extra":
            has_extra = True
            continue
        if role in _LORA_ROLES and not spec.floating:
            raise AdapterWeightsError(f"{source}: tensor {key!r} is {spec.dtype}; LoRA weights are floating point "
                                      "(F32, F16, BF16), so this file is not a LoRA adapter or is corrupt")
        per_module.setdefault(module, {})[role] = spec.shape
        if embedding:
            embeddings.add(module)
    for module, roles in per_module.items():
        A, B = roles.get("lora_A"), roles.get("lora_B")
        if (A is None) != (B is None):
            missing = "lora_A" if A is None else "lora_B"
            raise AdapterWeightsError(f"{source}: module {module!r} has no {missing} tensor; the file is incomplete")
        if A is None:
            continue
        if len(A) != 2 or len(B) != 2 or A[0] != B[1]:
            raise AdapterWeightsError(
                f"{source}: module {module!r}: lora_A {A} and lora_B {B} disagree on the rank (A is (r, d_in), "
                "B is (d_out, r)); the file is inconsistent")
        expected = config.rank_for(module)
        if config.target_parameters and (module.endswith(".base_layer") or A[0] % expected == 0):
            continue  # may be ParamWrapper LoRA (r*E rows, nested as .base_layer): loading/experts check it on the model
        if A[0] != expected:
            raise AdapterWeightsError(
                f"{source}: module {module!r} has rank {A[0]} but the config says r={expected} "
                "(field 'r' or 'rank_pattern'); config and weights come from different adapters")
        if config.use_dora and "magnitude" not in roles and module not in embeddings:
            raise AdapterWeightsError(f"{source}: use_dora is set but module {module!r} has no lora_magnitude_vector")
        # PEFT ignores a tensor its config does not ask for, and initialises one it asks for but lacks:
        # either way its output is not what the file says, so config and weights must agree
        for role, flag, field in (("magnitude", config.use_dora, "use_dora"), ("lora_B_bias", config.lora_bias, "lora_bias")):
            if role in roles and not flag:
                raise AdapterWeightsError(f"{source}: module {module!r} has a {role} tensor but field {field!r} is false; "
                                          "config and weights disagree (PEFT would ignore the tensor): fix the config")
        if config.lora_bias and "lora_B_bias" not in roles and module not in embeddings:
            raise AdapterWeightsError(f"{source}: lora_bias is set but module {module!r} has no lora_B.bias tensor; "
                                      "config and weights disagree (PEFT would leave that bias at its initial value)")
    if not any("lora_A" in roles for roles in per_module.values()) and not has_extra:
        raise AdapterWeightsError(f"{source}: holds no LoRA tensors (no '*.lora_A.weight' keys); is it a LoRA adapter?")


HeaderCheck = Callable[[AdapterConfig, "dict[str, TensorSpec]", Path], None]


def _read_tensors(path: Path, config: AdapterConfig, allow_pickle: bool,
                  check: HeaderCheck | None) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], set[str]]:
    """The file's tensors, and (``st_read.FileTensors``) typed views of the buffer they share with the keys
    those cover, for ``_check_finite``."""
    st_path, bin_path = path / SAFETENSORS_NAME, path / PICKLE_NAME
    if st_path.is_file():
        from safetensors import SafetensorError

        specs = read_header(st_path)  # every shape and dtype is checked before a byte of data is read
        check_structure(st_path, config, specs)
        if check is not None:
            check(config, specs, st_path)
        # one buffer for all tensors when a load keeps every one of them (LoRA tensors only); a file with
        # modules_to_save or saved base layers gives each tensor its own memory (those are copied or dropped)
        share = all(key_role(key)[1] in _LORA_ROLES for key in specs)
        try:
            read = read_tensors(st_path, specs, share=share)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise AdapterWeightsError(f"{st_path}: cannot be read ({exc}); the file is truncated or corrupt, copy it again") from exc
        return read.tensors, read.runs, read.in_runs
    if bin_path.is_file():
        if not allow_pickle:
            raise AdapterWeightsError(
                f"{bin_path}: pickle weights can run arbitrary code when loaded, so they are refused by default; "
                f"convert the adapter to {SAFETENSORS_NAME} or pass allow_pickle=True if you trust its source")
        try:
            tensors = torch.load(str(bin_path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad pickles
            raise AdapterWeightsError(f"{bin_path}: cannot be read ({exc})") from exc
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in tensors.items()):
            raise AdapterWeightsError(f"{bin_path}: holds a {type(tensors).__name__}, not a dict of named tensors")
        specs = {key: spec_of(t) for key, t in tensors.items()}  # a pickle has no header: checked after reading
        check_structure(bin_path, config, specs)
        if check is not None:
            check(config, specs, bin_path)
        return tensors, [], set()
    raise AdapterNotFoundError(f"{path}: no {SAFETENSORS_NAME} (or {PICKLE_NAME}) next to {CONFIG_NAME}")


_ST_NAMES = {TORCH_DTYPES[name]: name for name in FLOAT_DTYPES}  # torch float dtype -> safetensors name


def spec_of(tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(dtype=_ST_NAMES.get(tensor.dtype, str(tensor.dtype)), shape=tuple(tensor.shape))


def _check_finite(tensors: dict[str, torch.Tensor], source: Path, runs: list[torch.Tensor] = (),
                  in_runs: set[str] = frozenset()) -> None:
    """NaN/inf anywhere makes a tensor's sum NaN/inf: one reduction per tensor and one check, instead
    of an elementwise mask and a reduction per tensor. Tensors side by side in one buffer (``runs``,
    covering the keys ``in_runs``) are summed in one reduction per run: one op for a whole adapter
    file instead of ~400. A non-finite sum can also be an overflow of finite values, so only then is
    each tensor checked exactly, to name the bad one."""
    floats = {key: t for key, t in tensors.items() if t.is_floating_point()}
    if not floats:
        return
    sums = [run.sum(dtype=torch.float32) for run in runs]
    sums += [t.sum(dtype=torch.float32) for key, t in floats.items() if key not in in_runs]
    if bool(torch.isfinite(torch.stack(sums)).all()):
        return
    for key, tensor in floats.items():
        if not torch.isfinite(tensor).all():
            raise AdapterWeightsError(f"{source}: tensor {key!r} holds NaN or inf values; the adapter diverged in training")


def read_adapter(path: str | Path, *, allow_pickle: bool = False, check: HeaderCheck | None = None) -> AdapterFile:
    """Parse and validate an adapter directory; every problem raises a specific ``AdapterError``.

    ``check(config, specs, file)`` runs on the tensors' declared shapes and dtypes before their data
    is read (``loading.check_against_base`` checks them against a base model there)."""
    path = Path(path)
    config = read_config(path)
    try:
        return _read_weights(path, config, allow_pickle, check)
    except AdapterError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError, re.error) as exc:
        # a defect no check names: still an AdapterWeightsError, never a bare builtin (traceback in the debug log)
        logger.debug("unexpected error while reading %s", path, exc_info=True)
        raise AdapterWeightsError(f"{path}: the weights cannot be used ({type(exc).__name__}: {show(str(exc))}); "
                                  "re-save the adapter with PEFT") from exc


def _read_weights(path: Path, config: AdapterConfig, allow_pickle: bool, check: HeaderCheck | None) -> AdapterFile:
    tensors, runs, in_runs = _read_tensors(path, config, allow_pickle, check)
    source = path / (SAFETENSORS_NAME if (path / SAFETENSORS_NAME).is_file() else PICKLE_NAME)
    _check_finite(tensors, source, runs, in_runs)
    modules: dict[str, ModuleWeights] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        module, role, embedding = key_role(key)
        if role == "extra":
            extra[module] = tensor
        elif role.startswith("base_layer."):
            modules.setdefault(module, ModuleWeights()).base_copy[role[len("base_layer."):]] = tensor
        else:
            mw = modules.setdefault(module, ModuleWeights())
            setattr(mw, role, tensor)
            mw.embedding = mw.embedding or embedding
    logger.debug("read adapter %s: %d modules, %d extra tensors", path, len(modules), len(extra))
    return AdapterFile(path=path, config=config, modules=modules, extra=extra, finite_checked=True,
                       disjoint=source.name == SAFETENSORS_NAME)
