"""Reading a PEFT LoRA adapter directory: its config and its weights, validated, no torch.nn here.

``read_adapter(path)`` returns an :class:`AdapterFile`: the parsed :class:`AdapterConfig` and the
tensors grouped by the module they belong to. Matching them against a base model (shapes, which
modules exist) happens in ``loading.py``, because only there is the model known.

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

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loramux.errors import AdapterConfigError, AdapterNotFoundError, AdapterWeightsError

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."

# Config fields that loramux reads, or that only matter while training. Any other field set to a
# non-empty value may change the math, so it is refused rather than silently ignored.
_HARMLESS_FIELDS = {
    "base_model_name_or_path", "revision", "task_type", "inference_mode", "lora_dropout",
    "peft_version", "auto_mapping", "megatron_config", "megatron_core", "qalora_group_size",
    "ensure_weight_tying", "eva_config", "loftq_config", "init_lora_weights",
}
_READ_FIELDS = {
    "peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out", "use_dora",
    "lora_bias", "bias", "modules_to_save",
}
# init schemes that rewrite the base weights at training time: the adapter only works on that
# modified base, which loramux (one shared base) cannot provide.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "orthogonal")


def _empty(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def pattern_key(pattern_keys: list[str], module_name: str) -> str | None:
    """PEFT's rank_pattern/alpha_pattern rule: the first key with ``(.*\\.)?(key)$`` matching wins."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of ``adapter_config.json`` that define the math, validated on construction."""

    r: int
    lora_alpha: float
    source: str = "<memory>"
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fan_in_fan_out: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise AdapterConfigError(f"{self.source}: field 'r' must be a positive integer, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise AdapterConfigError(f"{self.source}: field 'lora_alpha' must be a number, got {self.lora_alpha!r}")
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise AdapterConfigError(f"{self.source}: rank_pattern[{key!r}] must be a positive integer, got {rank!r}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<memory>") -> "AdapterConfig":
        """Validate a parsed ``adapter_config.json``; refuse every field whose meaning loramux lacks."""
        if not isinstance(raw, dict):
            raise AdapterConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        peft_type = raw.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise AdapterConfigError(
                f"{source}: peft_type {peft_type!r} is not supported; loramux serves LoRA adapters only (peft_type 'LORA')")
        if "r" not in raw:
            raise AdapterConfigError(f"{source}: missing field 'r' (the LoRA rank); is this a PEFT LoRA adapter config?")
        bias = raw.get("bias", "none")
        if bias != "none":
            raise AdapterConfigError(
                f"{source}: bias={bias!r} trains the base model's biases, which one shared base cannot hold per adapter; "
                "only bias='none' is supported (use lora_bias=True for a per-adapter bias)")
        init = raw.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
            raise AdapterConfigError(
                f"{source}: init_lora_weights={init!r} rewrites the base weights during training; convert the adapter to "
                "a plain LoRA first (PEFT save_pretrained(path_initial_model_for_weight_conversion=...))")
        for key, value in raw.items():
            if key not in _HARMLESS_FIELDS and key not in _READ_FIELDS and not _empty(value):
                raise AdapterConfigError(
                    f"{source}: field {key!r}={value!r} changes the adapter's math and is not supported by loramux; "
                    "remove it only if you know it has no effect at inference")
        modules_to_save = raw.get("modules_to_save") or ()
        return cls(
            r=raw["r"], lora_alpha=raw.get("lora_alpha", 8), source=source,
            use_rslora=bool(raw.get("use_rslora", False)),
            rank_pattern=dict(raw.get("rank_pattern") or {}), alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            target_modules=raw.get("target_modules"), exclude_modules=raw.get("exclude_modules"),
            layers_to_transform=raw.get("layers_to_transform"), layers_pattern=raw.get("layers_pattern"),
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)), use_dora=bool(raw.get("use_dora", False)),
            lora_bias=bool(raw.get("lora_bias", False)), modules_to_save=tuple(modules_to_save),
        )

    def rank_for(self, module_name: str) -> int:
        key = pattern_key(list(self.rank_pattern), module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def scaling_for(self, module_name: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA, with PEFT's per-module patterns."""
        rank = self.rank_for(module_name)
        key = pattern_key(list(self.alpha_pattern), module_name)
        alpha = self.alpha_pattern[key] if key is not None else self.lora_alpha
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def targets(self, module_name: str) -> bool:
        """Whether PEFT would put a LoRA on ``module_name`` (list: exact or ``.suffix``; str: full regex)."""
        if self._excluded(module_name):
            return False
        targets = self.target_modules
        if targets is None:
            return False
        if isinstance(targets, str):
            if targets == "all-linear":
                return True  # the caller checks the module type
            matched = re.fullmatch(targets, module_name) is not None
        else:
            matched = any(module_name == t or module_name.endswith("." + t) for t in targets)
        return matched and self._in_layers(module_name)

    def _excluded(self, module_name: str) -> bool:
        ex = self.exclude_modules
        if not ex:
            return False
        if isinstance(ex, str):
            return re.fullmatch(ex, module_name) is not None
        return any(module_name == e or module_name.endswith("." + e) for e in ex)

    def _in_layers(self, module_name: str) -> bool:
        if self.layers_to_transform is None:
            return True
        wanted = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
        patterns = self.layers_pattern or ["layers", "h", "blocks", "layer"]
        patterns = [patterns] if isinstance(patterns, str) else patterns
        for pattern in patterns:
            found = re.match(rf".*\.{pattern}\.(\d+)\.", module_name)
            if found:
                return int(found.group(1)) in wanted
        return False


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


def read_config(path: Path) -> AdapterConfig:
    config_path = path / CONFIG_NAME
    if not path.is_dir():
        raise AdapterNotFoundError(f"adapter directory {str(path)!r} does not exist (or is not a directory)")
    if not config_path.is_file():
        raise AdapterNotFoundError(
            f"{config_path}: missing; a PEFT adapter directory holds {CONFIG_NAME} and {SAFETENSORS_NAME} "
            "(written by PeftModel.save_pretrained)")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterConfigError(f"{config_path}: not valid JSON ({exc}); re-save the adapter") from exc
    return AdapterConfig.from_dict(raw, source=str(config_path))


def _read_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    st_path, bin_path = path / SAFETENSORS_NAME, path / PICKLE_NAME
    if st_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            try:  # read into memory the adapter owns: a mapping of the file would keep every byte of it
                # resident for as long as any tensor lives, and crash the process (SIGBUS) if the file is
                # rewritten in place while the adapter is loaded
                return load_file(str(st_path), backend="pread")
            except TypeError:  # safetensors < 0.8: only the mapped reader exists
                return {key: t.clone() for key, t in load_file(str(st_path)).items()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise AdapterWeightsError(f"{st_path}: cannot be read ({exc}); the file is truncated or corrupt, copy it again") from exc
    if bin_path.is_file():
        if not allow_pickle:
            raise AdapterWeightsError(
                f"{bin_path}: pickle weights can run arbitrary code when loaded, so they are refused by default; "
                f"convert the adapter to {SAFETENSORS_NAME} or pass allow_pickle=True if you trust its source")
        try:
            return torch.load(str(bin_path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad pickles
            raise AdapterWeightsError(f"{bin_path}: cannot be read ({exc})") from exc
    raise AdapterNotFoundError(f"{path}: no {SAFETENSORS_NAME} (or {PICKLE_NAME}) next to {CONFIG_NAME}")


def _check_finite(tensors: dict[str, torch.Tensor], source: Path) -> None:
    """NaN/inf anywhere makes a tensor's sum NaN/inf: one reduction per tensor and one check, instead
    of an elementwise mask and a reduction per tensor. A non-finite sum can also be an overflow of
    finite values, so only then is each tensor checked exactly, to name the bad one."""
    floats = {key: t for key, t in tensors.items() if t.is_floating_point()}
    if not floats:
        return
    if bool(torch.isfinite(torch.stack([t.sum(dtype=torch.float32) for t in floats.values()])).all()):
        return
    for key, tensor in floats.items():
        if not torch.isfinite(tensor).all():
            raise AdapterWeightsError(f"{source}: tensor {key!r} holds NaN or inf values; the adapter diverged in training")


def read_adapter(path: str | Path, *, allow_pickle: bool = False) -> AdapterFile:
    """Parse and validate an adapter directory; every problem raises a specific ``AdapterError``."""
    path = Path(path)
    config = read_config(path)
    tensors = _read_tensors(path, allow_pickle)
    source = path / SAFETENSORS_NAME
    modules: dict[str, ModuleWeights] = {}
    extra: dict[str, torch.Tensor] = {}
    _check_finite(tensors, source)
    for key, tensor in tensors.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        for suffix, kind in _LORA_SUFFIXES.items():
            if name.endswith(suffix):
                mw = modules.setdefault(name[: -len(suffix)], ModuleWeights())
                setattr(mw, kind, tensor)
                mw.embedding = mw.embedding or "embedding" in suffix
                break
        else:
            if ".base_layer." in name:
                module, param = name.split(".base_layer.", 1)
                modules.setdefault(module, ModuleWeights()).base_copy[param] = tensor
            else:
                extra[name] = tensor
    for module, mw in modules.items():
        if (mw.lora_A is None) != (mw.lora_B is None):
            missing = "lora_A" if mw.lora_A is None else "lora_B"
            raise AdapterWeightsError(f"{source}: module {module!r} has no {missing} tensor; the file is incomplete")
        if mw.lora_A is None:
            continue
        if mw.lora_A.dim() != 2 or mw.lora_B.dim() != 2 or mw.lora_A.shape[0] != mw.lora_B.shape[1]:
            raise AdapterWeightsError(
                f"{source}: module {module!r}: lora_A {tuple(mw.lora_A.shape)} and lora_B {tuple(mw.lora_B.shape)} "
                "disagree on the rank (A is (r, d_in), B is (d_out, r)); the file is inconsistent")
        expected = config.rank_for(module)
        if mw.lora_A.shape[0] != expected:
            raise AdapterWeightsError(
                f"{source}: module {module!r} has rank {mw.lora_A.shape[0]} but the config says r={expected} "
                "(field 'r' or 'rank_pattern'); config and weights come from different adapters")
        if config.use_dora and mw.magnitude is None and not mw.embedding:
            raise AdapterWeightsError(f"{source}: use_dora is set but module {module!r} has no lora_magnitude_vector")
    if not any(mw.lora_A is not None for mw in modules.values()) and not extra:
        raise AdapterWeightsError(f"{source}: holds no LoRA tensors (no '*.lora_A.weight' keys); is it a LoRA adapter?")
    logger.debug("read adapter %s: %d modules, %d extra tensors", path, len(modules), len(extra))
    return AdapterFile(path=path, config=config, modules=modules, extra=extra)
