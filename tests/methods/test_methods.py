"""Training methods as plugins: each is one Method in lmscale.methods, and nothing else branches on its name."""

import math
import re
from pathlib import Path

import pytest

from lmscale.config import build_config
from lmscale.methods import (
    CLASSIFICATION,
    DPO,
    GRPO,
    METHODS,
    ORPO,
    REWARD,
    SFT,
    SIMPO,
    method_for,
    method_of_saved,
)

LMSCALE = Path(__file__).resolve().parents[2] / "lmscale"


@pytest.mark.parametrize(
    ("finetune", "method"),
    [
        ({}, SFT),
        ({"task": "classification"}, CLASSIFICATION),
        ({"method": "dpo"}, DPO),
        ({"method": "orpo"}, ORPO),
        ({"method": "simpo"}, SIMPO),
        ({"method": "reward"}, REWARD),
        ({"method": "grpo", "grpo": {"rewards": ["lmscale.rewards:exact_answer"]}}, GRPO),
    ],
)
def test_a_run_s_method_comes_from_its_config_and_its_saved_config(finetune, method):
    raw = {"finetune": finetune, "data": {"format": method.data_formats[0]}}
    assert method_for(build_config(raw).finetune) is method
    assert method_of_saved({"finetune": finetune}) is method
    assert method_of_saved(None) is SFT  # metrics copied without the run's files


def test_evaluation_lines_read_as_each_method_reads():
    assert SFT.describe_evaluation(2.0, {}, math.exp(2.0)) == "held-out loss 2.0000, perplexity 7.39"
    assert (
        CLASSIFICATION.describe_evaluation(0.5, {"accuracy": 0.75}, math.exp(0.5))
        == "held-out loss 0.5000, accuracy 0.750"
    )
    grpo = GRPO.describe_evaluation(-0.45, {"reward": 0.45, "completion_length": 3.0}, math.exp(-0.45))
    assert grpo == "held-out reward (greedy) 0.450, answer length 3.0"
    dpo = DPO.describe_evaluation(0.6, {"pref_accuracy": 0.8, "rewards_margin": 0.25}, math.exp(0.6))
    assert dpo == "held-out DPO loss 0.6000, preference accuracy 0.800, reward margin +0.250"


def test_every_method_is_complete():
    for name, method in METHODS.items():
        assert method.name == name and method.data_formats and method.key.startswith("finetune.")
        assert method.figures.summary_keys[0] == "eval_loss"
        assert method.perplexity == ("eval_ppl" in method.figures.summary_keys)
        if method.accuracy_metric:
            assert f"eval_{method.accuracy_metric}" in method.figures.summary_keys


def test_no_module_outside_the_registry_branches_on_a_method_s_name():
    """Adding a method is one module and one registry entry: no `finetune.method ==` elsewhere."""
    names = "|".join(METHODS)
    branch = re.compile(rf"""(finetune\.method|\bmethod)\s*[!=]=\s*["']({names})["']|"pref_accuracy" in""")
    found = [
        f"{path.relative_to(LMSCALE)}:{number}"
        for path in LMSCALE.rglob("*.py")
        if "methods" not in path.relative_to(LMSCALE).parts
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if branch.search(line)
    ]
    assert not found, found


def test_the_readme_table_says_what_each_method_combines_with():
    """The README's table of methods is each Method's own flags (data formats, tensor, sequence and expert
    parallelism, a reference pass), so it cannot drift from what the config accepts."""
    readme = (LMSCALE.parent / "README.md").read_text()
    rows = {
        cells[2].strip("`").split(": ")[1]: cells
        for line in readme.splitlines()
        if line.startswith("| ")
        and "`finetune." in line
        and len(cells := [c.strip() for c in line.split("|")]) > 8
    }
    yes = {True: "yes", False: "no"}
    for name, method in METHODS.items():
        cells = rows[name]
        assert cells[3] == ", ".join(f"`{f}`" for f in method.data_formats), name
        assert (cells[5], cells[6], cells[7], cells[8]) == (
            yes[method.tensor_parallel],
            yes[method.sequence_parallel],
            yes[method.expert_parallel],
            yes[method.needs_reference],
        ), name
