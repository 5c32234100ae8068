"""Loading a config: YAML recipe + dotted overrides -> a validated Config; and writing it back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lmscale.config.run import Config
from lmscale.config.training import CheckpointConfig, OptimConfig, ScheduleConfig
from lmscale.errors import ConfigError
from lmscale.resources import find_file


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into (['a', 'b'], value), parsing the value as YAML (so 3 is an int)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not key=value: write it as e.g. optim.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted override into the nested dict `raw` (in place) and return it."""
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section; check the key name")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe into a dict (safe_load: a recipe cannot run code); a shipped recipe's name
    (configs/gpt2-124m.yaml) works from any directory."""
    path = find_file(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist: pass an existing YAML, e.g. configs/tiny-cpu.yaml"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where} is not valid YAML: fix the syntax there") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(raw).__name__}")
    return raw


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted leaf key: value}; an empty section counts as a leaf."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def dotted_keys(raw: dict[str, Any]) -> set[str]:
    """All leaf keys of a nested dict, dotted: the keys a user set explicitly."""
    return set(flatten(raw))


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "config"
    if error["type"] == "extra_forbidden":
        from lmscale.config.reference import closest_key

        guess = closest_key(key)
        hint = f"did you mean {guess}?" if guess else "remove it"
        return f"{key}: unknown key; {hint} (lmscale config keys lists them all)"
    if error["type"] == "value_error":
        return error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    return f"{key}={got!r}: {error['msg'][0].lower()}{error['msg'][1:]}"


# Keys that moved to the section of their concern: the old spelling is an error that names the new one.
MOVED_KEYS = {
    "train.optimizer": "optim.name",
    "train.scheduler": "schedule.name",
    **{f"train.{key}": f"optim.{key}" for key in OptimConfig.model_fields if key != "name"},
    **{f"train.{key}": f"schedule.{key}" for key in ScheduleConfig.model_fields if key != "name"},
    **{f"train.{key}": f"checkpoint.{key}" for key in CheckpointConfig().model_dump()},
}


def moved_key_problems(raw: dict[str, Any]) -> list[str]:
    section = raw.get("train")
    if not isinstance(section, dict):
        return []
    moved = [f"train.{key}" for key in section if f"train.{key}" in MOVED_KEYS]
    return [f"{old} is now {MOVED_KEYS[old]}: rename it" for old in moved]


def saved_config(raw: dict[str, Any]) -> Config:
    """A config lmscale wrote (a run's config.yaml, an export's lmscale.yaml): keys it wrote under `train`
    before the optim/schedule/checkpoint sections existed are moved to them, not refused."""
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in (raw or {}).items()}
    for old, new in MOVED_KEYS.items():
        key = old.split(".")[1]
        if key in raw.get("train", {}):
            section, name = new.split(".")
            raw.setdefault(section, {})[name] = raw["train"].pop(key)
    return build_config(raw)


def build_config(raw: dict[str, Any]) -> Config:
    """Validate a nested dict into a Config, collecting every problem into one ConfigError."""
    moved = moved_key_problems(raw)
    if moved:
        raise ConfigError(f"invalid config: {'; '.join(moved)}")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"invalid config: {problems}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> tuple[Config, set[str]]:
    """Load a recipe (or the defaults) with overrides; return the config and the keys set explicitly."""
    raw = read_yaml(path) if path else {}
    apply_overrides(raw, list(overrides))
    return build_config(raw), dotted_keys(raw)


def config_to_yaml(config: Config) -> str:
    """The resolved config as YAML, in the order the fields are declared."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
