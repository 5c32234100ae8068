"""Optimizers, schedules and regularisation in real multi-rank runs; early stopping on a plateau."""

import json

import pytest
from helpers import REPO, run_lmscale

pytestmark = pytest.mark.slow

SHORT = [
    "model.preset=tiny-gpt2",
    "data.max_seq_len=64",
    "data.vocab_size=1024",
    "data.max_tokens_per_batch=1024",
    "train.max_steps=30",
    "schedule.warmup_steps=3",
    "train.eval_every=30",
    "train.eval_batches=4",
    "train.log_every=1",
    "data.num_workers=0",
    "wandb.mode=disabled",
    "precision=bf16",
]

# lr per optimizer: Lion and SGD want other scales than the Adam family. Plain AdamW under ZeRO-2 is
# tests/training/test_train.py's run through the deepspeed launcher already.
CASES = {
    "adafactor": "optim.name=adafactor optim.lr=3e-3",
    "lion": "optim.name=lion optim.lr=3e-4",
    "lamb": "optim.name=lamb optim.lr=1e-2",
    "sgd": "optim.name=sgd optim.lr=0.3 optim.momentum=0.9",
    # the regularisation and memory knobs together, under ZeRO-3
    "adamw-zero3-knobs": "optim.name=adamw optim.lr=3e-3 zero.stage=3 model.activation_checkpointing=true "
    "optim.layer_lr_decay=0.8 train.label_smoothing=0.1 schedule.name=wsd model.residual_dropout=0.05",
}


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", list(CASES))
def test_every_optimizer_trains_under_zero_on_two_ranks(tmp_path, cache_dir, case):
    out = tmp_path / "run"
    result = run_lmscale(
        "launch",
        "--gpus-per-node",
        "2",
        "zero.stage=2",
        *SHORT,
        *CASES[case].split(),
        f"output_dir={out}",
        f"data.cache_dir={cache_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [r["eval_loss"] for r in records(out) if "eval_loss" in r]
    losses = [r["loss"] for r in records(out) if "loss" in r]
    assert evals[-1] < evals[0] - 0.5, evals
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds.get("zero_allow_untested_optimizer", False) == (not case.startswith("adamw"))


def test_early_stopping_on_a_plateau_keeps_the_best_checkpoint(tmp_path, cache_dir):
    out = tmp_path / "run"
    result = run_lmscale(
        "train",
        *SHORT,
        "train.max_steps=100",
        "optim.lr=1e-7",
        "schedule.min_lr=0",
        "train.eval_every=5",
        "checkpoint.save_every=1000",
        "train.early_stopping.patience=2",
        "train.early_stopping.min_delta=0.05",
        f"output_dir={out}",
        f"data.cache_dir={cache_dir}",
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "early stopping at step 15" in result.stdout
    evals = {r["step"]: r["eval_loss"] for r in records(out) if "eval_loss" in r and r["step"] > 0}
    assert sorted(evals) == [5, 10, 15]
    best = min(evals, key=evals.get)
    assert (out / "checkpoints" / "best").read_text().strip() == f"step_{best:08d}"
    assert (
        out / "checkpoints" / f"step_{best:08d}" / "COMPLETE"
    ).is_file()  # the best is kept, whenever it was
    assert max(r["step"] for r in records(out)) == 15
