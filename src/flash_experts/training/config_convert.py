"""The converter under the training config: YAML text and command-line overrides -> typed dataclass fields.

Generic over dataclasses (training/config.py holds the schema): every key checked against the dataclass's
fields (an unknown key names the close valid ones), every value coerced to its field's annotation (YAML reads
`3e-4` as a string; it becomes a float here), and every failure a ConfigError (a ValueError) naming the field.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from flash_experts.errors import ConfigError, UserError

# One vocabulary for precision: run.precision here and every verb's --dtype. Other common spellings are
# refused with the word to use, never silently mapped.
PRECISIONS = ("fp32", "bf16", "fp16")
OTHER_PRECISION_SPELLINGS = {"float32": "fp32", "float": "fp32", "f32": "fp32", "bfloat16": "bf16",
                             "float16": "fp16", "half": "fp16", "f16": "fp16"}


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    """["a.b=1", "--c.d", "2", "--e.f=3"] -> [("a.b", "1"), ("c.d", "2"), ("e.f", "3")]."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(items):
        item = str(items[i])
        flag = item.startswith("--")
        body = item[2:] if flag else item
        if "=" in body:
            dotted, text = body.split("=", 1)
        elif flag and i + 1 < len(items):
            dotted, text = body, str(items[i + 1])
            i += 1
        else:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=1e-4)")
        if not dotted.strip():
            raise ConfigError(f"override {item!r} names no key")
        pairs.append((dotted.strip(), text))
        i += 1
    return pairs


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file not found: {path}" + (" (that is a folder)" if path.is_dir() else ""))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    except UnicodeDecodeError as error:
        raise UserError(f"config file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise UserError(f"cannot read config file {path}: {error.strerror or error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_override(raw: dict[str, Any], dotted: str, text: str, sections: dict[str, type],
                   renamed: dict[str, dict[str, str]]) -> None:
    """Set `section.key` (or a whole section) in the raw nested dict to the YAML value of `text`."""
    parts = dotted.split(".")
    section = check_key(parts[0], sections, prefix="")
    value = parse_value(text)
    if len(parts) == 1:  # a whole section, e.g. "moe=null" or "moe={num_experts: 4}"
        raw[section] = value
        return
    if len(parts) != 2:
        raise ConfigError(f"override key {dotted!r} must be section.key (e.g. optim.lr)")
    key = check_key(parts[1], field_types(sections[section]), prefix=f"{section}.", renamed=renamed.get(section))
    annotation = field_types(sections[section])[key]
    if str in (annotation, *typing.get_args(annotation)) and value is not None:
        value = text  # keep names verbatim: "run.name=1e3" stays "1e3", not 1000.0
    target = raw.get(section)
    if not isinstance(target, dict):  # absent, or `moe: null` being re-enabled by "moe.num_experts_per_tok=1"
        target = {}
        raw[section] = target
    target[key] = value


def parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_key(key: Any, valid: dict[str, Any], prefix: str, renamed: dict[str, str] | None = None) -> str:
    """`key` when it is one of `valid`; else a ConfigError naming the new name (`renamed`: old -> new) or the
    close valid keys."""
    if not isinstance(key, str):
        raise ConfigError(f"config key {prefix}{key!r} must be a string")
    if key in valid:
        return key
    if renamed and key in renamed:
        raise ConfigError(f"config key '{prefix}{key}' is now '{prefix}{renamed[key]}' (the model config's name)")
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(prefix + c for c in close)}?" if close else f"valid keys: {', '.join(prefix + v for v in valid)}"
    raise ConfigError(f"unknown config key {prefix + key!r}; {hint}")


def build_section(name: str, cls: type, value: Any, renamed: dict[str, str] | None = None) -> Any:
    """The dataclass `cls` from the mapping `value` (None = all defaults), every key checked and coerced."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"config section {name!r} must be a mapping of keys, got {type(value).__name__}")
    types_ = field_types(cls)
    kwargs = {}
    for key, item in value.items():
        key = check_key(key, types_, prefix=f"{name}.", renamed=renamed)
        kwargs[key] = coerce(item, types_[key], f"{name}.{key}")
    return cls(**kwargs)


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Coerce one value to the annotated type; ValueError naming `where` if impossible."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be {_describe(annotation)}, got {value!r}")
    if origin is Literal:
        is_precision = set(PRECISIONS) <= set(args)  # run.precision's choices; other Literal fields keep theirs
        if is_precision and isinstance(value, str) and value.lower() in OTHER_PRECISION_SPELLINGS:
            raise ConfigError(f"{where}={value!r} is spelled {OTHER_PRECISION_SPELLINGS[value.lower()]!r} here "
                              f"(the words of every verb's --dtype: {', '.join(PRECISIONS)})")
        if isinstance(value, bool) and ("on" if value else "off") in args:
            value = "on" if value else "off"  # YAML 1.1 reads a bare off/on as false/true
        if isinstance(value, str) and value.lower() in args:
            return value.lower()
        raise ConfigError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
    if annotation is bool:
        return _to_bool(value, where)
    if annotation is int:
        return _to_int(value, where)
    if annotation is float:
        return _to_float(value, where)
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    raise TypeError(f"internal: no coercion for {annotation!r} at {where}")  # a schema bug, not user input


def _describe(annotation: Any) -> str:
    """Human words for a field type, for error messages."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return " or ".join(map(repr, args))
    if origin is list:
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(args[0], str(args[0]))
    if annotation is type(None):
        return "null"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(annotation, str(annotation))


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "yes", "on", "1"):
            return True
        if word in ("false", "no", "off", "0"):
            return False
    raise ConfigError(f"{where} must be true or false, got {value!r}")


def _to_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    try:
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            number = float(value.strip())
        else:
            raise ConfigError
    except (ValueError, OverflowError):
        raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return number


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip().replace("_", ""))
        except ValueError:
            pass
    if isinstance(value, (str, float)) and not isinstance(value, bool):
        number = _to_float(value, where)  # "1e3" and 2000.0 are fine, 2.5 is not
        if number.is_integer():
            return int(number)
    raise ConfigError(f"{where} must be an integer, got {value!r}")
