"""Tensor parallelism (DeepSpeed AutoTP) and sequence parallelism (Ulysses) in real jobs on CPU ranks: the
same losses as one process, replicas of a data x tensor / data x sequence layout that agree, a SIGKILLed
rank that resumes exactly, exports that compute what the one-process run's export does, and a checkpoint
that moves to another layout (tensor) or refuses to (sequence), and both kinds together."""

import json
import shutil

import pytest
import torch
from helpers import EXACT_RUN_ARGS, run_lmscale

pytestmark = pytest.mark.slow

ARGS = EXACT_RUN_ARGS


def losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def run(out, cache_dir, ranks, *extra, env=None):
    command = ["launch", "--gpus-per-node", str(ranks)] if ranks > 1 else ["train"]
    args = [*command, f"output_dir={out}", f"data.cache_dir={cache_dir}", *ARGS, *extra]
    result = run_lmscale(*args, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def exported_logits(run_dir, out, tokens):
    from transformers import AutoModelForCausalLM

    result = run_lmscale("export", str(run_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def single(exact_one_process_run):
    """The one-process run every layout is compared with (the compiled-model test's eager run too)."""
    return exact_one_process_run


def sigkill_and_resume(out, cache_dir, layout, expected):
    """A rank SIGKILLed after step 7: the restart resumes from step 5 and repeats steps 6-10 exactly."""
    result = run_lmscale(
        "launch", "--gpus-per-node", "2", f"output_dir={out}", f"data.cache_dir={cache_dir}", *ARGS, layout,
        env={"LMSCALE_FAULT": "kill@step=7,rank=1"}, timeout=900,
    )  # fmt: skip
    assert result.returncode != 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    resumed = run(out, cache_dir, 2, layout)
    assert "continuing from" in resumed.stderr
    assert {s: losses(out)[s] for s in range(6, 11)} == {s: expected[s] for s in range(6, 11)}


TOKENS = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(0))


def test_tensor_parallel_pair_trains_like_one_process_resumes_exactly_and_exports(
    tmp_path, cache_dir, single
):
    pair = tmp_path / "pair"
    result = run(pair, cache_dir, 2, "parallel.tensor=2")
    assert "1 data-parallel x 2 tensor-parallel rank(s)" in result.stderr
    expected, got = losses(single), losses(pair)
    assert sorted(got) == list(range(1, 11))
    assert all(abs(got[s] - expected[s]) < 1e-4 for s in expected), (expected, got)

    sigkill_and_resume(tmp_path / "killed", cache_dir, "parallel.tensor=2", got)

    # The pair's step-5 checkpoint continues in one process (tensor 2 -> 1, through the universal form).
    moved = tmp_path / "moved"
    shutil.copytree(pair, moved)
    shutil.rmtree(moved / "checkpoints" / "step_00000010")
    (moved / "checkpoints" / "latest").write_text("step_00000005")
    result = run(moved, cache_dir, 1)
    assert "2 tensor-parallel rank(s), continuing on 1 data-parallel rank(s)" in result.stderr
    assert all(abs(losses(moved)[s] - got[s]) < 1e-4 for s in range(6, 11)), (losses(moved), got)

    # The two tensor slices export to one HF model that computes what the one-process run's export does.
    torch.testing.assert_close(
        exported_logits(pair, tmp_path / "pair_hf", TOKENS),
        exported_logits(single, tmp_path / "single_hf", TOKENS),
        atol=1e-3,
        rtol=0,
    )


def test_sequence_parallel_pair_trains_like_one_process_under_zero_1_and_3(tmp_path, cache_dir, single):
    expected = losses(single)
    pair = tmp_path / "pair"
    result = run(pair, cache_dir, 2, "parallel.sequence=2")
    assert "1 data-parallel x 2 sequence-parallel rank(s)" in result.stderr
    got = losses(pair)
    assert all(abs(got[s] - expected[s]) < 1e-4 for s in expected), (expected, got)
    # ZeRO-3 divides gradients by every rank of a sequence group too (lmscale.training.loop.gradient_divisor); the
    # output layer fused into the loss (its weight gathered by ZeRO-3) gives the same losses.
    zero3 = tmp_path / "zero3"
    fused = ("train.chunked_loss=true", "zero.stage=3", "checkpoint.save_every=100")
    result = run(zero3, cache_dir, 2, "parallel.sequence=2", *fused)
    assert "chunked loss: output layer fused into the loss" in result.stderr
    assert all(abs(losses(zero3)[s] - expected[s]) < 1e-4 for s in expected), (expected, losses(zero3))

    # A sequence-parallel rank's death and exact resume: the tensor x sequence run below (CI time).

    torch.testing.assert_close(
        exported_logits(pair, tmp_path / "pair_hf", TOKENS),
        exported_logits(single, tmp_path / "single_hf", TOKENS),
        atol=1e-3,
        rtol=0,
    )

    # A sequence-parallel checkpoint resumes on its own layout only, and says so before anything runs.
    (pair / "checkpoints" / "latest").write_text("step_00000005")
    shutil.rmtree(pair / "checkpoints" / "step_00000010")
    refused = run_lmscale("train", f"output_dir={pair}", f"data.cache_dir={cache_dir}", *ARGS)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "was written with parallel.sequence=2 on 2 rank(s): resume it with the same" in refused.stderr


@pytest.mark.parametrize(
    ("layout", "zero"), [("parallel.tensor=2", "zero.stage=1"), ("parallel.sequence=2", "zero.stage=2")]
)
def test_four_ranks_of_two_data_parallel_groups_train_with_agreeing_replicas(
    tmp_path, cache_dir, layout, zero
):
    out = tmp_path / "quad"
    # oversubscribed: 4 ranks, 2 cores; the output layer fused into the loss under AutoTP and Ulysses
    result = run(out, cache_dir, 4, layout, zero, "train.max_steps=6", "train.chunked_loss=true")
    kind = layout.split(".")[1].split("=")[0]
    assert f"2 data-parallel x 2 {kind}-parallel rank(s)" in result.stderr
    assert "chunked loss: output layer fused into the loss" in result.stderr
    assert "parameters identical on all 2 data-parallel replicas" in result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "loss" in r}
    assert steps[6]["loss"] < steps[1]["loss"] - 0.5
    # Two data-parallel batches of at most 1,024 tokens a step, each counted once (not once per group rank).
    assert 6 * 2 * 900 < steps[6]["tokens_seen"] <= 6 * 2 * 1024


def test_tensor_and_sequence_parallel_together_train_like_one_process_resume_and_export(
    tmp_path, cache_dir, single
):
    """2 tensor x 2 sequence ranks (4 ranks on 2 cores): a rank SIGKILLed after step 7, the restart resumes
    from step 5, and every step's loss is one process's; the export computes what one process's does."""
    out, layout = tmp_path / "both", ("parallel.tensor=2", "parallel.sequence=2")
    killed = run_lmscale(
        "launch", "--gpus-per-node", "4", f"output_dir={out}", f"data.cache_dir={cache_dir}", *ARGS, *layout,
        env={"LMSCALE_FAULT": "kill@step=7,rank=1"}, timeout=900,
    )  # fmt: skip
    assert killed.returncode != 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    resumed = run(out, cache_dir, 4, *layout)
    assert "1 data-parallel x 2 sequence-parallel x 2 tensor-parallel rank(s)" in resumed.stderr
    assert "continuing from" in resumed.stderr
    expected, got = losses(single), losses(out)
    assert sorted(got) == list(range(1, 11))
    assert all(abs(got[s] - expected[s]) < 1e-4 for s in expected), (expected, got)
    torch.testing.assert_close(
        exported_logits(out, tmp_path / "both_hf", TOKENS),
        exported_logits(single, tmp_path / "single_hf", TOKENS),
        atol=1e-3,
        rtol=0,
    )
