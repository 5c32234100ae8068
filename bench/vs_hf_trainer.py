"""lmscale vs HF Trainer (DeepSpeed integration), side by side in one run, on the same everything.

Same tiny GPT-2 config, same tokenizer (trained once by lmscale), same real variable-length data
(paragraphs of the standard library, tokenized once), one epoch each (so the same real tokens),
the same DeepSpeed ZeRO-2 bf16 set-up on the same 2 CPU ranks, the same LR, warm-up and cosine decay.
lmscale batches by length under a token budget; HF Trainer pads each batch to its longest row, with
random batches and with `group_by_length`, or removes padding altogether (`DataCollatorWithFlattening`:
one row per batch, per-document position ids), at the batch size that gives the same real tokens per
step; `--compile` adds lmscale with `model.compile=true` and HF Trainer with `group_by_length` (its fastest
batching here) and `torch_compile=True`. Prints real tokens/s for each,
the held-out loss of each trained model (scored by the same `lmscale eval` on the same held-out file),
the peak resident set of each setup's largest process (a rank), and the ratios against HF Trainer's
fastest row. A second lmscale run with `model.fused_kernels=false` (HF's own GELU modules, as HF
Trainer runs them) shows how much of the gap is batching and how much the fused kernel. HF Trainer's
ranks run with OMP_NUM_THREADS set to their share of the cores, as lmscale sets its ranks' threads by
default (left to DeepSpeed's launcher, each rank takes every core). `--repeats N` runs lmscale and HF
Trainer's fastest row N times in all, alternately, and takes the median time of each. Usage:

    python bench/vs_hf_trainer.py [--paragraphs 6000] [--max-seq-len 256] [--budget 2048] [--compile]
                                  [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SEED = 1234


def write_corpus(directory: Path, paragraphs: int) -> tuple[Path, Path]:
    """Train and held-out jsonl of stdlib paragraphs (the embedded corpus's own train/held-out files)."""
    from lmscale.data.sources import embedded_corpus_files

    def blocks(files: list[str], limit: int) -> list[str]:
        found = []
        for name in files:
            for block in Path(name).read_text(encoding="utf-8", errors="replace").split("\n\n"):
                if len(block.strip()) >= 40:
                    found.append(block)
                if len(found) == limit:
                    return found
        return found

    train_files, held_out_files = embedded_corpus_files()
    paths = (directory / "train.jsonl", directory / "eval.jsonl")
    for path, texts in zip(
        paths, (blocks(train_files, paragraphs), blocks(held_out_files, 600)), strict=True
    ):
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return paths


def shared_overrides(args, workdir: Path) -> list[str]:
    """lmscale's settings in every side-by-side benchmark (bench/vs_trl.py too): the HF side sets the same."""
    return [
        f"data.cache_dir={workdir / 'cache'}",
        f"data.max_seq_len={args.max_seq_len}",
        f"data.max_tokens_per_batch={args.budget}",
        "data.num_workers=1",
        f"seed={getattr(args, 'seed', SEED)}",  # the data order's (bench/vs_trl.py --seed)
        "precision=bf16",
        "zero.stage=2",
        f"optim.lr={args.lr}",
        "schedule.min_lr=0",
        f"schedule.warmup_steps={args.warmup}",
        "wandb.mode=disabled",
    ]


def timed_run_overrides(out: Path, steps: int) -> list[str]:
    """A run of `steps` whose loop time is training: one short evaluation, one checkpoint, one metrics line."""
    return [
        f"output_dir={out}",
        f"train.max_steps={steps}",
        f"train.eval_every={steps}",
        "train.eval_batches=1",
        f"checkpoint.save_every={steps}",
        f"train.log_every={steps}",
    ]


def lmscale_args(args, workdir: Path, train: Path, held_out: Path) -> list[str]:
    return [
        "model.preset=tiny-gpt2",
        f"data.path={train}",
        f"data.eval_path={held_out}",
        f"data.vocab_size={args.vocab}",
        *shared_overrides(args, workdir),
    ]


def prepare(args, workdir: Path, train: Path, held_out: Path):
    """Tokenize once with lmscale's pipeline; the HF side reads the same sequences and tokenizer."""
    from lmscale.config import load_config
    from lmscale.data.bucketing import plan_epoch
    from lmscale.data.pipeline import prepare_data
    from lmscale.model.build import preset_config

    config, _ = load_config(None, lmscale_args(args, workdir, train, held_out))
    data = prepare_data(config.data)
    data.tokenizer.save_pretrained(str(workdir / "tokenizer"))
    data.train.save_to_disk(str(workdir / "sequences"))
    tokenizer = data.tokenizer
    model_config = preset_config(
        "tiny-gpt2", len(tokenizer), args.max_seq_len, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    model_config.save_pretrained(str(workdir / "model_config"))
    lengths = np.asarray(data.train["length"])
    steps = len(plan_epoch(lengths, 2, SEED, 0, max_tokens=args.budget))  # one epoch on 2 ranks
    return lengths, steps


# Runs a command and reports the peak resident set of its largest process (a rank: launchers are small).
# On Linux a waited-for child's ru_maxrss carries the maximum over its own waited-for descendants.
PEAK_RSS = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    "print(f'peak_rss_kb={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr); "
    "sys.exit(code)"
)


def run(command: list[str]) -> str:
    return run_measured(command)[0]


def run_measured(command: list[str], env: dict[str, str] | None = None) -> tuple[str, float]:
    """(output, peak resident set in MB of the largest process the command ran)."""
    wrapped = [sys.executable, "-c", PEAK_RSS, *command]
    result = subprocess.run(
        wrapped, cwd=REPO, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})}
    )
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    peak_kb = int(re.findall(r"peak_rss_kb=(\d+)", result.stderr)[-1])
    return result.stdout + result.stderr, peak_kb / 1024


def held_out_loss(target: Path, held_out: Path) -> float:
    output = run(
        [sys.executable, "-m", "lmscale.cli", "eval", str(target), "--data", str(held_out), "--json"]
    )
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])["eval_loss"]


def run_lmscale(
    args,
    workdir: Path,
    train: Path,
    held_out: Path,
    steps: int,
    fused_kernels: bool = True,
    compiled: bool = False,
    run: int = 0,
) -> dict:
    out = workdir / f"lmscale{'' if fused_kernels else '-unfused'}{'-compiled' if compiled else ''}-{run}"
    overrides = [
        *lmscale_args(args, workdir, train, held_out),
        f"model.fused_kernels={str(fused_kernels).lower()}",
        f"model.compile={str(compiled).lower()}",
        *timed_run_overrides(out, steps),
    ]
    output, peak_mb = run_measured(
        [sys.executable, "-m", "lmscale.cli", "launch", "--gpus-per-node", "2", *overrides]
    )
    match = re.search(r"after \d+ steps, ([\d,]+) tokens in ([\d.]+) s", output)
    tokens, seconds = int(match.group(1).replace(",", "")), float(match.group(2))
    return {
        "tokens": tokens,
        "seconds": seconds,
        "eval_loss": held_out_loss(out, held_out),
        "peak_mb": peak_mb,
    }


def run_hf(args, workdir: Path, held_out: Path, batch_size: int, *flags: str, run: int = 0) -> dict:
    out = workdir / ("hf" + "".join(flags).replace("--", "-") + f"-{run}")
    command = [
        shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", str(REPO / "bench" / "hf_trainer_worker.py"),
        "--sequences", str(workdir / "sequences"), "--tokenizer", str(workdir / "tokenizer"),
        "--model-config", str(workdir / "model_config"), "--out", str(out), "--batch-size", str(batch_size),
        "--lr", str(args.lr), "--warmup-steps", str(args.warmup), "--seed", str(SEED),
    ]  # fmt: skip
    # Each of the 2 ranks its share of the cores, counted as lmscale.parallel.engine.share_cpu_cores counts them
    # (DeepSpeed's launcher gives each rank all of them).
    import torch

    threads = str(max(1, torch.get_num_threads() // 2))
    output, peak_mb = run_measured([*command, *flags], env={"OMP_NUM_THREADS": threads})
    figures = json.loads([line for line in output.splitlines() if line.startswith('{"real_tokens"')][-1])
    return {
        "tokens": figures["real_tokens"],
        "seconds": figures["train_runtime_s"],
        "eval_loss": held_out_loss(out / "model", held_out),
        "peak_mb": peak_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paragraphs", type=int, default=6000)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--budget", type=int, default=2048, help="lmscale tokens per micro-batch per rank")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--compile", action="store_true", help="add lmscale and HF Trainer (group_by_length) compiled"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of lmscale and HF's fastest row (median time)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        train, held_out = write_corpus(workdir, args.paragraphs)
        lengths, steps = prepare(args, workdir, train, held_out)
        # HF rows per batch that carry the same real tokens per step as lmscale's budget (one epoch each)
        batch_size = max(1, round(lengths.sum() / (2 * steps) / lengths.mean()))
        print(
            f"{len(lengths)} sequences, {int(lengths.sum()):,} real tokens (mean {lengths.mean():.0f}, max "
            f"{lengths.max()}); 2 CPU ranks, ZeRO-2 bf16; lmscale budget {args.budget} tokens = {steps} steps; "
            f"HF Trainer {batch_size} rows per device"
        )
        started = time.time()
        rows = {  # each a function of the run's number (a repeat runs in a directory of its own)
            "lmscale (bucket)": lambda run: run_lmscale(args, workdir, train, held_out, steps, run=run),
            "lmscale (bucket, unfused)": lambda run: run_lmscale(
                args, workdir, train, held_out, steps, False, run=run
            ),
            "hf_trainer (random)": lambda run: run_hf(args, workdir, held_out, batch_size, run=run),
            "hf_trainer (group_by_length)": lambda run: run_hf(
                args, workdir, held_out, batch_size, "--group-by-length", run=run
            ),
            "hf_trainer (padding-free)": lambda run: run_hf(
                args, workdir, held_out, batch_size, "--padding-free", run=run
            ),
        }
        if args.compile:  # both with their compile time in the run's seconds, as HF's train_runtime has it
            rows["lmscale (bucket, compiled)"] = lambda run: run_lmscale(
                args, workdir, train, held_out, steps, compiled=True, run=run
            )
            # HF's best batching on this CPU (group_by_length; padding-free is its slowest here)
            rows["hf_trainer (group_by_length, compiled)"] = lambda run: run_hf(
                args, workdir, held_out, batch_size, "--group-by-length", "--torch-compile", run=run
            )
        results = {}
        for name, row in rows.items():
            results[name] = row(0)
            print(f"  {name}: {results[name]['seconds']:.1f} s", flush=True)  # what a crash would lose
        fastest_hf = max(
            (n for n in results if n.startswith("hf_trainer")),
            key=lambda n: results[n]["tokens"] / results[n]["seconds"],
        )
        repeat_fastest(args, results, rows, fastest_hf)
        report(results)
        print(f"(whole benchmark {time.time() - started:.0f} s)")
        ours, best = results["lmscale (bucket)"], results[fastest_hf]
        print(f"ratio memory lmscale/hf_trainer (its fastest row): {ours['peak_mb'] / best['peak_mb']:.2f}")
        print(f"ratio lmscale/hf_trainer: {ours['tokens_per_s'] / best['tokens_per_s']:.2f}")


def repeat_fastest(args, results: dict[str, dict], rows: dict, fastest_hf: str) -> None:
    """Run lmscale and HF's fastest row `args.repeats - 1` more times, alternately; keep the median times."""
    if args.repeats < 2:
        return
    times = {name: [results[name]["seconds"]] for name in ("lmscale (bucket)", fastest_hf)}
    for run in range(1, args.repeats):
        for name, seconds in times.items():
            seconds.append(rows[name](run)["seconds"])
            print(f"  {name}, run {run + 1}: {seconds[-1]:.1f} s", flush=True)
    for name, seconds in times.items():
        results[name]["seconds"] = statistics.median(seconds)
        print(f"{name}: {', '.join(f'{s:.1f}' for s in seconds)} s (median {results[name]['seconds']:.1f})")
    pairs = zip(times["lmscale (bucket)"], times[fastest_hf], strict=True)
    print(f"ratio lmscale/{fastest_hf} run by run: {', '.join(f'{hf / ours:.2f}' for ours, hf in pairs)}")


def report(results: dict[str, dict]) -> None:
    print(
        f"{'setup':<38}{'real tokens':>12}{'seconds':>9}{'real tokens/s':>15}{'held-out loss':>15}{'peak MB':>9}"
    )
    for name, r in results.items():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        print(
            f"{name:<38}{r['tokens']:>12,}{r['seconds']:>9.1f}{r['tokens_per_s']:>15.0f}{r['eval_loss']:>15.4f}"
            f"{r['peak_mb']:>9.0f}"
        )
    ours = results["lmscale (bucket)"]["tokens_per_s"]
    for name, r in results.items():
        if name != "lmscale (bucket)":
            print(f"ratio lmscale/{name}: {ours / r['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
