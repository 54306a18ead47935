"""``adapter_config.json``: :class:`AdapterConfig` (the fields that define the math, validated on
construction) and ``read_config(path)``. No tensors here; the weights are read in ``adapter.py``,
which re-exports these names (``from loramux.adapter import AdapterConfig, read_config`` keeps working).

Which fields are read, which are harmless (training-only) and which are refused lives here, with the
field-by-field type/range checks of the raw JSON in ``config_schema.py``.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramux.config_schema import check_raw_config, check_scalar, show
from loramux.errors import AdapterConfigError, AdapterError, AdapterNotFoundError

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


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
    "lora_bias", "bias", "modules_to_save", "target_parameters",
}


# init schemes that rewrite the base weights at training time: the adapter only works on that
# modified base, which loramux (one shared base) cannot provide.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "orthogonal")


# PEFT configs are about 1 KB; a larger file is not a config (and is not read into memory whole)
MAX_CONFIG_BYTES = 4 * 1024 * 1024


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
    init_lora_weights: bool | str = True  # no effect on the math; add_weighted_adapter replays PEFT's RNG use with it
    target_parameters: tuple[str, ...] = ()  # PEFT ParamWrapper LoRA on parameters (fused MoE experts): experts.py

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise AdapterConfigError(f"{self.source}: field 'r' must be a positive integer, got {show(self.r)}")
        check_scalar(self.source, "lora_alpha", self.lora_alpha)
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
                raise AdapterConfigError(f"{self.source}: rank_pattern[{key!r}] must be a positive integer, got {show(rank)}")
        for key, alpha in self.alpha_pattern.items():
            check_scalar(self.source, f"alpha_pattern[{key!r}]", alpha)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<memory>") -> "AdapterConfig":
        """Validate a parsed ``adapter_config.json``; refuse every field whose meaning loramux lacks."""
        if not isinstance(raw, dict):
            raise AdapterConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        check_raw_config(raw, source)
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
                    f"{source}: field {show(key)}={show(value)} changes the adapter's math and is not supported by loramux; "
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
            init_lora_weights=init if isinstance(init, (bool, str)) else True,
            target_parameters=_target_parameters(raw.get("target_parameters"), source),
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
        """Whether PEFT would put a LoRA on ``module_name`` (its ``check_target_module_exists``): not excluded,
        not in modules_to_save; a list matches exact or ``.suffix`` (then ``layers_to_transform`` applies),
        a string is a full regex (``layers_to_transform`` ignored, as in PEFT); "all-linear": the caller checks."""
        if self._excluded(module_name):
            return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", module_name) for m in self.modules_to_save):
            return False
        targets = self.target_modules
        if targets is None:
            return False
        if isinstance(targets, str):
            return targets == "all-linear" or re.fullmatch(targets, module_name) is not None
        matched = module_name in targets or any(module_name.endswith("." + t) for t in targets)
        return matched and self._in_layers(module_name)

    def _excluded(self, module_name: str) -> bool:
        ex = self.exclude_modules
        if not ex:
            return False
        if isinstance(ex, str):
            return re.fullmatch(ex, module_name) is not None
        return any(module_name == e or module_name.endswith("." + e) for e in ex)

    def _in_layers(self, module_name: str) -> bool:
        wanted = self.layers_to_transform
        if wanted is None or wanted == []:
            return True
        patterns = self.layers_pattern
        if not patterns:  # PEFT: any "<name>.<index>." in the key
            found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
        else:
            found = None
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module_name)
                if found is not None:
                    break
        if found is None:
            return False
        index = int(found.group("idx"))
        return index == wanted if isinstance(wanted, int) else index in wanted


def _target_parameters(value: Any, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise AdapterConfigError(f"{source}: field 'target_parameters' must be a list of parameter names "
                                 f"(e.g. ['experts.gate_up_proj']), got {show(value)}")
    return tuple(value)


def read_config(path: Path) -> AdapterConfig:
    config_path = path / CONFIG_NAME
    if not path.is_dir():
        raise AdapterNotFoundError(f"adapter directory {str(path)!r} does not exist (or is not a directory)")
    if not config_path.is_file():
        raise AdapterNotFoundError(
            f"{config_path}: missing; a PEFT adapter directory holds {CONFIG_NAME} and {SAFETENSORS_NAME} "
            "(written by PeftModel.save_pretrained)")
    try:
        size = config_path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise AdapterConfigError(f"{config_path}: {size} bytes; a PEFT adapter config is a few KB (limit "
                                     f"{MAX_CONFIG_BYTES} bytes), so this is not one: re-save the adapter")
        raw = json.loads(config_path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError, OSError) as exc:
        # ValueError: JSONDecodeError, and integers past Python's int-string digit limit;
        # RecursionError: nesting deeper than the parser's recursion limit
        if isinstance(exc, AdapterError):
            raise
        raise AdapterConfigError(f"{config_path}: not valid JSON ({type(exc).__name__}: {show(str(exc))}); "
                                 "re-save the adapter") from exc
    try:
        return AdapterConfig.from_dict(raw, source=str(config_path))
    except AdapterError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, RecursionError, re.error) as exc:
        # a malformed value that no check above names: still an AdapterConfigError, never a bare builtin
        logger.debug("unexpected error while validating %s", config_path, exc_info=True)
        raise AdapterConfigError(f"{config_path}: a field has a value loramux cannot use ({type(exc).__name__}: "
                                 f"{show(str(exc))}); compare it with what PEFT writes and re-save the adapter") from exc
