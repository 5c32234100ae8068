"""Padding waste and useful throughput of `pad`, `bucket` and `pack` batching, measured side by side in one run.

All modes train the same model on the same data with the same padded-token budget per micro-batch
(`pad`: budget / max_seq_len rows of max_seq_len; `bucket`: as many rows as fit the budget; `pack`:
budget / max_seq_len rows of whole documents end to end), through the real `lmscale train` loop. Usage:

    python bench/padding.py [--data-path PATH] [--max-seq-len 512] [--steps 30]

Without --data-path it measures two real corpora built from the embedded one: whole stdlib files as
documents (mostly long: little padding to save), and the same sources cut at blank lines into
paragraphs (short and varied, like most text corpora).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def paragraph_corpus(directory: Path) -> Path:
    """The embedded corpus's training files in one text file, which lmscale splits at blank lines."""
    from lmscale.data.sources import embedded_corpus_files

    path = directory / "stdlib_paragraphs.txt"
    with path.open("w", encoding="utf-8") as out:
        for name in embedded_corpus_files()[0]:
            out.write(Path(name).read_text(encoding="utf-8", errors="replace") + "\n\n")
    return path


def run_mode(mode: str, data_path: str | None, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    out = workdir / f"{mode}-{Path(data_path).stem if data_path else 'embedded'}"
    budget = args.rows * args.max_seq_len
    overrides = [
        f"output_dir={out}",
        f"data.batching={mode}",
        f"data.max_seq_len={args.max_seq_len}",
        f"data.max_tokens_per_batch={budget}",
        f"train.micro_batch_size={args.rows}",
        f"train.max_steps={args.steps}",
        "schedule.warmup_steps=2",
        "train.log_every=5",
        f"train.eval_every={args.steps}",
        "train.eval_batches=2",
        "wandb.mode=disabled",
        "data.num_workers=1",
    ]
    if data_path:
        overrides.append(f"data.path={data_path}")
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
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--rows", type=int, default=4, help="pad mode rows; the budget is rows x max_seq_len")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        corpora = (
            {"data.path": args.data_path}
            if args.data_path
            else {"stdlib files": None, "stdlib paragraphs": str(paragraph_corpus(workdir))}
        )
        for name, data_path in corpora.items():
            results = {mode: run_mode(mode, data_path, args, workdir) for mode in ("pad", "bucket", "pack")}
            print(
                f"\n{name} (max_seq_len {args.max_seq_len}, {args.rows * args.max_seq_len} padded tokens per batch)"
            )
            print(f"{'mode':8} {'padding_frac':>13} {'useful tokens/s':>16}")
            for mode, figures in results.items():
                print(f"{mode:8} {figures['padding_frac']:13.1%} {figures['tokens_per_s']:16.0f}")
            for mode in ("bucket", "pack"):
                ratio = results[mode]["tokens_per_s"] / results["pad"]["tokens_per_s"]
                print(f"ratio {mode}/pad useful tokens/s: {ratio:.2f}")


if __name__ == "__main__":
    main()
