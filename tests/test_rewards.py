"""Reward functions (issue 30, in progress): loaded by file or module name in TRL's signature, their
failures reported in one line naming the function, and the built-ins."""

import math

import pytest

from lmscale.errors import ConfigError, LmscaleError
from lmscale.rewards import (
    call_reward,
    exact_answer,
    format_regex,
    length_penalty,
    load_reward_function,
    normalise_answer,
)


def test_a_trl_style_function_loads_from_a_file_or_a_module(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "def shorter(prompts, completions, **kwargs):\n    return [-len(c) for c in completions]\n"
    )
    shorter = load_reward_function(f"{path}:shorter")
    assert call_reward("shorter", shorter, ["p", "q"], ["ab", "abc"], {}) == [-2.0, -3.0]
    assert load_reward_function("lmscale.rewards:exact_answer") is exact_answer
    for spec, problem in [
        ("no_colon", "write it as path/to/file.py:function"),
        (f"{tmp_path}/absent.py:f", "does not exist"),
        (f"{path}:longer", "has no function 'longer'"),
        ("lmscale.no_such_module:f", "cannot import lmscale.no_such_module"),
    ]:
        with pytest.raises(ConfigError, match=problem):
            load_reward_function(spec)


def test_a_function_that_fails_stops_the_run_naming_it():
    def raises(prompts, completions, **_):
        raise KeyError("answer")

    with pytest.raises(
        LmscaleError, match=r"reward function mine raised KeyError: 'answer' \(on a batch whose first"
    ):
        call_reward("mine", raises, ["2+2="], ["4"], {})
    with pytest.raises(LmscaleError, match="returned 1 values for 2 completions"):
        call_reward("mine", lambda prompts, completions, **_: [1.0], ["a", "b"], ["x", "y"], {})
    with pytest.raises(LmscaleError, match="returned 'good' for completion 0 .* return a number or None"):
        call_reward("mine", lambda prompts, completions, **_: ["good"], ["a"], ["x"], {})
    unsure = call_reward("mine", lambda prompts, completions, **_: [None, 1], ["a", "b"], ["x", "y"], {})
    assert math.isnan(unsure[0]) and unsure[1] == 1.0


def test_the_built_ins():
    assert [normalise_answer(t) for t in [" 1,000.50 ", "42.", "-0", "The  cat."]] == [
        "1000.5",
        "42",
        "0",
        "The cat",
    ]
    chat = [{"role": "assistant", "content": "1000"}]
    assert exact_answer(None, ["1,000", "999", chat], answer=[1000, "1000", "1000.0"]) == [1.0, 0.0, 1.0]
    assert format_regex(None, ["<think>a</think> <answer>4</answer>", "4"]) == [1.0, 0.0]
    assert format_regex(None, ["yes"], pattern="yes|no") == [1.0]
    assert length_penalty(None, ["x"] * 3, completion_ids=[[0] * 100, [0] * 224, [0] * 300]) == [
        -0.0,
        -0.5,
        -1.0,
    ]
