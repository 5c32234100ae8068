"""Mixture-of-experts presets in real jobs: the experts partitioned by ZeRO like any weight, the router's
load-balancing loss logged and trained, held-out loss falling."""

import json

import pytest
from helpers import run_lmscale

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("preset", "zero", "ranks"), [("tiny-mixtral", 3, 2), ("tiny-qwen3-moe", 2, 2), ("tiny-qwen3-moe", 0, 1)]
)
def test_mixture_of_experts_presets_train_under_zero(tmp_path, cache_dir, preset, zero, ranks):
    out = tmp_path / "run"
    command = ["launch", "--gpus-per-node", str(ranks)] if ranks > 1 else ["train"]
    result = run_lmscale(
        *command, f"output_dir={out}", f"data.cache_dir={cache_dir}", f"model.preset={preset}",
        f"zero.stage={zero}", "data.max_seq_len=64", "data.vocab_size=1024", "data.max_tokens_per_batch=1024",
        "train.max_steps=20", "schedule.warmup_steps=2", "train.eval_every=20", "train.eval_batches=2",
        "train.log_every=10", "data.num_workers=0", "wandb.mode=disabled", timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "router_aux_loss" in r]
    # balanced routing gives aux_loss = top-k (2) x ... ~ 2; it must be there, finite, and not blow up
    assert len(logged) == 2 and all(0 < r["router_aux_loss"] < 4 for r in logged)
    evaluations = [r for r in records if "eval_loss" in r]
    assert evaluations[-1]["eval_loss"] < evaluations[0]["eval_loss"] - 1.0
    assert "eval_router_aux_loss" in evaluations[-1]
