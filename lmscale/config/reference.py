"""Every config key with its default and description, read from the typed config itself, so the list
(`lmscale config keys`, the "did you mean" of an unknown key, the README table's test) never drifts
from what the config accepts."""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


@dataclass(frozen=True)
class KeyInfo:
    key: str  # dotted, e.g. optim.lr; a list of sections shows as data.sources[].path
    default: Any
    description: str


def _sections_in(annotation: Any) -> list[tuple[type[BaseModel], bool]]:
    """The config sections an annotation holds: (section, inside a list)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, False)]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is list and args:
        return [(section, True) for section, _ in _sections_in(args[0])]
    if origin in (typing.Union, types.UnionType):
        return [found for arg in args for found in _sections_in(arg)]
    return []


def _default_of(field) -> Any:
    if field.default is not PydanticUndefined:
        return (
            field.default.model_dump(mode="json") if isinstance(field.default, BaseModel) else field.default
        )
    if field.default_factory is not None:
        value = field.default_factory()
        return value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return "(required)"


def config_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[KeyInfo]:
    """Every key of the config tree in declaration order: leaves, and optional sections with their keys."""
    if model is None:
        from lmscale.config import Config

        model = Config
    keys: list[KeyInfo] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{field.alias or name}"
        sections = _sections_in(field.annotation)
        always_present = sections and not sections[0][1] and field.default is not None
        if not always_present:
            keys.append(KeyInfo(dotted, _default_of(field), field.description or ""))
        for section, in_list in sections:
            keys += config_keys(section, f"{dotted}[]." if in_list else f"{dotted}.")
    return keys


def closest_key(unknown: str, known: list[str] | None = None) -> str | None:
    """The known dotted key an unknown one most likely meant: the same name in another section
    (data.lr for optim.lr), else a close spelling, else a close name in any section."""
    if known is None:
        keys = [info.key for info in config_keys()]
        sections = {key.rsplit(".", 1)[0] for key in keys if "." in key}  # `trian` is an unknown section
        known = keys + sorted(sections)
    by_leaf = {key.rsplit(".", 1)[-1]: key for key in known}
    leaf = unknown.rsplit(".", 1)[-1]
    if leaf in by_leaf:
        return by_leaf[leaf]
    matches = difflib.get_close_matches(unknown, known, n=1, cutoff=0.75)
    if matches:
        return matches[0]
    matches = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)
    return by_leaf[matches[0]] if matches else None


def print_config_keys() -> None:
    """`lmscale config keys`: every key, its default and its one-line description."""
    import json

    keys = config_keys()
    width = max(len(info.key) for info in keys)
    for info in keys:
        print(f"{info.key:<{width}}  {json.dumps(info.default)}  {info.description}")
