"""Shared machinery of the dataclass configs: strict, type-checked ``from_dict`` / ``to_dict`` and YAML I/O.

Every component has a dataclass config that maps one-to-one onto a YAML mapping. ``from_dict`` is
the one place where user values enter a config, so it checks each of them against its field's
annotation: unknown keys are refused with a suggestion, values are coerced where the intent is
unambiguous (PyYAML reads ``1e-4`` as a string; ``64.0`` is the integer 64) and refused otherwise
(``steps: 20.5``, ``k: true``, ``seed: null``), with a message naming the section, key, value and
expected type. Nested configs (a field whose type is another config) are read recursively.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar, Union

import yaml

from mneme_plugin.errors import ConfigError

T = TypeVar("T", bound="ConfigMixin")

_HINTS: dict[type, dict[str, Any]] = {}


@dataclasses.dataclass(frozen=True)
class AtLeast:
    """A lower bound on a number field, as ``Annotated`` metadata (checked by ``from_dict``)."""

    minimum: float
    why: str = ""


# Random generators (numpy, torch) refuse negative seeds: refused here, with the key named, instead.
Seed = Annotated[int, AtLeast(0, "random generators refuse negative seeds")]


def _field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each dataclass field (cached per class), ``Annotated`` bounds kept."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls, include_extras=True)
    return _HINTS[cls]


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Annotated:
        inner, *extras = typing.get_args(tp)
        bounds = [f" >= {e.minimum:g}" + (f" ({e.why})" if e.why else "") for e in extras if isinstance(e, AtLeast)]
        return _type_name(inner) + "".join(bounds)
    if isinstance(tp, type) and issubclass(tp, ConfigMixin):
        return "a mapping"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, set, frozenset):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}.get(
        tp, getattr(tp, "__name__", str(tp)))


class _Mismatch(Exception):
    """A value that does not fit an annotation (turned into a ConfigError naming the key)."""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` as annotation ``tp``, or raise _Mismatch."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    if origin is Annotated:
        inner, *extras = typing.get_args(tp)
        value = _coerce(value, inner, where)
        for extra in extras:
            if isinstance(extra, AtLeast) and value is not None and value < extra.minimum:
                raise _Mismatch
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise _Mismatch
        # An exact match first, so `int | str` keeps "4" a string and 4 an int.
        for option in options:
            if option is not type(None) and isinstance(option, type) and type(value) is option:
                return value
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch
    if origin in (list, tuple, set, frozenset):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin is tuple and len(args) > 1 and len(args) == len(typing.get_args(tp)):
            if len(value) != len(args):
                raise _Mismatch
            return tuple(_coerce(v, a, where) for v, a in zip(value, args))
        item = args[0] if args else Any
        items = [_coerce(v, item, where) for v in value]
        return origin(items) if origin is not list else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        args = typing.get_args(tp)
        if len(args) == 2:  # values checked like fields (a mapping of nested configs is read recursively)
            return {k: _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, ConfigMixin):
        if isinstance(value, tp):
            return value
        return tp.from_dict(value, section=where)  # None is an empty mapping; a non-mapping is refused there
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    number = float(value)
                except ValueError:
                    raise _Mismatch from None
                if number.is_integer():
                    return int(number)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise _Mismatch from None
        else:
            raise _Mismatch
        if math.isnan(number):
            raise _Mismatch
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):  # a path given from Python to a field that holds one as text
            return os.fspath(value)
        raise _Mismatch
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _Mismatch
    return value


def _missing_required(cls: type, given: set[str]) -> list[str]:
    return [
        f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.init and f.name not in given
        and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]


def _default(field: dataclasses.Field) -> Any:  # type: ignore[type-arg]
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return field.default


class ConfigMixin:
    """Mixin for dataclass configs: strict, type-checked dict / YAML round-trips.

    ``runtime_fields`` names the fields that say where or how fast a stage runs (device, batch
    sizes of forward passes, concurrency) but not what it computes: ``result_dict`` leaves them
    out, so ``mneme run`` does not redo finished work when only they change. ``later_fields`` names
    fields added after runs were fingerprinted: ``result_dict`` leaves them out while they hold their
    default (what every earlier run did), so those runs are not redone either.
    """

    runtime_fields: ClassVar[tuple[str, ...]] = ()
    later_fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A config built in Python (`TrainingConfig(steps=20.5)`) is checked as `from_dict` checks a YAML one:
        # its field types first, then the class's own `__post_init__` (its ranges and relations).
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None and hasattr(cls, "__post_init__"):
            return  # inherited from a config class, which checks already

        def __post_init__(self: Any) -> None:
            self._check_field_types()
            if own is not None:
                own(self)

        cls.__post_init__ = __post_init__  # type: ignore[attr-defined]

    def _check_field_types(self) -> None:
        """Each field's value as its annotation says (numbers given as strings read as numbers, nested
        configs given as mappings built), or ConfigError naming the field, the value and the type."""
        hints = _field_types(type(self))
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            if not field.init:
                continue
            value = getattr(self, field.name)
            tp = hints.get(field.name, Any)
            try:
                coerced = _coerce(value, tp, field.name)
            except _Mismatch:
                raise ConfigError(f"{type(self).__name__}.{field.name} = {value!r} ({type(value).__name__}): "
                                  f"expected {_type_name(tp)}.") from None
            if coerced is not value:
                object.__setattr__(self, field.name, coerced)

    def to_dict(self) -> dict[str, Any]:
        return {field.name: _plain(getattr(self, field.name)) for field in dataclasses.fields(self)}  # type: ignore[arg-type]

    def result_dict(self) -> dict[str, Any]:
        """``to_dict`` without the runtime fields, nor the later fields at their default (recursively):
        what decides the stage's results."""
        out = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if field.name in self.runtime_fields or (field.name in self.later_fields and value == _default(field)):
                continue
            out[field.name] = _result(value)
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None, *, section: str | None = None) -> T:
        """Build the config from a mapping (a YAML section), checking every key and value.

        ``section`` names the mapping in error messages (``harvest``, ``explain.client``).
        """
        where = section or cls.__name__
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{where} must be a mapping of keys to values, got {type(data).__name__} {data!r}."
            )
        known = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known), key=str)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), known, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"Unknown key(s) in {where}: {', '.join(hints)}. Known keys: {', '.join(sorted(known))}.")
        missing = _missing_required(cls, set(data))
        if missing:
            raise ConfigError(f"{where} lacks the required key(s) {', '.join(missing)}.")
        hints_by_name = _field_types(cls)
        values = {}
        for key, value in data.items():
            tp = hints_by_name.get(key, Any)
            child = f"{section}.{key}" if section else key
            try:
                values[key] = _coerce(value, tp, child)
            except _Mismatch:
                raise ConfigError(
                    f"{where}.{key} = {value!r} ({type(value).__name__}): expected {_type_name(tp)}."
                ) from None
        try:
            return cls(**values)
        except ConfigError as err:
            if section and not str(err).startswith(f"[{section}]"):
                raise ConfigError(f"[{section}] {err}") from err
            raise

    @classmethod
    def of(cls: type[T], value: Any) -> T:
        """``value`` when it is this config, else the config ``from_dict`` builds from it (a mapping; None: the
        defaults): what the stage functions take, as YAML sections map onto their configs."""
        return value if isinstance(value, cls) else cls.from_dict(value)

    def replace(self: T, **changes: Any) -> T:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    @classmethod
    def from_yaml(cls: type[T], path: str | Path) -> T:
        return cls.from_dict(read_yaml_mapping(path))


def _result(value: Any) -> Any:
    """A value as ``result_dict`` sees it: nested configs (also inside mappings) without their runtime fields."""
    if isinstance(value, ConfigMixin):
        return value.result_dict()
    if isinstance(value, dict):
        return {k: _result(v) for k, v in value.items()}
    return _plain(value)


def _plain(value: Any) -> Any:
    """A config value as plain YAML / JSON data."""
    if isinstance(value, ConfigMixin):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping holding one key twice (PyYAML alone keeps the last value without a word)."""

    def __init__(self, key: Any, first: yaml.Mark, second: yaml.Mark) -> None:
        super().__init__(f"key {key!r} appears twice in one mapping (lines {first.line + 1} and {second.line + 1}); "
                         "YAML would keep only the last: give it once")
        self.key = key


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (``DuplicateKeyError``).

    A key set by a merge (``<<: *anchor``) may still be overridden in the mapping, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the constructor below says so
                continue
            if first is not None:
                raise DuplicateKeyError(key, first, key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses keys given twice in one mapping (``DuplicateKeyError``)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file holding a mapping (an empty file is an empty mapping), with clear errors."""
    path = Path(path)
    try:
        data = load_yaml(path.read_text())
    except DuplicateKeyError as err:
        raise ConfigError(f"Config file {path}: {err}.") from err
    except FileNotFoundError as err:
        raise ConfigError(f"Config file {path} does not exist.") from err
    except IsADirectoryError as err:
        raise ConfigError(f"Config file {path} is a directory; give a YAML file.") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"Config file {path} is not UTF-8 text: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping, got {type(data).__name__}.")
    return data


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds (used in ``__post_init__``)."""
    if not condition:
        raise ConfigError(message)
