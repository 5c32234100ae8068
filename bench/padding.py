"""Padding waste and useful throughput of `pad` vs `bucket` batching, measured side by side in one run.

Both modes train the same model on the same data with the same padded-token budget per micro-batch
(`pad`: budget / max_seq_len rows of max_seq_len; `bucket`: as many rows as fit the budget), through
the real `lmscale train` loop. Usage:

    python bench/padding.py [--data-path PATH] [--max-seq-len 1024] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_mode(mode: str, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    out = workdir / mode
    budget = args.rows * args.max_seq_len
    overrides = [
        f"output_dir={out}",
        f"data.batching={mode}",
        f"data.max_seq_len={args.max_seq_len}",
        f"data.max_tokens_per_batch={budget}",
        f"train.micro_batch_size={args.rows}",
        f"train.max_steps={args.steps}",
        "train.warmup_steps=2",
        "train.log_every=5",
        f"train.eval_every={args.steps}",
        "train.eval_batches=2",
        "wandb.mode=disabled",
        "data.num_workers=1",
    ]
    if args.data_path:
        overrides.append(f"data.path={args.data_path}")
    subprocess.run(
        [sys.executable, "-m", "lmscale.cli", "train", *overrides],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r][1:]  # the first window includes start-up
    return {
        "padding_frac": statistics.mean(r["padding_frac"] for r in train),
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in train),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-path", default=None, help="data.path to measure (default: the embedded corpus)"
    )
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=4, help="pad mode rows; the budget is rows x max_seq_len")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {mode: run_mode(mode, args, Path(tmp)) for mode in ("pad", "bucket")}
    print(f"{'mode':8} {'padding_frac':>13} {'useful tokens/s':>16}")
    for mode, figures in results.items():
        print(f"{mode:8} {figures['padding_frac']:13.3%} {figures['tokens_per_s']:16.0f}")
    print(
        f"ratio bucket/pad useful tokens/s: {results['bucket']['tokens_per_s'] / results['pad']['tokens_per_s']:.2f}"
    )


if __name__ == "__main__":
    main()
