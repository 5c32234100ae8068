"""model.tiled_mlp in real jobs (one process: tests/model/test_tiled_mlp.py, loss to 1e-6): the sequence-parallel
pair under ZeRO-3 computes what the untiled one-process run does (each weight gathered once per slice, the same
slices on both ranks), and two data-parallel ranks of different sequence lengths under ZeRO-3 agree on their
slices (no deadlock) and learn."""

import json

import pytest
from helpers import EXACT_RUN_ARGS, run_lmscale

pytestmark = pytest.mark.slow

TILED = ["model.tiled_mlp=true", "model.tiled_mlp_tokens=16"]  # 64-token rows: 4 slices (2 per SP rank)


def losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def run(out, cache_dir, ranks, *extra):
    command = ["launch", "--gpus-per-node", str(ranks)] if ranks > 1 else ["train"]
    args = [*command, f"output_dir={out}", f"data.cache_dir={cache_dir}", *EXACT_RUN_ARGS, *TILED, *extra]
    result = run_lmscale(*args, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_tiled_mlps_train_like_untiled_with_sequence_parallelism_and_across_ranks_under_zero3(
    tmp_path, cache_dir, exact_one_process_run
):
    expected = losses(exact_one_process_run)
    pair = tmp_path / "pair"
    run(pair, cache_dir, 2, "parallel.sequence=2", "zero.stage=3")
    got = losses(pair)
    # the sequence-parallel pair's own tolerance against one process (tests/parallel/test_parallel_runs.py)
    assert got.keys() == expected.keys() and all(abs(got[s] - expected[s]) < 1e-4 for s in expected)

    replicas = tmp_path / "replicas"
    result = run(replicas, cache_dir, 2, "zero.stage=3", "train.hang_timeout_s=120")
    assert "2 data-parallel rank(s), ZeRO-3" in result.stderr
    trained = losses(replicas)
    assert sorted(trained) == list(range(1, 11)) and trained[10] < trained[1] - 0.5, trained
