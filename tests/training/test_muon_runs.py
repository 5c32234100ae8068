"""Muon on 2 CPU ranks: ZeRO-2 and ZeRO-3 step like Muon on whole matrices (ZeRO-0) to 1e-5 in fp32, and a
rank killed mid-run resumes exactly (the momentum buffers are in the checkpoint)."""

import json

import pytest
from helpers import SHORT_RUN_ARGS, run_lmscale

pytestmark = pytest.mark.slow

ARGS = [*SHORT_RUN_ARGS, "precision=fp32", "optim.name=muon", "data.max_tokens_per_batch=2048"]


def losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(abs(a[s] - b[s]) <= 1e-5 * abs(b[s]) for s in a)


def test_muon_under_zero_2_and_3_steps_like_whole_matrices_and_resumes_exactly(tmp_path, cache_dir):
    def launch(name, *extra, fault=None):
        out = tmp_path / name
        env = {"LMSCALE_FAULT": fault} if fault else None
        common = [f"output_dir={out}", f"data.cache_dir={cache_dir}", *ARGS]
        return run_lmscale("launch", "--gpus-per-node", "2", *common, *extra, env=env, timeout=600), out

    # ZeRO-0: MuonWithAuxAdam itself orthogonalizes each whole 2-D gradient (no clipping, as under ZeRO)
    result, whole = launch("zero0", "zero.stage=0", "train.grad_clip=0")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = losses(whole)
    assert sorted(expected) == list(range(1, 9)) and expected[8] < expected[1] - 0.5, expected

    # ZeRO-3 (its reduce-scatter switched off for Muon) gathers each matrix's gradient before Muon
    result, sharded = launch("zero3", "zero.stage=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert close(losses(sharded), expected), (losses(sharded), expected)

    # ZeRO-2, rank 1 dying after step 5: the same command resumes from step 4 and ends where ZeRO-0 did
    result, killed = launch("zero2", "zero.stage=2", fault="exit@step=5,rank=1")
    assert result.returncode != 0
    result, killed = launch("zero2", "zero.stage=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "continuing from" in result.stderr and "step_00000004" in result.stderr
    assert close(losses(killed), expected), (losses(killed), expected)

    # DeepSpeed's universal conversion reads Adam's moments only: another rank count is one line, up front
    result = run_lmscale(
        "train", f"output_dir={killed}", f"data.cache_dir={cache_dir}", *ARGS, "zero.stage=2"
    )
    assert result.returncode == 2
    assert "with optim.name=muon" in result.stderr and "resume it on 2 rank(s)" in result.stderr
