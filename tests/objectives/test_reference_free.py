"""ORPO and SimPO without processes: each loss and its logged rewards equal TRL's (ORPOTrainer,
CPOTrainer with loss_type="simpo") on the same tiny model and batch, and a 1% change of a parameter shows."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from test_dpo import fixed_batch, tiny_model

from lmscale.config import OrpoConfig, SimpoConfig, build_config
from lmscale.errors import ConfigError
from lmscale.evaluation.held_out import ModelForward
from lmscale.methods import method_for, method_problems
from lmscale.objectives.reference_free import orpo_objective, simpo_objective


def trl_batch(batch) -> dict[str, torch.Tensor]:
    """Our pair batch (chosen rows, then rejected) as TRL's preference trainers take it."""
    pairs = batch.pairs
    halves = {"chosen": slice(0, pairs), "rejected": slice(pairs, 2 * pairs)}
    return {
        f"{side}_{name}": batch[key][rows]
        for side, rows in halves.items()
        for name, key in (
            ("input_ids", "input_ids"),
            ("attention_mask", "attention_mask"),
            ("labels", "labels"),
        )
    }


def trl_trainer(kind: str, settings, processing_class, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    records = Dataset.from_list([{"prompt": "w1", "chosen": "w2", "rejected": "w3"}] * 2)
    common = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, max_length=64)
    if kind == "orpo":
        args, trainer_class = ORPOConfig(beta=settings.beta, **common), ORPOTrainer
    else:
        args = CPOConfig(
            loss_type="simpo", cpo_alpha=0.0, beta=settings.beta, simpo_gamma=settings.gamma, **common
        )
        trainer_class = CPOTrainer
    return trainer_class(
        model=tiny_model(), args=args, train_dataset=records, processing_class=processing_class
    )


CASES = {
    "orpo": (OrpoConfig(beta=0.25), orpo_objective),
    "simpo": (SimpoConfig(beta=2.5, gamma=1.2), simpo_objective),
}


@pytest.mark.parametrize("kind", CASES)
def test_the_loss_and_rewards_equal_trl_on_the_same_model_and_batch(kind, tokenizer, tmp_path):
    settings, objective = CASES[kind]
    model, batch = tiny_model(), fixed_batch(tokenizer)
    with torch.no_grad():
        ours = objective(settings)(ModelForward(model), batch)
        trainer = trl_trainer(kind, settings, tokenizer, tmp_path)
        theirs, metrics = trainer.get_batch_loss_metrics(model, trl_batch(batch))
    pairs = batch.pairs
    mean = {name: float(value) / pairs for name, value in ours.sums.items()}
    assert float(ours.summed) / ours.targets == pytest.approx(float(theirs), abs=1e-5)
    assert mean["rewards_chosen"] == pytest.approx(float(metrics["rewards/chosen"]), abs=1e-5)
    assert mean["rewards_rejected"] == pytest.approx(float(metrics["rewards/rejected"]), abs=1e-5)
    assert mean["rewards_margin"] == pytest.approx(float(metrics["rewards/margins"]), abs=1e-5)
    if kind == "orpo":
        assert mean["nll_loss"] == pytest.approx(float(metrics["nll_loss"]), abs=1e-5)
        assert mean["log_odds_ratio"] == pytest.approx(float(metrics["log_odds_ratio"]), abs=1e-5)
    # The test would notice a 1% change of any parameter.
    for field in type(settings).model_fields:
        changed = settings.model_copy(update={field: getattr(settings, field) * 1.01})
        with torch.no_grad():
            moved = objective(changed)(ModelForward(model), batch)
        assert abs(float(moved.summed) / moved.targets - float(theirs)) > 1e-5, field


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_reference_free_methods_train_on_pairs_and_say_so_in_one_line(method):
    raw = {"finetune": {"method": method}, "data": {"format": "preference", "max_seq_len": 128}}
    config = build_config(raw)
    method_plugin = method_for(config.finetune)
    assert method_plugin.name == method and not method_plugin.needs_reference and method_plugin.objective
    assert method_problems(config) == []
    with pytest.raises(ConfigError, match=f"finetune.method={method} trains on data.format preference: set "):
        build_config({**raw, "data": {"format": "text"}})
    with pytest.raises(
        ConfigError, match=f"train.label_smoothing applies to cross-entropy, not finetune.method={method}"
    ):
        build_config({**raw, "train": {"label_smoothing": 0.1}})
