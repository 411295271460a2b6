"""Typed pass options parsed from ``k=v`` pipeline text.

Each pass declares a frozen dataclass subclassing :class:`Options`. Field types drive
parsing: ``bool`` accepts true/false/1/0/yes/no, ``int``/``float`` parse numbers,
``Literal[...]`` restricts the choices, ``tuple[str, ...]`` takes ``[a,b]`` lists, and
``str | None`` accepts ``none``.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin

from graphopt.errors import UsageError

T = TypeVar("T", bound="Options")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _format_value(value: Any) -> str:
    from graphopt.infra.pipeline_text import _format_value as format_text

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value)
    return format_text(str(value))


def _convert(raw: Any, annotation: Any, owner: str, key: str) -> Any:
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        non_none = [a for a in args if a is not type(None)]
        if isinstance(raw, str) and raw.lower() == "none" and type(None) in args:
            return None
        errors = []
        for candidate in non_none:
            try:
                return _convert(raw, candidate, owner, key)
            except UsageError as e:
                errors.append(str(e))
        raise UsageError(errors[-1] if errors else f"{owner}: bad value for {key!r}: {raw!r}")
    if origin is Literal:
        text = str(raw)
        for choice in args:
            if str(choice) == text:
                return choice
        choices = "|".join(str(a) for a in args)
        raise UsageError(f"{owner}: option {key}={text!r} is not one of {choices}")
    if origin is tuple:
        items = raw if isinstance(raw, (list, tuple)) else [raw]
        inner = args[0] if args else str
        return tuple(_convert(v, inner, owner, key) for v in items)
    if isinstance(raw, (list, tuple)):
        raise UsageError(f"{owner}: option {key} takes a single value, got a list")
    if annotation is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise UsageError(f"{owner}: option {key}={raw!r} is not a boolean (true/false)")
    if annotation is int:
        try:
            if isinstance(raw, bool):
                raise TypeError
            return int(str(raw), 0) if not isinstance(raw, int) else raw
        except (TypeError, ValueError):
            raise UsageError(f"{owner}: option {key}={raw!r} is not an integer") from None
    if annotation is float:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise UsageError(f"{owner}: option {key}={raw!r} is not a number") from None
    if annotation is str:
        return str(raw)
    return raw


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of every pass's options; subclasses are frozen dataclasses with defaults."""

    _owner: ClassVar[str] = "options"

    @classmethod
    def parse(cls: type[T], values: dict[str, Any], owner: str | None = None) -> T:  # noqa: PYI019
        """Builds options from raw text values, converting each by its field's type.

        Args:
            values: Raw values keyed by option name (strings, or lists of strings).
            owner: The pass name used in error messages.

        Raises:
            UsageError: An unknown option or a value of the wrong type.
        """
        who = owner or cls._owner
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            name = key.replace("-", "_")
            if name not in fields:
                known = ", ".join(sorted(fields)) or "none"
                raise UsageError(f"{who}: unknown option {key!r} (options: {known})")
            kwargs[name] = _convert(raw, hints[name], who, key)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise UsageError(f"{who}: {e}") from None

    def non_defaults(self) -> dict[str, Any]:
        """The options whose values differ from their defaults, in declaration order."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                factory: Any = f.default_factory
                default = factory()
            else:
                default = dataclasses.MISSING
            if value != default:
                out[f.name] = value
        return out

    def to_text(self) -> str:
        """``k=v,...`` for the non-default options (the inside of the parentheses)."""
        return ",".join(f"{k}={_format_value(v)}" for k, v in self.non_defaults().items())

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(name, type, default) for each option, for ``graphopt passes``."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            default: Any = f.default
            factory: Any = f.default_factory
            if default is dataclasses.MISSING and factory is not dataclasses.MISSING:
                default = factory()
            type_name = str(hints[f.name]).replace("typing.", "")
            rows.append((f.name, type_name, _format_value(default)))
        return rows


@dataclasses.dataclass(frozen=True)
class NoOptions(Options):
    """For passes that take no options."""
