"""Expert parallelism (DeepSpeed AutoEP, parallel.expert) in real jobs on CPU ranks, step for step against
data parallelism alone on the same ranks (lmscale plans batches per data-parallel rank, and AutoEP's ranks
are data-parallel ranks: the same batches, the experts held elsewhere): a SIGKILLed rank that resumes
exactly, a checkpoint that moves to another expert split, an export that computes what the data-parallel
run's does, and the experts' load in the logs."""

import json
import shutil

import pytest
import torch
from helpers import EXACT_RUN_ARGS, run_lmscale

pytestmark = pytest.mark.slow

MIXTRAL = [*EXACT_RUN_ARGS, "model.preset=tiny-mixtral"]
# DeepSeek-V3 trains its routing bias apart from the gradients (model.router_bias_update): 0.01 per step, so
# the bias decides which group a token takes within the 10 steps (the tiny router's scores differ by ~0.01).
DEEPSEEK = [*EXACT_RUN_ARGS, "model.preset=tiny-deepseek-v3", "model.router_bias_update=0.01"]
QWEN_FOUR_RANKS = [*EXACT_RUN_ARGS, "model.preset=tiny-qwen3-moe", "zero.stage=2", "train.max_steps=6"]
QWEN_FOLDED = [*EXACT_RUN_ARGS, "model.preset=tiny-qwen3-moe", "zero.stage=2", "train.max_steps=8"]
TOKENS = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(0))


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def run(out, cache_dir, ranks, args, *extra, env=None, ok=True):
    result = run_lmscale(
        "launch", "--gpus-per-node", str(ranks), f"output_dir={out}", f"data.cache_dir={cache_dir}", *args, *extra,
        env=env, timeout=900,
    )  # fmt: skip
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def back_to_step_5(run_dir, last="step_00000010"):
    """Make `run_dir` resume from its step-5 checkpoint (its last one removed)."""
    shutil.rmtree(run_dir / "checkpoints" / last)
    (run_dir / "checkpoints" / "latest").write_text("step_00000005")
    return run_dir


def assert_same_losses(got, expected, steps):
    assert sorted(got) == list(steps), got
    assert all(abs(got[s] - expected[s]) < 1e-5 for s in steps), (expected, got)


def exported_logits(run_dir, out, *checkpoint):
    from transformers import AutoModelForCausalLM

    result = run_lmscale("export", str(run_dir), "--out", str(out), *checkpoint)
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        return model(TOKENS).logits


def test_expert_parallel_pair_trains_like_data_parallelism_resumes_moves_and_exports(tmp_path, cache_dir):
    data_parallel = tmp_path / "dp"
    run(data_parallel, cache_dir, 2, MIXTRAL)
    expected = losses(data_parallel)
    # Mixtral's router loss trains and is logged (balanced routing gives about top-k = 2), held-out loss falls.
    logged = records(data_parallel)
    evaluations = [r for r in logged if "eval_loss" in r]
    assert evaluations[-1]["eval_loss"] < evaluations[0]["eval_loss"] - 1.0
    assert "eval_router_aux_loss" in evaluations[-1]
    assert all(0 < r["router_aux_loss"] < 4 for r in logged if "loss" in r)

    # Experts split 2 ways, a rank SIGKILLed after step 7: the restart resumes from step 5, and every step's
    # loss is the data-parallel run's.
    split = tmp_path / "ep"
    killed = run(
        split,
        cache_dir,
        2,
        MIXTRAL,
        "parallel.expert=2",
        env={"LMSCALE_FAULT": "kill@step=7,rank=1"},
        ok=False,
    )
    assert killed.returncode != 0
    assert (split / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    resumed = run(split, cache_dir, 2, MIXTRAL, "parallel.expert=2")
    assert "2 data-parallel rank(s), experts split 2 ways" in resumed.stderr
    assert "continuing from" in resumed.stderr
    assert "parameters identical on all 2 data-parallel replicas (each expert's on its 1)" in resumed.stderr
    assert_same_losses(losses(split), expected, range(1, 11))

    # The experts' load: every logged step, each layer's 4 experts got top-2 of all ranks' tokens.
    load = [json.loads(line) for line in (split / "expert_load.jsonl").read_text().splitlines()]
    assert [r["step"] for r in load] == list(range(1, 11))
    steps = {r["step"]: r for r in records(split) if "loss" in r}
    for row in load:
        tokens = (
            steps[row["step"]]["tokens_seen"] - steps.get(row["step"] - 1, {"tokens_seen": 0})["tokens_seen"]
        )
        assert len(row["tokens_per_expert"]) == 4
        assert all(len(layer) == 4 and tokens <= sum(layer) / 2 for layer in row["tokens_per_expert"])
    assert all(1.0 <= r["expert_load_max_over_mean"] <= 2.0 for r in steps.values())

    # Its step-5 checkpoint continues without expert parallelism (the experts re-split through the universal
    # form; AutoEP's layers stay, every expert on every rank) and repeats steps 6-10 exactly.
    moved = tmp_path / "moved"
    shutil.copytree(split, moved)
    back_to_step_5(moved)
    result = run(moved, cache_dir, 2, MIXTRAL)
    assert "holds AutoEP's grouped experts (written with parallel.expert=2)" in result.stderr
    assert_same_losses({s: v for s, v in losses(moved).items() if s > 5}, expected, range(6, 11))

    # One HF model out of the split experts, computing what the data-parallel run's export does.
    torch.testing.assert_close(
        exported_logits(split, tmp_path / "ep_hf"),
        exported_logits(data_parallel, tmp_path / "dp_hf"),
        atol=1e-4,
        rtol=0,
    )

    # A checkpoint without AutoEP's layers does not load into them: said before anything runs.
    back_to_step_5(data_parallel)
    refused = run(data_parallel, cache_dir, 2, MIXTRAL, "parallel.expert=2", ok=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "was written without expert parallelism" in refused.stderr


def test_a_mixture_of_experts_model_split_by_rows_trains_like_one_process(tmp_path, cache_dir):
    """Ulysses with every expert on every rank: each rank routes a slice of every row, and the router's
    load-balancing loss (trained, as Mixtral's is) is the whole rows' (lmscale.objectives.balancing), so
    every step's loss and router loss are one process's."""
    short = ("train.max_steps=4", "checkpoint.save_every=100")
    single = tmp_path / "single"
    result = run_lmscale(
        "train", f"output_dir={single}", f"data.cache_dir={cache_dir}", *MIXTRAL, *short, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pair = tmp_path / "pair"
    result = run(pair, cache_dir, 2, MIXTRAL, *short, "parallel.sequence=2")
    assert "1 data-parallel x 2 sequence-parallel rank(s)" in result.stderr
    expected, got = records(single), records(pair)
    for key in ("loss", "router_aux_loss"):
        want = {r["step"]: r[key] for r in expected if key in r}
        assert_same_losses({r["step"]: r[key] for r in got if key in r}, want, range(1, 5))
    evaluations = [(r["eval_loss"], r["eval_router_aux_loss"]) for r in got if "eval_loss" in r]
    assert evaluations and all(0 < aux < 4 for _, aux in evaluations)


def exported_routing_biases(export_dir):
    from safetensors.torch import load_file

    weights = {k: v for f in export_dir.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    return torch.stack([weights[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] for i in (1, 2, 3)])


def test_deepseek_v3_experts_split_under_zero_3_train_like_data_parallelism_and_export(tmp_path, cache_dir):
    """DeepSeek-V3's block (latent attention, a dense first layer, sigmoid routing limited to the best of 2
    expert groups, a shared expert) through AutoEP under ZeRO-3: data parallelism's losses under ZeRO-1, the
    load as the routers chose it, the routing bias balanced after every step alike on every rank (and
    restored by a resume), and one HF model out of the split experts (its routing bias included)."""
    data_parallel, split = tmp_path / "dp", tmp_path / "ep"
    killed = run(data_parallel, cache_dir, 2, DEEPSEEK, env={"LMSCALE_FAULT": "kill@step=7,rank=1"}, ok=False)
    assert killed.returncode != 0
    resumed = run(data_parallel, cache_dir, 2, DEEPSEEK)  # from step 5
    assert "continuing from" in resumed.stderr and "routing bias moves 0.01" in resumed.stderr
    result = run(split, cache_dir, 2, DEEPSEEK, "parallel.expert=2", "zero.stage=3")
    assert "2 data-parallel rank(s), experts split 2 ways, ZeRO-3" in result.stderr
    assert "overrides route_scale" not in result.stderr + result.stdout  # AutoEP's echo of its own copy
    assert_same_losses(losses(split), losses(data_parallel), range(1, 11))

    # Each token goes to both experts of the one group its router keeps: the 3 MoE layers' counts come in
    # equal pairs, with HF's routers (data parallelism) and AutoEP's alike, and every step's routing is the
    # same in both runs (after the resume too: the bias came back with the checkpoint).
    loads = []
    for out in (data_parallel, split):
        load = [json.loads(line) for line in (out / "expert_load.jsonl").read_text().splitlines()]
        assert [r["step"] for r in load] == list(range(1, 11))
        for row in load:
            assert len(row["tokens_per_expert"]) == 3
            assert all(a == b and c == d and a + c > 0 for a, b, c, d in row["tokens_per_expert"])
        loads.append([row["tokens_per_expert"] for row in load])
    assert loads[0] == loads[1]

    torch.testing.assert_close(
        exported_logits(split, tmp_path / "ep_hf"),
        exported_logits(data_parallel, tmp_path / "dp_hf"),
        atol=1e-4,
        rtol=0,
    )
    # 10 updates of +-0.01 (or 0 for an even split): each bias a multiple of 0.01, the same in both exports
    biases = exported_routing_biases(tmp_path / "dp_hf")
    assert torch.equal(exported_routing_biases(tmp_path / "ep_hf"), biases)
    steps = biases / 0.01
    assert biases.abs().max() > 0 and torch.allclose(steps, steps.round(), atol=1e-3)
    assert steps.abs().max() <= 10
    logged = [r["router_bias_absmax"] for r in records(split) if "loss" in r]
    assert len(logged) == 10 and logged[-1] == pytest.approx(biases.abs().max().item())

    # The split run's step 5 resumed with every expert on every rank, through ZeRO-3's universal form (which
    # DeepSpeed 0.19.8 loads with one Adam step counter shared by all parameter groups, and the first group's
    # hyperparameters for all: mended in lmscale.checkpointing.checkpoint): steps 6-10 as if never moved.
    moved = tmp_path / "moved"
    shutil.copytree(split, moved)
    back_to_step_5(moved)
    run(moved, cache_dir, 2, DEEPSEEK, "zero.stage=3")
    assert_same_losses({s: v for s, v in losses(moved).items() if s > 5}, losses(data_parallel), range(6, 11))

    # Moved from 2 ranks to 1 (the universal form, which DeepSpeed loads without the model's buffers) with the
    # update stopped (a resume may change its speed): the step-5 bias came back, and stayed.
    exported_logits(data_parallel, tmp_path / "dp5_hf", "--checkpoint", "step_00000005")
    back_to_step_5(data_parallel)
    moved = run_lmscale(
        "train", f"output_dir={data_parallel}", f"data.cache_dir={cache_dir}", *DEEPSEEK,
        "model.router_bias_update=0", "train.max_steps=6",
    )  # fmt: skip
    assert moved.returncode == 0 and "continuing on 1 data-parallel rank(s)" in moved.stderr, moved.stderr[
        -3000:
    ]
    exported_logits(data_parallel, tmp_path / "dp6_hf")
    assert torch.equal(
        exported_routing_biases(tmp_path / "dp6_hf"), exported_routing_biases(tmp_path / "dp5_hf")
    )
    assert exported_routing_biases(tmp_path / "dp5_hf").abs().max() > 0


def test_four_ranks_split_the_experts_two_and_four_ways_alike(tmp_path, cache_dir):
    """Qwen3-MoE on 4 ranks (2 cores): experts split 2 ways (two replicas of each, compared at the end) under
    ZeRO-2 and 4 ways under ZeRO-3, step for step the same (the pair test above ties a split to data parallelism
    alone; a third 4-rank run for that would cost CI a minute)."""
    two = tmp_path / "ep2"
    result = run(two, cache_dir, 4, QWEN_FOUR_RANKS, "parallel.expert=2")
    assert "4 data-parallel rank(s), experts split 2 ways" in result.stderr
    assert "parameters identical on all 4 data-parallel replicas (each expert's on its 2)" in result.stderr
    four = tmp_path / "ep4"
    run(four, cache_dir, 4, QWEN_FOUR_RANKS, "parallel.expert=4", "zero.stage=3")
    assert_same_losses(losses(four), losses(two), range(1, 7))
    assert losses(two)[6] < losses(two)[1]


def test_experts_and_tensors_split_together_train_like_one_process_resume_and_export(tmp_path, cache_dir):
    """DeepSpeed's AutoEP + AutoTP folding on 2 ranks: attention split 2 ways, experts 2 ways, one batch (the
    tensor group's): one process's losses and gradient norms (the norm must count both ranks' experts, which
    ZeRO 1-2 left to lmscale: clipping depends on it) through a SIGKILL, its export, and its checkpoint moved
    to one process."""
    one = tmp_path / "one"
    run(one, cache_dir, 1, MIXTRAL)
    folded, layout = tmp_path / "folded", ("parallel.tensor=2", "parallel.expert=2")
    killed = run(
        folded, cache_dir, 2, MIXTRAL, *layout, env={"LMSCALE_FAULT": "kill@step=7,rank=1"}, ok=False
    )
    assert killed.returncode != 0
    resumed = run(folded, cache_dir, 2, MIXTRAL, *layout)
    assert "1 data-parallel x 2 tensor-parallel rank(s), experts split 2 ways" in resumed.stderr
    assert "continuing from" in resumed.stderr
    assert_same_losses(losses(folded), losses(one), range(1, 11))
    norms = {r["step"]: r["grad_norm"] for r in records(folded) if "loss" in r}
    expected_norms = {r["step"]: r["grad_norm"] for r in records(one) if "loss" in r}
    assert all(abs(norms[s] / expected_norms[s] - 1) < 1e-3 for s in range(1, 11)), (expected_norms, norms)

    torch.testing.assert_close(
        exported_logits(folded, tmp_path / "folded_hf"),
        exported_logits(one, tmp_path / "one_hf"),
        atol=1e-4,
        rtol=0,
    )
    # The export read the universal form; without one (an optimizer whose states it cannot convert) it joins
    # the tensor slices and the experts' files: the same fp32 weights.
    from lmscale.checkpointing.export import consolidated_weights

    final = folded / "checkpoints" / "step_00000010"
    through_universal, from_files = consolidated_weights(final, 1), consolidated_weights(final, 1, "lion")
    assert through_universal.keys() == from_files.keys()
    assert all(torch.equal(through_universal[n], from_files[n]) for n in from_files)

    # Its step-5 checkpoint continues on one process (a lost rank): DeepSpeed's universal conversion cannot read
    # folded experts, lmscale.checkpointing.folded_universal does; steps 6-10 are the one-process run's.
    moved = tmp_path / "moved"
    shutil.copytree(folded, moved)
    back_to_step_5(moved)
    result = run(moved, cache_dir, 1, MIXTRAL)
    assert "experts split 2 ways, continuing on 1 data-parallel rank(s)" in result.stderr
    assert_same_losses({s: v for s, v in losses(moved).items() if s > 5}, losses(one), range(6, 11))


def test_four_ranks_fold_experts_into_tensors_like_two_data_parallel_ranks_and_move_on(tmp_path, cache_dir):
    """4 ranks as 2 data x 2 tensor with the experts split 2 ways (ZeRO-2, Qwen3-MoE): the losses of 2
    data-parallel ranks (a tensor group shares one batch). Its step-5 checkpoint, through lmscale's folded
    conversion (each expert's Adam moments joined from the 2 ranks that partition them), then repeats steps 6-8
    with the experts split 4 ways on the same ranks, and on 2 folded ranks (a lost node) repeats what the
    data-parallel run's checkpoint does on one process (the same batches, re-planned for 1 replica)."""
    two = tmp_path / "two"
    run(two, cache_dir, 2, QWEN_FOLDED)
    folded = tmp_path / "folded"
    result = run(folded, cache_dir, 4, QWEN_FOLDED, "parallel.tensor=2", "parallel.expert=2")
    assert "2 data-parallel x 2 tensor-parallel rank(s), experts split 2 ways" in result.stderr
    assert_same_losses(losses(folded), losses(two), range(1, 9))

    def moved_on(source, name, ranks, *layout):
        moved = back_to_step_5(shutil.copytree(source, tmp_path / name), last="step_00000008")
        result = run(moved, cache_dir, ranks, QWEN_FOLDED, *layout)
        return {s: v for s, v in losses(moved).items() if s > 5}, result.stderr

    four_ways, stderr = moved_on(folded, "four_ways", 4, "parallel.tensor=2", "parallel.expert=4")
    assert "continuing on 2 data-parallel x 2 tensor-parallel rank(s), experts split 4 ways" in stderr
    assert_same_losses(four_ways, losses(two), range(6, 9))
    one_replica, _ = moved_on(two, "one_replica", 1)
    two_folded, stderr = moved_on(folded, "two_folded", 2, "parallel.tensor=2", "parallel.expert=2")
    assert "continuing on 1 data-parallel x 2 tensor-parallel rank(s), experts split 2 ways" in stderr
    assert_same_losses(two_folded, one_replica, range(6, 9))
