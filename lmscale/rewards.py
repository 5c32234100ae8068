"""Reward functions for online RL (GRPO): loading them by name, calling them with TRL's signature, and
lmscale's built-ins.

A reward function is `f(prompts, completions, **fields) -> list[float | None]`, TRL's signature, so reward
functions written for TRL work unchanged: `prompts` and `completions` are strings (or message lists for chat
data), `fields` are the records' other fields, one list each. None means the function cannot judge that
completion (another function may). `finetune.grpo.rewards` names them as `path/to/file.py:name` or
`package.module:name`; the built-ins below are `lmscale.rewards:exact_answer`, `...:format_regex` and
`...:length_penalty`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lmscale.errors import ConfigError, LmscaleError

RewardFunction = Callable[..., list[float | None]]


def load_reward_function(spec: str) -> RewardFunction:
    """The function `spec` names (`file.py:name` or `module:name`), or a one-line error saying what is wrong."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ConfigError(
            f"reward function {spec!r}: write it as path/to/file.py:function or package.module:function"
        )
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise ConfigError(f"reward function {spec!r}: {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"lmscale_rewards_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ConfigError(f"reward function {spec!r}: cannot import {where} ({exc})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"reward function {spec!r}: {where} has no function {name!r}")
    return function


def reward_name(spec: str) -> str:
    """A reward function's name in figures: the function's own name (`reward/exact_answer`)."""
    return spec.rpartition(":")[2]


def load_rewards(specs: list[str]) -> list[tuple[str, RewardFunction]]:
    """(spec, function) of each named reward function; two with the same function name are refused (their
    figures would share a name)."""
    names = [reward_name(spec) for spec in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(
            f"finetune.grpo.rewards names two functions called {repeated[0]!r}: give them different names"
        )
    return [(spec, load_reward_function(spec)) for spec in specs]


def call_reward(
    spec: str, function: RewardFunction, prompts: Sequence, completions: Sequence, fields: dict[str, list]
) -> list[float]:
    """One function's rewards for the completions (NaN where it returned None); a function that raises, or
    returns the wrong number or kind of values, stops the run naming it and the first record concerned."""
    try:
        values = function(prompts=list(prompts), completions=list(completions), **fields)
    except Exception as exc:  # a user's function: any failure is theirs to see, in one line
        raise LmscaleError(
            f"reward function {spec} raised {type(exc).__name__}: {exc} (on a batch whose first prompt is "
            f"{_excerpt(prompts[0])})"
        ) from None
    if not isinstance(values, list | tuple) or len(values) != len(completions):
        count = len(values) if isinstance(values, list | tuple) else type(values).__name__
        raise LmscaleError(
            f"reward function {spec} returned {count} values for {len(completions)} completions"
        )
    rewards = []
    for index, value in enumerate(values):
        if value is not None and not isinstance(value, int | float):
            raise LmscaleError(
                f"reward function {spec} returned {value!r} for completion {index} (prompt "
                f"{_excerpt(prompts[index])}): return a number or None"
            )
        rewards.append(math.nan if value is None else float(value))
    return rewards


def _excerpt(value: Any, limit: int = 60) -> str:
    text = value[-1].get("content", "") if isinstance(value, list) and value else str(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def completion_text(completion: Any) -> str:
    """A completion as text: a string, or the content of a chat completion's last message."""
    if isinstance(completion, list):
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


NUMBER = re.compile(r"[-+]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?")


def normalise_answer(text: str) -> str:
    """An answer compared as a person would: surrounding space and a final full stop dropped, inner space
    collapsed, and a number written in its plainest form (1,000.50 -> 1000.5; -0 -> 0)."""
    text = " ".join(text.strip().split()).rstrip(".")
    if NUMBER.fullmatch(text):
        value = float(text.replace(",", ""))
        return str(int(value)) if value.is_integer() else repr(value)
    return text


def exact_answer(prompts, completions, answer, **_) -> list[float]:
    """1 where the completion, normalised, is the record's `answer` field, normalised; else 0."""
    return [
        float(normalise_answer(completion_text(c)) == normalise_answer(str(a)))
        for c, a in zip(completions, answer, strict=True)
    ]


def format_regex(prompts, completions, pattern: str = r"(?s)<think>.*</think>\s*<answer>.*</answer>\s*", **_):
    """1 where the whole completion matches `pattern` (by default: reasoning in <think>, then an <answer>)."""
    compiled = re.compile(pattern)
    return [float(compiled.fullmatch(completion_text(c)) is not None) for c in completions]


def length_penalty(prompts, completions, completion_ids=None, max_length: int = 256, soft: int = 64, **_):
    """DAPO's overlong penalty: 0 up to max_length - soft tokens, then falling linearly to -1 at max_length
    (characters when the completions' token ids are not given)."""
    lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else [
        len(completion_text(c)) for c in completions
    ]  # fmt: skip
    return [
        0.0 - min(1.0, max(0.0, (length - (max_length - soft)) / soft)) for length in lengths
    ]  # 0, not -0.0
