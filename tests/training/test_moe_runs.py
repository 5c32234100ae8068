"""A mixture-of-experts preset learning in bf16 (torch's grouped matmul, which wants 16-byte strides in 16-bit
precision), its experts split between two ranks (AutoEP) and partitioned by ZeRO-3. Data parallelism alone,
fp32 parity and the other ZeRO stages: tests/parallel/test_expert_parallel_runs.py."""

import json

import pytest
from helpers import run_lmscale

pytestmark = pytest.mark.slow


def test_qwen3_moe_learns_in_bf16_with_its_experts_split_under_zero_3(tmp_path, cache_dir):
    out = tmp_path / "run"
    result = run_lmscale(
        "launch", "--gpus-per-node", "2", f"output_dir={out}", f"data.cache_dir={cache_dir}",
        "model.preset=tiny-qwen3-moe", "parallel.expert=2", "zero.stage=3", "precision=bf16",
        "data.max_seq_len=64", "data.vocab_size=1024", "data.max_tokens_per_batch=1024",
        "train.max_steps=20", "schedule.warmup_steps=2", "train.eval_every=20", "train.eval_batches=2",
        "train.log_every=10", "data.num_workers=0", "wandb.mode=disabled", timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 data-parallel rank(s), experts split 2 ways, ZeRO-3, bf16" in result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "router_aux_loss" in r]
    # balanced routing gives aux_loss = top-k (2) x ... ~ 2; it must be there, finite, and not blow up
    assert len(logged) == 2 and all(0 < r["router_aux_loss"] < 4 for r in logged)
    evaluations = [r for r in records if "eval_loss" in r]
    assert evaluations[-1]["eval_loss"] < evaluations[0]["eval_loss"] - 1.0
    assert "eval_router_aux_loss" in evaluations[-1]
