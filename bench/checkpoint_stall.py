"""The training loop's stall per checkpoint, synchronous against `checkpoint.async: true`, side by side.

The same job twice on 2 CPU ranks (GPT-2 124M's shape with a 1,024-token vocabulary, ZeRO-2, bf16, a
checkpoint every 2 steps: ~86M parameters, ~1.2 GB per checkpoint with the Adam states), once with
synchronous saves and once with background ones. Every second the loop spends on checkpoints is logged as
`checkpoint_stall_s` (the save itself; for background saves also the ranks' agreement each step and the
completion). A save's stall is the sum over the steps before the last, divided by the saves among them;
the last save is shown apart: after the last step there is no training left to hide its write behind.
Usage: python bench/checkpoint_stall.py [--steps 12] [--save-every 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train(out: Path, cache: Path, steps: int, save_every: int, background: bool) -> None:
    subprocess.run(
        [sys.executable, "-m", "lmscale.cli", "launch", "--gpus-per-node", "2", "model.preset=gpt2-124m",
         "zero.stage=2", "precision=bf16", f"output_dir={out}", f"data.cache_dir={cache}", "data.vocab_size=1024",
         "data.max_seq_len=64", "data.max_tokens_per_batch=128", f"train.max_steps={steps}",
         "schedule.warmup_steps=1", f"train.eval_every={steps}", "train.eval_batches=1", "train.log_every=1",
         f"checkpoint.save_every={save_every}", f"checkpoint.async={str(background).lower()}",
         "wandb.mode=disabled"],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip


def stalls(out: Path, steps: int, save_every: int) -> tuple[float, float, float]:
    """(mean stall per save before the last step, the last step's stall, mean step time) in seconds."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stall_by_step: dict[int, float] = {}
    for record in records:
        if "checkpoint_stall_s" in record:
            stall_by_step[record["step"]] = (
                stall_by_step.get(record["step"], 0.0) + record["checkpoint_stall_s"]
            )
    saves = len(range(save_every, steps, save_every))
    before_last = sum(s for step, s in stall_by_step.items() if step < steps)
    step_times = [r["step_time_s"] for r in records if "step_time_s" in r]
    return before_last / saves, stall_by_step.get(steps, 0.0), statistics.median(step_times)


def checkpoint_bytes(out: Path) -> int:
    newest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    return sum(f.stat().st_size for f in newest.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        rows = {}
        for name, background in (("sync", False), ("async", True)):
            out = Path(tmp) / name
            train(out, cache, args.steps, args.save_every, background)
            rows[name] = (*stalls(out, args.steps, args.save_every), checkpoint_bytes(out))
    print(f"{'saves':<6}{'stall per save s':>18}{'last save s':>13}{'step time s':>13}{'checkpoint GB':>15}")
    for name, (per_save, last, step_s, size) in rows.items():
        print(f"{name:<6}{per_save:>18.3f}{last:>13.3f}{step_s:>13.3f}{size / 1e9:>15.2f}")
    print(f"ratio async/sync stall: {rows['async'][0] / rows['sync'][0]:.3f}")


if __name__ == "__main__":
    main()
