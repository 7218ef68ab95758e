"""Recipe machinery: YAML, `extends:`, dotted overrides and typed validation of registered sections.

This module knows no family, trainer or layer. Each recipe section (`run`, `model`, `data`, `train`,
`optim`, `parallel`, `precision`, `checkpoint`, `logging`, `rl`) is registered by the layer that owns
it (`register_section`), as a dataclass or as a resolver that picks one (the `model:` section is the
family's config class, chosen by `model.name`). Checks that span sections are registered by their
owner too (`register_check`) and run right after the sections are built, before any work starts.

`extends: other.yaml` deep-merges the recipe over another (paths relative to the recipe),
`plugins: [module, file.py]` imports user modules that register their own families, trainers or
sections, and `key.sub=value` overrides from the command line are applied last, their values parsed
as YAML scalars. Every problem is a ConfigError whose message starts with the dotted key (or the
file) and says what was expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml

from keel.errors import ConfigError

# The order sections are written in (config.yaml); sections registered by plugins follow.
CANONICAL_ORDER = ("run", "model", "data", "train", "optim", "parallel", "precision", "checkpoint",
                   "logging", "rl")


@dataclass
class Section:
    name: str
    # raw mapping (or None when absent), dotted key -> the section's object (None if optional and absent)
    resolve: Callable[[Any, str], Any]
    optional: bool = False  # absent from a recipe: None (rl); else built from its defaults
    schema: Optional[type] = None  # the dataclass, where the section is one (for key references)
    provides_data: bool = False  # a recipe with this section trains on what it names, not data.sources


SECTIONS: dict[str, Section] = {}
CHECKS: list[Callable[["Config"], None]] = []


def register_section(name: str, schema: Optional[type] = None, *, resolve: Optional[Callable] = None,
                     optional: bool = False, provides_data: bool = False) -> None:
    """Register a top-level recipe section: a dataclass (validated field by field, then its own
    `validate()` if it has one) or a resolver `(raw, key) -> object` for sections chosen by a name."""
    if resolve is None:
        if schema is None:
            raise TypeError(f"section {name!r}: give a dataclass or a resolver")
        resolve = lambda raw, key: build_validated(schema, raw, key)  # noqa: E731
    SECTIONS[name] = Section(name, resolve, optional, schema, provides_data)


def register_check(check: Callable[["Config"], None]) -> Callable:
    """Register a check across sections, run on every loaded recipe (usable as a decorator)."""
    if check not in CHECKS:
        CHECKS.append(check)
    return check


def choose(key: str, value, names) -> None:
    """Refuse `value` unless it is one of `names` (a registry), with a did-you-mean."""
    names = sorted(names)
    if value not in names:
        close = difflib.get_close_matches(str(value), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: unknown name {value!r}{hint}; expected one of {names}")


class Config:
    """A loaded recipe: one attribute per registered section (None for an absent optional one)."""

    def __init__(self, sections: dict):
        for name, value in sections.items():
            setattr(self, name, value)

    def __eq__(self, other) -> bool:
        return isinstance(other, Config) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"Config({', '.join(vars(self))})"

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for name, v in vars(self).items()}


# ---------------------------------------------------------------- YAML, extends, overrides

def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping of sections")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_raw(path: Path, _seen: tuple = ()) -> dict:
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: `extends` forms a cycle")
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"extends: expected a recipe path, got {parent!r} in {path}")
    return deep_merge(load_raw(path.parent / parent, _seen + (path,)), data)


def apply_override(raw: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"{override}: an override must look like key.sub=value")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{override}: an override must look like key.sub=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is a value, not a section; cannot set {key}")
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------- typed validation

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(value, tp, key: str):
    """Check `value` against type `tp` and return it converted (ints for floats, dataclasses)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:  # Optional[X]: X's own error names the bad key inside it
            return coerce(value, candidates[0], key)
        for arg in candidates:
            try:
                return coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads off/no as false and on/yes as true: take the word back
            words = [w for w in (("off", "no", "false") if not value else ("on", "yes", "true"))
                     if w in typing.get_args(tp)]
            value = words[0] if words else value
        if value not in typing.get_args(tp):
            close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp} at {key}")


def build_dataclass(cls, data, key: str = ""):
    """Build dataclass `cls` from a mapping, refusing unknown keys with a did-you-mean."""
    prefix = f"{key}." if key else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for name, value in data.items():
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{prefix}{name}: unknown key{hint}")
        kwargs[name] = coerce(value, hints[name], f"{prefix}{name}")
    return cls(**kwargs)


def build_validated(cls, data, key: str):
    """A dataclass section built from `data` and checked by its own `validate()` method."""
    obj = build_dataclass(cls, data, key)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def import_plugins(plugins, recipe_dir: Path) -> None:
    """Import the modules a recipe names under `plugins:` (module names, or .py files relative to the
    recipe) so that what they register (a family, a trainer, a section) is known before validation."""
    if plugins is None:
        return
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError(f"plugins: expected a list of module names or .py files, got {plugins!r}")
    for i, plugin in enumerate(plugins):
        key = f"plugins[{i}]"
        if plugin.endswith(".py"):
            path = (recipe_dir / plugin).resolve()
            if not path.is_file():
                raise ConfigError(f"{key}: {path}: no such file")
            name = f"keel_plugin_{path.stem}"
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            try:
                importlib.import_module(plugin)
            except ModuleNotFoundError as e:
                raise ConfigError(f"{key}: cannot import {plugin!r} ({e})") from None


def config_from_dict(raw: dict, recipe_dir: Path = Path(".")) -> Config:
    """Build and check every registered section of a merged recipe mapping."""
    raw = dict(raw)
    plugins = raw.pop("plugins", None)
    import_plugins(plugins, recipe_dir)
    for name in raw:
        if name not in SECTIONS:
            close = difflib.get_close_matches(str(name), list(SECTIONS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{name}: unknown key{hint}")
    ordered = [n for n in CANONICAL_ORDER if n in SECTIONS] + [n for n in SECTIONS if n not in CANONICAL_ORDER]
    sections = {}
    for name in ordered:
        section = SECTIONS[name]
        value = raw.get(name)
        sections[name] = None if value is None and section.optional else section.resolve(value, name)
    if plugins:  # kept, as absolute paths, so that a saved config.yaml loads on its own
        sections["plugins"] = [str((recipe_dir / p).resolve()) if p.endswith(".py") else p for p in plugins]
    cfg = Config(sections)
    for check in CHECKS:
        check(cfg)
    return cfg


def load_recipe(path, overrides: Optional[list[str]] = None) -> Config:
    """Load, merge, override and validate a recipe; raise ConfigError naming any bad key.
    The sections must be registered first: `keel.load_recipe` imports every layer that owns one."""
    raw = load_raw(Path(path))
    for override in overrides or []:
        apply_override(raw, override)
    return config_from_dict(raw, Path(path).resolve().parent)


def save_resolved(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
