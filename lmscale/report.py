"""`lmscale report RUN_DIR`: the run's summary and PNG plots, read back from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmscale.errors import LmscaleError

# plot file -> (title, y label, metric keys drawn on it)
PLOTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "loss.png": ("Loss", "loss (nats/token)", ("loss", "eval_loss")),
    "lr.png": ("Learning rate", "lr", ("lr",)),
    "tokens_per_s.png": ("Throughput", "real tokens/s (all ranks)", ("tokens_per_s",)),
    "padding_frac.png": ("Padding", "padding / all tokens", ("padding_frac",)),
    "memory.png": (
        "Memory (largest rank)",
        "GiB",
        ("memory_allocated_gb", "memory_reserved_gb", "memory_rss_gb"),
    ),
}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise LmscaleError(f"{run_dir} has no metrics.jsonl: pass the output_dir of an lmscale run")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise LmscaleError(f"{path} line {number} is not JSON: the file was cut or edited") from None
    if not records:
        raise LmscaleError(f"{path} is empty: the run logged nothing yet")
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Steps, tokens, final and best held-out loss, mean throughput and MFU."""
    summary: dict[str, Any] = {"steps": max(r["step"] for r in records)}
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if train:
        summary["tokens"] = train[-1].get("tokens_seen", 0)
        summary["mean_tokens_per_s"] = sum(r["tokens_per_s"] for r in train) / len(train)
        mfus = [r["mfu"] for r in train if "mfu" in r]
        if mfus:
            summary["mean_mfu"] = sum(mfus) / len(mfus)
    if evals:
        summary["eval_loss"] = evals[-1]["eval_loss"]
        summary["eval_ppl"] = evals[-1]["eval_ppl"]
        summary["best_eval_loss"] = min(r["eval_loss"] for r in evals)
    return summary


def write_plots(records: list[dict[str, Any]], run_dir: Path) -> list[Path]:
    """One PNG per plot in PLOTS that has data, next to metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    written = []
    for filename, (title, ylabel, keys) in PLOTS.items():
        series = {k: [(r["step"], r[k]) for r in records if k in r] for k in keys}
        series = {k: points for k, points in series.items() if points}
        if not series:
            continue
        figure, axes = plt.subplots(figsize=(7, 4))
        for key, points in series.items():
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker="o" if len(points) < 30 else None, label=key)
        axes.set(title=title, xlabel="step", ylabel=ylabel)
        axes.grid(alpha=0.3)
        if len(series) > 1:
            axes.legend()
        figure.tight_layout()
        figure.savefig(run_dir / filename, dpi=100)
        plt.close(figure)
        written.append(run_dir / filename)
    return written


def report(run_dir: str) -> tuple[dict[str, Any], list[Path]]:
    directory = Path(run_dir)
    records = read_metrics(directory)
    return summarize(records), write_plots(records, directory)
