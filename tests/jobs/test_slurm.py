"""`lmscale slurm` against a real single-node SLURM cluster started by the test (no mocks of SLURM)."""

import json
import re
import time

import pytest
import slurm_cluster
from helpers import REPO, run_lmscale

TRAIN = [
    "data.max_seq_len=64",
    "data.vocab_size=1024",
    "data.max_tokens_per_batch=1024",
    "train.max_steps=24",
    "schedule.warmup_steps=2",
    "checkpoint.save_every=4",
    "train.eval_every=24",
    "train.eval_batches=2",
    "train.log_every=1",
    "data.num_workers=0",
    "wandb.mode=disabled",
    "precision=bf16",
]
CPU_JOB = ["--cpu", "--nodes", "1", "--gpus-per-node", "2", "--cpus-per-task", "2"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    running, reason = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    if running is None:
        print(f"SLURM tests skipped: {reason}")
        pytest.skip(reason)
    yield running
    running.stop()


def submit(cluster, out, cache_dir):
    result = run_lmscale(
        "slurm",
        "submit",
        *CPU_JOB,
        f"output_dir={out}",
        f"data.cache_dir={cache_dir}",
        *TRAIN,
        env=cluster.env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    job_id = re.search(r"submitted job (\d+)", result.stdout).group(1)
    assert (out / "slurm" / "job_id").read_text().strip() == job_id
    return job_id


def wait_until(condition, what, timeout=600, explain=lambda: ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{explain()}")


def slurm_view(cluster, out, job_id):
    """What SLURM and the job say, for a failure message: the job, the node, the daemons' and job's logs."""
    job = cluster.run("scontrol", "show", "job", job_id, check=False)
    node = cluster.run("sinfo", "-N", "-h", "-o", "%N %T %E", check=False)
    parts = [f"scontrol show job:\n{job.stdout}{job.stderr}", f"sinfo: {node.stdout}{node.stderr}"]
    for log in (cluster.root / "slurmctld.log", cluster.root / "slurmd.log"):
        tail = log.read_text(errors="replace").splitlines()[-40:] if log.is_file() else []
        parts.append(f"{log.name} (tail):\n" + "\n".join(tail))
    parts.append("job log (tail):\n" + log_of(out, job_id)[-4000:])
    return "\n".join(parts)


def losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(steps)
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def log_of(out, job_id):
    path = out / "slurm" / f"{job_id}.out"
    return path.read_text(errors="replace") if path.is_file() else ""


@pytest.fixture(scope="module")
def uninterrupted(cluster, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm-run") / "run"
    job_id = submit(cluster, out, cache_dir)
    wait_until(
        lambda: not cluster.queued(job_id),
        f"job {job_id} to leave the queue",
        explain=lambda: slurm_view(cluster, out, job_id),
    )
    return out, job_id


@pytest.mark.slow
def test_submitted_two_rank_job_trains_to_the_end(cluster, uninterrupted):
    out, job_id = uninterrupted
    log = log_of(out, job_id)
    assert "lmscale: run finished" in log, log[-3000:]
    loss = losses(out)
    assert sorted(loss) == list(range(1, 25))
    assert sum(loss[s] for s in range(20, 25)) / 5 < sum(loss[s] for s in range(1, 6)) / 5 - 0.5
    status = run_lmscale("slurm", "status", str(out), env=cluster.env)
    assert f"job {job_id} is no longer queued; the run finished" in status.stdout


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_to_the_same_loss(cluster, uninterrupted, cache_dir, tmp_path):
    out = tmp_path / "run"
    job_id = submit(cluster, out, cache_dir)
    marker = out / "checkpoints" / "step_00000004" / "COMPLETE"
    explain = lambda: slurm_view(cluster, out, job_id)  # noqa: E731
    # Each wait has its own share of pytest's 900 s, so a stuck job fails with SLURM's view of it.
    wait_until(marker.exists, "the first checkpoint", timeout=180, explain=explain)
    # What --signal=USR1@N does before a time limit: USR1 to every process of the job's steps.
    cluster.run("scancel", "--signal=USR1", job_id)
    wait_until(
        lambda: "requeueing job" in log_of(out, job_id),
        "the job to requeue itself",
        timeout=120,
        explain=explain,
    )
    # SLURM holds a requeued job for about two minutes before it may start again; shorten that hold here,
    # but only once the job is back to PENDING (the requeue sets the hold over any earlier update), and
    # not to "now": slurmd refuses a launch whose credential is from the second the old one was revoked
    # in ("Job credential revoked"), which fails the job instead of resuming it.
    wait_until(
        lambda: cluster.state(job_id) == "PENDING",
        "the job to be back in the queue",
        timeout=120,
        explain=explain,
    )
    update = cluster.run("scontrol", "update", f"JobId={job_id}", "EligibleTime=now+5", check=False)
    assert update.returncode == 0, update.stderr + explain()
    wait_until(
        lambda: not cluster.queued(job_id), "the resumed job to leave the queue", timeout=420, explain=explain
    )
    log = log_of(out, job_id)
    assert "run finished" in log, explain()
    assert "stopped by SIGUSR1" in log and "resume: continuing from" in log, log[-3000:]
    expected, got = losses(uninterrupted[0]), losses(out)
    assert sorted(got) == list(range(1, 25))
    assert got[24] == expected[24]  # exact resume: the same final loss as the uninterrupted job
    assert [got[s] for s in range(1, 25)] == [expected[s] for s in range(1, 25)]


def documented_example():
    text = (REPO / "slurm" / "README.md").read_text()
    block = text.split("<!-- dry-run 4x8 -->")[1].split("```")[1]
    return block.removeprefix("bash\n")


def test_dry_run_for_four_nodes_of_eight_gpus_matches_the_documented_script(tmp_path):
    result = run_lmscale(
        "slurm",
        "submit",
        "--dry-run",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--partition",
        "gpu",
        "--time",
        "24:00:00",
        "--cpus-per-task",
        "64",
        "--account",
        "ml",
        str(REPO / "configs" / "gpt2-124m.yaml"),
        f"output_dir={tmp_path / 'big'}",
    )
    assert result.returncode == 0, result.stderr
    rendered = result.stdout.replace(str(tmp_path / "big"), "/runs/big").replace(
        str(REPO), "/path/to/lmscale"
    )
    rendered = re.sub(r"\S*/python\S* -u -m lmscale", "python -u -m lmscale", rendered)
    rendered = re.sub(r"--chdir=\S+", "--chdir=/path/to/lmscale", rendered)
    assert rendered.strip() == documented_example().strip()


def test_submit_without_sbatch_says_where_to_run(tmp_path):
    result = run_lmscale(
        "slurm", "submit", *CPU_JOB, f"output_dir={tmp_path / 'run'}", env={"PATH": "/nonexistent"}
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("lmscale: error:")]
    assert result.returncode != 0 and len(lines) == 1
    assert "`sbatch` is not on PATH" in lines[0] and "--dry-run" in lines[0]
    assert not (tmp_path / "run").exists()


def test_what_the_model_rules_out_is_refused_at_submission_not_after_the_queue(tmp_path):
    result = run_lmscale(
        "slurm", "submit", "--dry-run", "--cpu", "--gpus-per-node", "3", "model.preset=tiny-qwen3-moe",
        "parallel.expert=3", "model.tiled_mlp=true", f"output_dir={tmp_path / 'run'}",
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.startswith("lmscale: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "parallel.expert=3" in lines[0] and "not mixture-of-experts layers" in lines[0]
    assert not (tmp_path / "run").exists()


def test_nodes_times_gpus_must_agree_with_the_global_batch(tmp_path):
    result = run_lmscale(
        "slurm",
        "submit",
        "--dry-run",
        "--nodes",
        "2",
        "--gpus-per-node",
        "8",
        "train.micro_batch_size=4",
        "train.global_batch_size=32",
        f"output_dir={tmp_path / 'run'}",
    )
    assert result.returncode == 2
    assert "train.global_batch_size=32" in result.stderr and "16 rank(s) = 64" in result.stderr
