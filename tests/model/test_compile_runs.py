"""model.compile in real runs: the compiled model trains as the eager one does, reports its compile time
apart from throughput, and resumes after its process dies to the same losses (up to fp32 rounding)."""

import json

import pytest
from helpers import EXACT_RUN_ARGS, run_lmscale

pytestmark = pytest.mark.slow

ARGS = EXACT_RUN_ARGS


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def train(out, cache_dir, *extra, env=None):
    return run_lmscale("train", f"output_dir={out}", f"data.cache_dir={cache_dir}", *ARGS, *extra, env=env)


def test_compiled_model_trains_like_eager_reports_compile_time_and_resumes_exactly(
    tmp_path, cache_dir, exact_one_process_run
):
    """One compiled run that dies after step 7 and resumes from step 5 (CI time: no uninterrupted compiled run
    too): every step's loss is the eager run's, before the death and after the restart."""
    eager = exact_one_process_run  # the eager run of the same arguments, shared with tests/parallel
    died = tmp_path / "died"
    result = train(died, cache_dir, "model.compile=true", env={"LMSCALE_FAULT": "exit@step=7"})
    assert result.returncode != 0
    # The first step compiled: its seconds are logged apart, and throughput stays a real rate.
    first = next(r for r in records(died) if r.get("step") == 1 and "loss" in r)
    assert first["compile_s"] > 1 and first["tokens_per_s"] > 0
    resumed = train(died, cache_dir, "model.compile=true")
    assert resumed.returncode == 0 and "continuing from" in resumed.stderr
    assert "compile: " in resumed.stderr and "graph(s)" in resumed.stderr
    # The restarted process compiles anew, for the shapes it meets first: its kernels may sum in another
    # order than eager's (or the first process's), so the losses agree to fp32 rounding (eager's resume:
    # bitwise); a resume that lost the optimizer's state or the data position would miss by far more.
    expected, got = losses(eager), losses(died)
    assert sorted(got) == list(range(1, 11))
    assert all(abs(got[s] - expected[s]) < 1e-4 for s in expected), (expected, got)
