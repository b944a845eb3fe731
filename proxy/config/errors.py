"""Configuration errors: pydantic's validation errors turned into "file: key: rule" messages, here only."""

from __future__ import annotations

import collections.abc
import types
import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration value that breaks a rule; the message names file, key and rule."""


class Rule:
    """Field metadata: the rule a value breaks when it fails the field's type or range."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Rule({self.text!r})"


class KeyedRule(ValueError):
    """Raised by a validator for a key below the value it validates (``key`` is relative to it)."""

    def __init__(self, key: str, rule: str) -> None:
        super().__init__(rule)
        self.key = key


def validate(model: type[M], data: Any, file: str | None = None, prefix: str = "") -> M:
    """``model`` from ``data``, or a ConfigError naming ``file``, ``prefix`` + the key, and the rule.

    The ValidationError is not chained: it holds the input, which may carry secrets.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        messages = list(dict.fromkeys(_message(error, model, prefix) for error in exc.errors(include_url=False)))
        problems = "; ".join(f"{file}: {m}" if file else m for m in messages)
    raise ConfigError(problems)


def _message(error: Any, model: type[BaseModel], prefix: str) -> str:
    loc, kind = tuple(error["loc"]), error["type"]
    if kind == "extra_forbidden":
        keys, _, parent = _walk(model, loc[:-1])
        allowed = ", ".join(sorted(parent.model_fields)) if parent is not None else ""
        return f"{_key(prefix, [*keys, str(loc[-1])])}: unknown key (allowed: {allowed})"
    keys, rule, _ = _walk(model, loc)
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, KeyedRule):
        keys, text = [*keys, *filter(None, cause.key.split("."))], str(cause)
    elif isinstance(cause, ValueError):
        text = str(cause)
    elif rule is not None:
        text = rule
    elif kind in ("model_type", "dict_type", "model_attributes_type"):
        text = "must be a mapping"
    else:  # a shape no rule names: pydantic's own words
        text = error["msg"][:1].lower() + error["msg"][1:]
    return f"{_key(prefix, keys)}: {text}"


def _key(prefix: str, keys: list[str]) -> str:
    return (prefix + ".".join(keys)).rstrip(".") or "(top level)"


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[str], str | None, type[BaseModel] | None]:
    """The YAML keys along ``loc``, the rule of the innermost field reached, and the model there.

    Descends through model fields and mapping keys; a list index ends the walk (the field's rule
    covers its items).
    """
    keys: list[str] = []
    rule: str | None = None
    annotation: Any = model
    for part in loc:
        current = _model_in(annotation)
        if current is not None and part in current.model_fields:
            field = current.model_fields[part]
            keys.append(str(part))
            # Nested Annotated metadata is flattened, innermost first: the outermost Rule wins.
            rules = [m.text for m in field.metadata if isinstance(m, Rule)]
            rule = rules[-1] if rules else _rule_in(field.annotation)
            annotation = field.annotation
            continue
        values = _mapping_values(annotation)
        if values is None or isinstance(part, int):
            break
        keys.append(str(part))
        annotation, rule = values, _rule_in(values)
    return keys, rule, _model_in(annotation)


def _strip(annotation: Any) -> list[Any]:
    """The types an annotation may hold: Annotated and unions unwrapped."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _strip(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _strip(arg)]
    return [annotation]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    return next((t for t in _strip(annotation) if isinstance(t, type) and issubclass(t, BaseModel)), None)


def _mapping_values(annotation: Any) -> Any:
    for t in _strip(annotation):
        origin = typing.get_origin(t)
        if isinstance(origin, type) and issubclass(origin, collections.abc.Mapping):
            return typing.get_args(t)[1]
    return None


def _rule_in(annotation: Any) -> str | None:
    """A Rule in the Annotated metadata of ``annotation`` or of a union member."""
    if typing.get_origin(annotation) is typing.Annotated:
        rules = [m.text for m in annotation.__metadata__ if isinstance(m, Rule)]
        return rules[-1] if rules else _rule_in(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(filter(None, (_rule_in(a) for a in typing.get_args(annotation))), None)
    return None
