"""Typed configs: dataclasses with the paper's defaults, loaded from YAML presets.

A preset file holds one section per stage (`datagen:`, later `sft:` ...); `--set a.b=v`
overrides any field. Loading checks every key and value before any work starts and says which
key is wrong and what it may be.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class InputError(ValueError):
    """Bad input the user must fix; the CLI prints the message, not a traceback."""


class ConfigError(InputError):
    """A config that cannot run; the message names the key and what it may be."""


def check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def check_range(key: str, value: float, low: float | None = None, high: float | None = None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"between {low} and {high}" if low is not None and high is not None
                  else f">= {low}" if low is not None else f"<= {high}")
        raise ConfigError(f"{key}: {value} is out of range, must be {bounds}")


def check_choice(key: str, value: str, choices: typing.Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")


def _coerce(value: Any, kind: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        kind = next(o for o in options if o is not type(None))
        origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {kind.__name__} fields, got {value!r}")
        return from_dict(kind, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(kind)[:1]
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # NaN passes every range check, inf most of them
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build `cls` from a mapping: unknown keys, wrong types and invalid values are errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; {cls.__name__} has "
                          f"{', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(f"{prefix}{e}") from None
    return obj


def option(default: Any = dataclasses.MISSING, doc: str = "", *,
           factory: typing.Callable[[], Any] | None = None) -> Any:
    """A config field with its one-line doc, which `apr config show` prints beside the
    default (as TRL's configs carry metadata={"help": ...}). `factory` for lists and mappings."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


@dataclasses.dataclass(frozen=True)
class Key:
    """One leaf of a config: its dotted name, type, value (the default, or as loaded) and doc."""

    name: str
    type: str
    value: Any
    doc: str


def _type_name(kind: Any) -> str:
    if isinstance(kind, type) and typing.get_origin(kind) is None:
        return kind.__name__
    return str(kind).replace("typing.", "")


def config_keys(config: Any, prefix: str = "") -> list[Key]:
    """Every key of a config class (with its defaults) or instance (with its values),
    nested dataclasses flattened to dotted names such as `problems.train_size`."""
    cls = config if isinstance(config, type) else type(config)
    hints = typing.get_type_hints(cls)
    out: list[Key] = []
    for f in dataclasses.fields(cls):
        if not isinstance(config, type):
            value = getattr(config, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = dataclasses.MISSING
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            nested = value if dataclasses.is_dataclass(value) else kind
            out += config_keys(nested, f"{prefix}{f.name}.")
        else:
            out.append(Key(prefix + f.name, _type_name(kind), value, f.metadata.get("doc", "")))
    return out


def format_value(value: Any) -> str:
    """A value as YAML reads it back, so that it can be pasted into `--set key=VALUE`."""
    if value is dataclasses.MISSING:
        return "(required)"
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip()
    return text.removesuffix("...").strip()


def show(config: Any) -> str:
    """`key  value  # doc`, one aligned line per key of a config class or instance."""
    rows = [(k.name, format_value(k.value), k.doc) for k in config_keys(config)]
    if not rows:
        return ""
    name_width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    return "".join(f"{n:<{name_width}}  {v:<{value_width}}  # {d}\n" if d
                   else f"{n:<{name_width}}  {v}\n" for n, v, d in rows)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (line and column, 1-based)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def apply_override(data: dict, assignment: str) -> None:
    """Apply `a.b.c=value` (value read as YAML: 3, 0.5, true, mult) to a nested mapping."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. problems.train_size=1000")
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {assignment!r}: {key.strip()}: the value is not valid YAML "
                          f"({_yaml_problem(e)})") from None


PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name_or_path: str | Path) -> Path:
    """A preset name (`local`, `gpu-small`, `paper`: apr/presets/NAME.yaml) or a YAML path."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if (PRESETS_DIR / f"{name_or_path}.yaml").is_file():
        return PRESETS_DIR / f"{name_or_path}.yaml"
    raise ConfigError(f"config {str(name_or_path)!r} is neither a file nor a preset "
                      f"({', '.join(presets())})")


def load(cls: type[T], path: str | Path | None, section: str,
         overrides: typing.Sequence[str] = ()) -> T:
    """The `section` of a preset (name or file; the defaults when None), plus overrides."""
    data: dict = {}
    if path is not None:
        path = preset_path(path)
        try:
            document = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot be read: {e}") from None
        if not isinstance(document, dict):
            raise ConfigError(f"{path}: expected a mapping of stage sections")
        data = document.get(section) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(cls, data, section)


def dump(obj: Any, section: str) -> str:
    return yaml.safe_dump({section: to_dict(obj)}, sort_keys=False)
