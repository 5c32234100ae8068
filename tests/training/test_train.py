"""Real training runs: debug mode in one process, and 2 CPU ranks through the deepspeed launcher."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, run_lmscale

pytestmark = pytest.mark.slow

# A few hundred thousand tokens of the embedded corpus: enough for the loss to fall clearly.
QUICK = [
    "model.preset=tiny-gpt2",
    "data.max_seq_len=64",
    "data.vocab_size=1024",
    "train.micro_batch_size=16",
    "data.max_tokens_per_batch=1024",
    "train.max_steps=80",
    "schedule.warmup_steps=8",
    "optim.lr=3e-3",
    "train.eval_every=40",
    "train.eval_batches=4",
    "train.log_every=10",
    "data.num_workers=0",
]


SECRET = "0123456789abcdef0123456789abcdef01234567"  # shaped like a W&B API key


def shared_memory_files():
    return set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_learned(run_dir, world_size):
    records = read_metrics(run_dir)
    evals = [r for r in records if "eval_loss" in r]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in evals] == [0, 40, 80]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.7, evals
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, train
    for record in train:
        assert set(record) >= {
            "step",
            "loss",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "tokens_per_s_per_device",
            "samples_per_s",
            "tflops_per_device",
            "step_time_s",
            "data_wait_s",
            "memory_rss_gb",
            "skipped_steps",
            "padding_frac",
            "tokens_seen",
        }
        assert record["tokens_per_s"] > 0 and record["grad_norm"] > 0 and record["tflops_per_device"] > 0
        assert record["tokens_per_s_per_device"] == pytest.approx(record["tokens_per_s"] / world_size)
        assert 0 <= record["data_wait_s"] < record["step_time_s"]
        assert record["skipped_steps"] == 0
    # every rank's real tokens are counted: 80 steps x <=1024 tokens (16 rows x 64, or the budget) x ranks
    most = 80 * 1024 * world_size
    assert 0.8 * most < train[-1]["tokens_seen"] <= most
    assert all(0 <= r["padding_frac"] < 0.2 for r in train)
    assert (run_dir / "checkpoints" / "step_00000080").is_dir()
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()


def wandb_history(run_dir):
    """The history W&B recorded offline, read back with W&B's own transaction-log reader."""
    (log_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    text = subprocess.run(
        ["wandb", "leet", "inspect", str(log_file)], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    rows = []
    for record in text.split("# record ")[1:]:
        if ": history" in record.splitlines()[0]:
            keys = re.findall(r'nested_key:\s+"([^"]+)"', record)
            values = re.findall(r'value_json:\s+"([^"]*)"', record)
            rows.append(dict(zip(keys, values, strict=False)))
    return rows


def test_debug_mode_trains_and_writes_the_run_dir(tmp_path, cache_dir):
    out = tmp_path / "run"
    result = run_lmscale(
        "train",
        str(REPO / "configs" / "tiny-cpu.yaml"),
        f"output_dir={out}",
        f"data.cache_dir={cache_dir}",
        "wandb.mode=offline",
        "logging.tensorboard=true",
        "metrics.peak_tflops=1.5",  # a CPU has no known peak: given one, MFU and HFU are logged
        *QUICK,
        "data.batching=pad",  # the naive baseline: fixed rows padded to max_seq_len
        env={"WANDB_API_KEY": SECRET},  # must never be written anywhere in the run dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out perplexity:" in result.stdout
    leaked = [p for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked, f"the W&B API key was written to {leaked}"
    assert "lmscale run summary" in result.stderr and "wandb sync" in result.stderr
    assert_learned(out, world_size=1)
    train = [r for r in read_metrics(out) if "loss" in r]
    assert all(
        0 < r["mfu"] == pytest.approx(r["tflops_per_device"] / 1.5) and r["hfu"] == r["mfu"] for r in train
    )
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 80 and saved["zero"]["stage"] == 0
    assert json.loads((out / "ds_config.json").read_text())["train_batch_size"] == 16

    # Off a terminal the progress is plain lines, one per logged step: no redraws, nothing over 200 characters.
    assert "\r" not in result.stderr and max(len(line) for line in result.stderr.splitlines()) <= 200
    progress = [line for line in result.stderr.splitlines() if re.match(r"lmscale: step \d+/80: loss", line)]
    assert len(progress) == len(train) and "ETA" in progress[-1] and "tokens/s" in progress[-1]
    assert "lmscale: batch: 1,024 tokens per optimizer step budget" in result.stderr  # pad: 16 rows x 64

    history = wandb_history(out)  # grouped names in W&B; metrics.jsonl keeps flat keys
    logged = [row for row in history if "train/loss" in row]
    assert [int(row["step"]) for row in logged] == [r["step"] for r in train]
    assert float(logged[-1]["train/loss"]) == pytest.approx(train[-1]["loss"])
    assert {"perf/tokens_per_s", "perf/mfu", "memory/rss_gb", "train/lr"} <= set(logged[-1])
    assert any("eval/loss" in row for row in history)
    run_id = (out / "wandb_run_id").read_text().strip()
    assert list(out.glob(f"wandb/offline-run-*-{run_id}"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [r["step"] for r in train]

    report = run_lmscale("report", str(out))
    assert report.returncode == 0 and (out / "report.png").stat().st_size > 50_000

    # The same command again: the run is done, and it says so at once (no data, engine or W&B run).
    wandb_runs = len(list(out.glob("wandb/offline-run-*")))
    again = run_lmscale("train", str(REPO / "configs" / "tiny-cpu.yaml"), f"output_dir={out}",
                        f"data.cache_dir={cache_dir}", "wandb.mode=offline", *QUICK, "data.batching=pad")  # fmt: skip
    assert again.returncode == 0 and "nothing to do: the run in" in again.stdout, again.stderr[-2000:]
    assert "already reached step 80 (train.max_steps=80)" in again.stdout
    assert "data/" not in again.stderr and "run summary" not in again.stderr and "nan" not in again.stdout
    assert len(list(out.glob("wandb/offline-run-*"))) == wandb_runs


def test_max_tokens_becomes_steps_from_the_epoch_plan(tmp_path, cache_dir):
    """train.max_tokens is turned into optimizer steps before training (the LR schedule needs them)."""
    out = tmp_path / "run"
    quick = [o for o in QUICK if not o.startswith(("train.max_steps", "train.eval_every"))]
    result = run_lmscale(
        "train",
        f"output_dir={out}",
        f"data.cache_dir={cache_dir}",
        "wandb.mode=disabled",
        *quick,
        "train.max_steps=null",
        "train.max_tokens=30000",
        "train.eval_every=1000",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = re.search(
        r"lmscale: batch: 1,024 tokens per optimizer step budget, ~([\d,]+) real .* "
        r"([\d,]+) steps \(from train.max_tokens=30000\)",
        result.stderr,
    )
    assert line, result.stderr[-2000:]
    expected_real, steps = (int(group.replace(",", "")) for group in line.groups())
    assert abs(steps - 30000 / expected_real) < 1.5  # ceil of the unrounded figure
    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert saved["max_steps"] == steps and saved["max_tokens"] is None  # what ran
    tokens_seen = [r for r in read_metrics(out) if "loss" in r][-1]["tokens_seen"]
    assert 30000 * 0.95 < tokens_seen < 30000 + 1024


@pytest.mark.parametrize(
    "zero",
    [
        # plain ZeRO-2 is test_deepspeed_launcher_runs_the_entry_script's (ds_configs/zero2_bf16.json); ZeRO-1,
        # which shares ZeRO-2's optimizer and checkpoint code in DeepSpeed, trains in the exact-comparison runs
        # of tests/parallel/test_parallel_runs.py and tests/model/test_compile_runs.py (EXACT_RUN_ARGS); ZeRO-3
        # in the fine-tuning method runs (tests/methods) and the optimizer knobs run. Here, in one run (CI
        # time): optimizer states offloaded to CPU, and a streamed corpus, each rank bucketing its own shard
        # inside a shuffle buffer.
        "zero.stage=2 zero.offload=cpu data.streaming=true data.shuffle_buffer=300 data.tokenizer_docs=300",
    ],
)
def test_two_cpu_ranks_learn_under_zero(tmp_path, cache_dir, zero):
    out = tmp_path / "run"
    shared_before = shared_memory_files()
    result = run_lmscale(
        "launch",
        "--gpus-per-node",
        "2",
        str(REPO / "configs" / "tiny-cpu.yaml"),
        *zero.split(),
        "precision=bf16",
        f"output_dir={out}",
        f"data.cache_dir={cache_dir}",
        "wandb.mode=disabled",
        *QUICK,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_learned(out, world_size=2)
    assert not (out / "wandb").exists()
    if "OMP_NUM_THREADS" not in os.environ:  # the ranks share the cores instead of each taking them all
        assert re.search(r"cpu: \d+ torch thread\(s\) per rank, 2 rank\(s\) sharing", result.stderr)
    assert shared_memory_files() <= shared_before  # DeepSpeed's CPU all-reduce buffers are not left behind


def test_deepspeed_launcher_runs_the_entry_script(tmp_path, cache_dir):
    """The plain DeepSpeed way: `deepspeed --num_gpus 2 launcher/train.py --config ...`; with a slow rank the
    straggler figures name, and two steps profiled."""
    import shutil
    import subprocess

    out = tmp_path / "run"
    command = [
        shutil.which("deepspeed") or f"{sys.prefix}/bin/deepspeed",
        "--num_gpus",
        "2",
        str(REPO / "launcher" / "train.py"),
        "--config",
        str(REPO / "configs" / "tiny-cpu.yaml"),
        f"output_dir={out}",
        f"data.cache_dir={cache_dir}",
        "wandb.mode=disabled",
        "deepspeed_config=ds_configs/zero2_bf16.json",
        *[o for o in QUICK if not o.startswith("train.micro_batch_size")],
        "train.profile_steps=[11,12]",
    ]  # the JSON's 16 is adopted
    # rank 1's batches arrive late at every step (a slow disk on its node): the straggler figures name it
    env = {**os.environ, "LMSCALE_FAULT": "slow@data,rank=1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_learned(out, world_size=2)
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["overlap_comm"] is True
    logged = [r for r in read_metrics(out) if "loss" in r]
    assert all(r["straggler_rank"] == 1 and 0.07 < r["straggler_lag"] < 0.5 for r in logged), logged
    warnings = [line for line in result.stderr.splitlines() if "straggler: rank 1 (node 0)" in line]
    assert len(warnings) == 1 and "its data arrives late" in warnings[0], result.stderr[-3000:]
    # one torch profiler trace per rank of steps 11-12, a Chrome trace that Perfetto opens
    for rank in (0, 1):
        trace = json.loads((out / "profile" / f"rank{rank}_steps11-12.pt.trace.json").read_text())
        assert any(event.get("name", "").startswith("aten::") for event in trace["traceEvents"])
    assert f"profile: steps 11-12 traced in {out / 'profile'}" in result.stderr


def test_diverging_run_stops_and_keeps_the_checkpoint_before_it(tmp_path, cache_dir):
    out = tmp_path / "run"
    result = run_lmscale(
        "train",
        f"output_dir={out}",
        f"data.cache_dir={cache_dir}",
        "wandb.mode=disabled",
        *QUICK,
        "zero.stage=1",
        "optim.lr=1e30",
        "schedule.min_lr=0",
        "schedule.warmup_steps=1",
        "checkpoint.save_every=1",
        "train.max_nonfinite_steps=3",
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("lmscale: error:")]
    assert len(errors) == 1 and "3 steps in a row" in errors[0] and "lower optim.lr" in errors[0]
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_00000001"]  # saved after the last step that was not skipped


def test_profile_traces_the_chosen_steps_beside_the_run(tmp_path, cache_dir):
    """`lmscale profile CONFIG --steps A:B`: a scratch run of B steps next to output_dir, steps A-B traced; a
    second profile of the same steps replaces the first (the config's own run directory is never touched)."""
    out = tmp_path / "run"
    args = (
        "profile",
        str(REPO / "configs" / "tiny-cpu.yaml"),
        f"output_dir={out}",
        f"data.cache_dir={cache_dir}",
    )
    quick = [o for o in QUICK if not o.startswith(("train.eval", "train.log"))]
    for _ in range(2):
        result = run_lmscale(*args, "wandb.mode=disabled", *quick, "--steps", "3:4")
        assert result.returncode == 0, result.stderr[-3000:]
    scratch = tmp_path / "run-profile-steps3-4"
    trace = json.loads((scratch / "profile" / "rank0_steps3-4.pt.trace.json").read_text())
    assert any(event.get("name", "").startswith("aten::") for event in trace["traceEvents"])
    assert max(r["step"] for r in read_metrics(scratch)) == 4 and not out.exists()
    assert f"profile: steps 3-4 traced in {scratch / 'profile'}" in result.stderr
