"""Start-up times, measured as a user meets them: `lmscale --help`; `lmscale plan` of a GPT-2 and of a
Llama with LoRA adapters (facts worked out from the config) and of a GPT-NeoX model (a family whose facts
are counted on the meta device the first time, then cached); and the embedded default's time from the
command to its first optimizer step with warm caches.

    python bench/startup.py [--repeats 3]

Each figure is the median of `--repeats` runs of the real CLI in a fresh process. The first-step time
runs `lmscale train` once to warm the caches (tokenizer, tokenized data, DeepSpeed's JIT-built op),
then again, stopping each run at the line of its first logged step. It includes the untrained
held-out evaluation that precedes step 1: a user waits for that too.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLAN = ["plan", "configs/gpt2-124m.yaml", "--gpus-per-node", "8"]
PLAN_LORA = ["plan", "configs/llama-1b.yaml", "finetune.lora.r=16", "--gpus-per-node", "8"]


def plan_neox(directory: Path) -> list[str]:
    """`lmscale plan` of a local GPT-NeoX model (Pythia-160M's shape), a family lmscale.planning.config_count leaves
    to the meta device."""
    from transformers import AutoConfig

    if not (directory / "config.json").is_file():
        AutoConfig.for_model("gpt_neox", hidden_size=768, num_attention_heads=12, num_hidden_layers=12,
                             intermediate_size=3072, vocab_size=50304).save_pretrained(directory)  # fmt: skip
    return ["plan", f"model.path={directory}", "--gpus-per-node", "8"]


TARGETS_S = {
    "lmscale --help": 1.0,
    "lmscale plan": 3.0,
    "lmscale plan, LoRA": 3.0,
    "lmscale plan, GPT-NeoX": 3.0,
    "lmscale plan, GPT-NeoX uncached": 3.0,
    "first optimizer step": 20.0,
}


def timed(command: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(
        command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    return time.perf_counter() - started


def first_step_s(output_dir: Path) -> float:
    """Seconds from starting `lmscale train` to its first logged optimizer step (then the run is stopped)."""
    command = [
        *lmscale(),
        "train",
        f"output_dir={output_dir}",
        "train.log_every=1",
        "wandb.mode=disabled",
        "--force",
    ]
    started = time.perf_counter()
    job = subprocess.Popen(
        command,
        cwd=REPO,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        for line in job.stderr:
            if line.startswith("lmscale: step 1/"):
                return time.perf_counter() - started
        raise RuntimeError(f"lmscale train ended (exit {job.wait()}) before its first step")
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


def lmscale() -> list[str]:
    return [sys.executable, "-m", "lmscale.cli"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs = {
        "lmscale --help": lambda: timed([*lmscale(), "--help"]),
        # GPT-2's facts come from its config (lmscale.planning.config_count), never from the cache.
        "lmscale plan": lambda: timed([*lmscale(), *PLAN], env={"LMSCALE_CACHE": "off"}),
        "lmscale plan, LoRA": lambda: timed([*lmscale(), *PLAN_LORA], env={"LMSCALE_CACHE": "off"}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        neox = plan_neox(Path(tmp) / "neox")
        # A GPT-NeoX model is built on the meta device the first time, then read from the cache
        # (lmscale.planning.plan.facts_cache_path).
        runs["lmscale plan, GPT-NeoX"] = lambda: timed([*lmscale(), *neox])
        runs["lmscale plan, GPT-NeoX uncached"] = lambda: timed(
            [*lmscale(), *neox], env={"LMSCALE_CACHE": "off"}
        )
        run_dir = Path(tmp) / "run"
        first_step_s(run_dir)  # warms the caches
        timed([*lmscale(), *neox])  # and the GPT-NeoX model's facts
        runs["first optimizer step"] = lambda: first_step_s(run_dir)
        print(f"{'what':<34}{'median s':>10}{'target s':>10}")
        for name, run in runs.items():
            median = statistics.median(run() for _ in range(args.repeats))
            print(f"{name:<34}{median:>10.2f}{TARGETS_S[name]:>10.1f}")


if __name__ == "__main__":
    main()
