"""Tokens/s of a tiny mixture-of-experts model with expert parallelism against data parallelism alone, on the
same ranks, measured side by side in one run.

Both train the same preset (4 experts, 2 per token) on the same batches through the real `lmscale launch` loop;
the runs alternate (data, expert, data, expert, ...) so that a slow spell of the machine hits both. Expert
parallelism (`parallel.expert`, DeepSpeed AutoEP) holds each expert on one rank of the group and sends every
token's hidden state to its experts' ranks and back (two all-to-alls per MoE layer, forward and backward);
data parallelism holds every expert everywhere and all-reduces their gradients. Throughput is the mean
`tokens_per_s` of the logged windows after the first (start-up). Usage:

    python bench/moe.py [--preset tiny-qwen3-moe] [--ranks 2] [--steps 30] [--repeats 2] [--precision fp32]
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


def tokens_per_s(out: Path, cache: Path, args: argparse.Namespace, expert: int) -> float:
    subprocess.run(
        [sys.executable, "-m", "lmscale.cli", "launch", "--gpus-per-node", str(args.ranks), f"output_dir={out}",
         f"data.cache_dir={cache}", f"model.preset={args.preset}", f"parallel.expert={expert}",
         f"zero.stage={args.zero}", f"precision={args.precision}", "data.max_seq_len=256", "data.vocab_size=1024",
         "data.max_tokens_per_batch=2048", f"train.max_steps={args.steps}", "schedule.warmup_steps=2",
         "train.log_every=5", f"train.eval_every={args.steps}", "train.eval_batches=1", "checkpoint.save_every=100000",
         "data.num_workers=0", "wandb.mode=disabled"],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    return statistics.mean(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-qwen3-moe")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--zero", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="fp32")  # CPU: bf16 matmuls are slow
    args = parser.parse_args()
    figures: dict[int, list[float]] = {1: [], args.ranks: []}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for repeat in range(args.repeats):
            for expert in (1, args.ranks):
                out = Path(tmp) / f"ep{expert}-{repeat}"
                figures[expert].append(tokens_per_s(out, cache, args, expert))
    print(
        f"{args.preset}, {args.ranks} CPU ranks, ZeRO-{args.zero}, {args.precision}, {args.steps} steps x {args.repeats}"
    )
    for expert, runs in figures.items():
        name = "data parallelism alone" if expert == 1 else f"experts split {expert} ways"
        print(
            f"{name:<26}{statistics.mean(runs):>10.0f} tokens/s   (runs: {', '.join(f'{r:.0f}' for r in runs)})"
        )
    ratio = statistics.mean(figures[args.ranks]) / statistics.mean(figures[1])
    print(f"ratio expert-parallel/data-parallel tokens/s: {ratio:.2f}")


if __name__ == "__main__":
    main()
