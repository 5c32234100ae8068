"""lmscale against the limit of this machine for its own model: the same batches through a bare loop.

    python bench/vs_limit.py [--steps 60] [--precision fp32] [--compile]

The bare loop runs in this process: the model lmscale builds (same preset, same seed), the very batches
lmscale's epoch plan deals to one rank (same rows, same lengths, same order, collated before the clock
starts), and per step only forward, the summed loss divided by the step's targets, backward, gradient
clipping and torch's fused AdamW. lmscale runs the same config through `lmscale train` (debug mode, one
process: DeepSpeed engine, data loader, metrics). Both count real tokens per second over the steps after
the first logging window (warm-up and start-up excluded from both). Ends with `ratio lmscale/bare: X`.
With `--compile`, the same pair again compiled (`model.compile=true`; the bare loop's model through
`torch.compile(dynamic=True)`), each compile outside the counted steps, and `ratio compiled lmscale/bare`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOG_EVERY = 10


def overrides(args, out: Path, compiled: bool = False) -> list[str]:
    return [
        f"model.compile={str(compiled).lower()}",
        f"output_dir={out}",
        f"precision={args.precision}",
        f"train.max_steps={args.steps}",
        f"train.log_every={LOG_EVERY}",
        f"train.eval_every={args.steps}",
        "train.eval_batches=1",
        f"checkpoint.save_every={args.steps}",
        "schedule.warmup_steps=5",
        "wandb.mode=disabled",
    ]


def lmscale_tokens_per_s(args, out: Path, compiled: bool = False) -> float:
    command = [sys.executable, "-m", "lmscale.cli", "train", *overrides(args, out, compiled)]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "tokens_per_s" in r][1:]  # the first window holds start-up
    return sum(r["tokens_per_s"] * r["step_time_s"] for r in windows) / sum(r["step_time_s"] for r in windows)


def bare_tokens_per_s(args, out: Path, compiled: bool = False) -> float:
    """The same config's model and batches through forward, loss, backward, clip and fused AdamW only."""
    import torch

    from lmscale.config import load_config
    from lmscale.data.batches import BatchSettings, BatchStream
    from lmscale.data.pipeline import prepare_data
    from lmscale.model.build import build_model
    from lmscale.objectives.loss import summed_token_loss

    config, _ = load_config(None, overrides(args, out))
    data = prepare_data(config.data)
    settings = BatchSettings("bucket", config.data.max_tokens_per_batch, 1, config.data.max_seq_len, 0)
    stream = BatchStream(data.train, settings, 0, 1, config.seed, data.tokenizer.pad_token_id)
    batches = [
        batch for _, batch in zip(range(args.steps), stream, strict=False)
    ]  # collated before the clock
    model = build_model(config.model, data.tokenizer, config.data.max_seq_len, config.seed)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)  # as DeepSpeed's bf16 mode runs the model (its fp32 master aside)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.optim.lr, betas=config.optim.betas, fused=True
    )
    model.train()
    forward = torch.compile(model, dynamic=True) if compiled else model
    tokens, started = 0, 0.0
    for step, batch in enumerate(batches):
        if step == LOG_EVERY:  # the same steps lmscale's windows count
            tokens, started = 0, time.perf_counter()
        logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = summed_token_loss(logits, batch["labels"]) / max(batch.group_targets, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch.real_tokens
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternating runs of each; the median is printed"
    )
    parser.add_argument("--compile", action="store_true", help="add the compiled pair")
    args = parser.parse_args()
    modes = [False, True] if args.compile else [False]
    figures: dict[tuple[str, bool], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # alternated, so a slow spell of the machine hits both
            for compiled in modes:
                tag = f"{'compiled' if compiled else 'eager'}-{repeat}"
                ours = lmscale_tokens_per_s(args, Path(tmp) / f"lmscale-{tag}", compiled)
                figures.setdefault(("lmscale", compiled), []).append(ours)
                bare = bare_tokens_per_s(args, Path(tmp) / "bare", compiled)
                figures.setdefault(("bare", compiled), []).append(bare)
    median = {key: statistics.median(values) for key, values in figures.items()}
    print(f"embedded default (tiny GPT-2, stdlib), {args.precision}, one process, {args.steps} steps")
    print(f"{'setup':<20}{'real tokens/s':>15}")
    for compiled in modes:
        for who in ("lmscale", "bare"):
            name = f"{who}{' compiled' if compiled else ''}"
            print(f"{name:<20}{median[who, compiled]:>15.0f}")
    if args.compile:
        ratio = median["lmscale", True] / median["bare", True]
        print(f"ratio compiled lmscale/bare: {ratio:.2f}")
    print(f"ratio lmscale/bare: {median['lmscale', False] / median['bare', False]:.2f}")


if __name__ == "__main__":
    main()
