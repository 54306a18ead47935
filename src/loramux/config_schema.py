"""The type and range of every ``adapter_config.json`` field loramux reads, checked before any is used.

PEFT writes these files, but people edit them and tools rewrite them, and ``json.loads`` accepts
``NaN``, ``Infinity``, ``1e308`` and lists where strings belong. A value of the wrong type used
later would surface as a bare ``TypeError`` or ``re.error`` deep in the load, or worse be read
"successfully" with another meaning (``tuple("classifier")`` is nine one-letter module names,
``bool("false")`` is True). So each field is checked here once, and every failure is an
:class:`AdapterConfigError` that names the file, the field and the value, and says what PEFT writes.
"""
from __future__ import annotations

import math
import re
import reprlib
from typing import Any

from loramux.errors import AdapterConfigError

# The largest finite float32: a scaling (alpha / r) above it is inf once B is stored in float32.
F32_MAX = 3.4028234663852886e38

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlong = 3, 60, 60, 40
_repr.maxlist = _repr.maxdict = _repr.maxtuple = 6


def show(value: Any) -> str:
    """A bounded repr for messages: a 10,000-entry list or a 900-deep nesting prints in one line."""
    try:
        return _repr.repr(value)
    except (RecursionError, ValueError):  # ValueError: an int past the int-to-string digit limit
        return f"<{type(value).__name__}>"


def _fail(source: str, field: str, value: Any, expected: str) -> AdapterConfigError:
    return AdapterConfigError(f"{source}: field {field!r} must be {expected}, got {show(value)}; "
                              "fix the value (PEFT's LoraConfig writes it) or re-save the adapter with PEFT")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_scalar(source: str, field: str, value: Any) -> None:
    """A finite number whose magnitude fits float32 (so alpha / r cannot overflow the stored B)."""
    if not is_number(value):
        raise _fail(source, field, value, "a number")
    # compare before any float() conversion: a 4,000-digit int would raise OverflowError there
    if isinstance(value, float) and not math.isfinite(value):
        raise AdapterConfigError(f"{source}: field {field!r} is {value!r}; a LoRA scaling must be a finite number "
                                 "(the adapter would output NaN/inf): fix the value or retrain")
    if abs(value) > F32_MAX:
        raise AdapterConfigError(f"{source}: field {field!r} = {show(value)} overflows float32 (max {F32_MAX:.3g}) "
                                 "once divided by r, so every output of this adapter would be inf/NaN; fix the value")


def _check_regex(source: str, field: str, pattern: str, template: str = "{}") -> None:
    try:
        re.compile(template.format(pattern))
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise AdapterConfigError(f"{source}: field {field!r}: {show(pattern)} is not a valid regular expression "
                                 f"({exc}); PEFT matches it with re, so fix or remove it") from exc


def _check_bool(source: str, raw: dict, field: str) -> None:
    value = raw.get(field)
    if value is not None and not isinstance(value, bool):
        raise _fail(source, field, value, "true or false")


def _check_module_list(source: str, raw: dict, field: str, *, regex_allowed: bool) -> None:
    value = raw.get(field)
    if value is None:
        return
    if isinstance(value, str):
        if not regex_allowed:
            raise _fail(source, field, value, "a list of module names (a string here would be read letter by letter)")
        if value != "all-linear":
            _check_regex(source, field, value)
        return
    if not isinstance(value, list):
        raise _fail(source, field, value, "a list of module names" + (" or one regex string" if regex_allowed else ""))
    for i, entry in enumerate(value):
        if not isinstance(entry, str) or not entry:
            raise _fail(source, f"{field}[{i}]", entry, "a non-empty string (a module name)")


def _check_pattern(source: str, raw: dict, field: str, rank: bool) -> None:
    value = raw.get(field)
    if value is None:
        return
    if not isinstance(value, dict):
        raise _fail(source, field, value, "an object mapping module-name patterns to " + ("ranks" if rank else "alphas"))
    for key, entry in value.items():
        _check_regex(source, f"{field}[{key!r}]", key, r"(.*\.)?({})$")  # PEFT's own matching rule
        where = f"{field}[{show(key)}]"
        if rank:
            if not isinstance(entry, int) or isinstance(entry, bool) or entry <= 0:
                raise _fail(source, where, entry, "a positive integer (a rank)")
        else:
            check_scalar(source, where, entry)


def check_raw_config(raw: dict, source: str) -> None:
    """Every field loramux reads has the type and range PEFT writes; raise AdapterConfigError otherwise."""
    for field in ("peft_type", "bias"):
        if field in raw and raw[field] is not None and not isinstance(raw[field], str):
            raise _fail(source, field, raw[field], "a string")
    r = raw.get("r")
    if "r" in raw and (not isinstance(r, int) or isinstance(r, bool) or r <= 0):
        raise _fail(source, "r", r, "a positive integer (the LoRA rank)")
    if "lora_alpha" in raw:
        check_scalar(source, "lora_alpha", raw["lora_alpha"])
    for field in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias", "inference_mode"):
        _check_bool(source, raw, field)
    init = raw.get("init_lora_weights")
    if init is not None and not isinstance(init, (bool, str)):
        raise _fail(source, "init_lora_weights", init, "true, false or the name of an init scheme")
    _check_module_list(source, raw, "target_modules", regex_allowed=True)
    if raw.get("target_modules") is None and not raw.get("target_parameters"):
        raise AdapterConfigError(
            f"{source}: field 'target_modules' is missing or null; PEFT then substitutes its default list for the "
            "architecture and ignores weights outside it, which loramux cannot know from the file. Write the targeted "
            "module names (configs saved by PEFT always have them)")
    _check_module_list(source, raw, "exclude_modules", regex_allowed=True)
    _check_module_list(source, raw, "modules_to_save", regex_allowed=False)
    for i, name in enumerate(raw.get("modules_to_save") or ()):
        _check_regex(source, f"modules_to_save[{i}]", name, r"(^|.*\.){}($|\..*)")  # PEFT matches entries as regexes
    _check_pattern(source, raw, "rank_pattern", rank=True)
    _check_pattern(source, raw, "alpha_pattern", rank=False)
    layers = raw.get("layers_to_transform")
    if layers is not None:
        entries = [layers] if not isinstance(layers, list) else layers
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in entries):
            raise _fail(source, "layers_to_transform", layers, "a layer index or a list of layer indices (integers >= 0)")
    patterns = raw.get("layers_pattern")
    if patterns is not None:
        entries = [patterns] if isinstance(patterns, str) else patterns
        if not isinstance(entries, list) or not all(isinstance(p, str) for p in entries):
            raise _fail(source, "layers_pattern", patterns, "a string or a list of strings")
        for p in entries:
            _check_regex(source, "layers_pattern", p, r"(?:^|.*?\.){}\.(?P<idx>\d+)\.")  # PEFT's rule
