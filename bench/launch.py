"""A 2-rank job's launch, side by side: the `deepspeed` runner in front of DeepSpeed's per-node launcher (what
`deepspeed --num_gpus 2 launcher/train.py ...` runs), against the per-node launcher as `lmscale launch` starts
it (lmscale.jobs.node_launcher: no runner, its look at the ranks every 50 ms instead of every second).

    python bench/launch.py [--repeats 3]

Both run the same worker with the same arguments (2 CPU ranks, 2 optimizer steps of the tiny Llama, warm
caches), alternating, in fresh processes. Per launcher: the median wall time of the whole job, and of its
tail, from the run's last line (the summary, printed just before the ranks exit) to the launcher's exit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lmscale.jobs.node_launcher import node_launcher_command  # noqa: E402

WORKER_ARGS = [
    "model.preset=tiny-llama",
    "data.max_seq_len=64",
    "data.vocab_size=1024",
    "train.max_steps=2",
    "schedule.warmup_steps=1",
    "train.eval_every=2",
    "train.eval_batches=1",
    "data.num_workers=0",
    "wandb.mode=disabled",
]


def launchers(port: int) -> dict[str, list[str]]:
    runner = shutil.which("deepspeed") or f"{sys.prefix}/bin/deepspeed"
    return {
        "deepspeed runner": [runner, "--log_level=error", "--master_port", str(port), "--num_gpus", "2"],
        "lmscale per-node": node_launcher_command({"localhost": [0, 1]}, "127.0.0.1", port, 0),
    }


def timed_job(command: list[str]) -> tuple[float, float]:
    """(whole job, tail after the run's last line) in seconds."""
    started = time.perf_counter()
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last_line_at = started
    for _ in job.stdout:
        last_line_at = time.perf_counter()
    if job.wait() != 0:
        raise RuntimeError(f"{command[:4]} failed with exit {job.returncode}")
    ended = time.perf_counter()
    return ended - started, ended - last_line_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        worker = [
            str(REPO / "launcher" / "train.py"),
            "--force",
            f"output_dir={tmp}/run",
            f"data.cache_dir={tmp}/cache",
            *WORKER_ARGS,
        ]
        commands = {name: command + worker for name, command in launchers(29731).items()}
        timed_job(
            commands["lmscale per-node"]
        )  # warms the caches (tokenizer, tokenized data, DeepSpeed's op)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, command in commands.items():
                times[name].append(timed_job(command))
    print(f"{'launcher':<20}{'job s':>8}{'tail s':>8}")
    for name, runs in times.items():
        whole = statistics.median(run[0] for run in runs)
        tail = statistics.median(run[1] for run in runs)
        print(f"{name:<20}{whole:>8.2f}{tail:>8.2f}")
    runner, ours = (statistics.median(run[0] for run in runs) for runs in times.values())
    print(f"ratio deepspeed runner / lmscale per-node job time: {runner / ours:.2f}")


if __name__ == "__main__":
    main()
