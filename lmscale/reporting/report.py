"""`lmscale report RUN_DIR`: the run's summary and a dashboard PNG, read back from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmscale.checkpointing.rundir import RunDir
from lmscale.errors import LmscaleError
from lmscale.methods import SFT, MethodFigures, Panel, method_of_saved

# Every run's panels, in reading order: (title, y label, metric keys, y axis starts at zero); the loss
# panels take the method's loss label, and the method's own panels follow. Rates and sizes start at zero
# so a small wobble does not look like a collapse.
PANELS: list[Panel] = [
    ("Loss by step", SFT.figures.loss_label, ("loss", "eval_loss"), False),
    ("Loss by tokens", SFT.figures.loss_label, ("loss", "eval_loss"), False),
    ("Learning rate", "lr", ("lr",), True),
    ("Gradient norm", "global L2 norm (before clipping)", ("grad_norm",), True),
    ("Throughput", "real tokens/s (all ranks)", ("tokens_per_s",), True),
    ("Memory (largest rank)", "GiB", ("memory_allocated_gb", "memory_reserved_gb", "memory_rss_gb"), True),
    ("Step time", "s per optimizer step", ("step_time_s", "data_wait_s", "straggler_lag"), True),
    ("Padding", "padding / all tokens", ("padding_frac",), True),
]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = RunDir(run_dir).metrics
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


def summarize(records: list[dict[str, Any]], figures: MethodFigures = SFT.figures) -> dict[str, Any]:
    """Steps, tokens, the method's final held-out figures, best held-out loss, mean throughput and MFU."""
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
        summary |= {key: evals[-1][key] for key in figures.summary_keys if key in evals[-1]}
        summary["best_eval_loss"] = min(r["eval_loss"] for r in evals)
    return summary


def tokens_at(records: list[dict[str, Any]]) -> dict[int, int]:
    """Tokens seen by each logged step; an evaluation's step takes the nearest logged step at or before it."""
    seen = sorted((r["step"], r["tokens_seen"]) for r in records if "tokens_seen" in r)
    result, latest, index = {}, 0, 0
    for step in sorted({r["step"] for r in records}):
        while index < len(seen) and seen[index][0] <= step:
            latest, index = seen[index][1], index + 1
        result[step] = latest
    return result


def _series(records: list[dict[str, Any]], key: str, x_of) -> list[tuple[float, float]]:
    return [(x_of(r), r[key]) for r in records if key in r]


def _draw_panel(axes, records, panel, x_of, xlabel: str) -> bool:
    title, ylabel, keys, from_zero = panel
    drawn = False
    for key in keys:
        points = _series(records, key, x_of)
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        marker = "o" if key.startswith("eval_") or len(points) < 30 else None
        axes.plot(xs, ys, marker=marker, label=key, linestyle="--" if key.startswith("eval_") else "-")
        drawn = True
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    if from_zero:
        axes.set_ylim(0, axes.get_ylim()[1] * 1.08)  # headroom: a flat line does not sit on the frame
    if drawn:
        axes.legend(loc="best", fontsize="small")
    else:
        axes.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axes.transAxes)
    return drawn


def _add_mfu(axes, records: list[dict[str, Any]]) -> None:
    """MFU on a second axis of the throughput panel (both are rates: both start at zero)."""
    points = _series(records, "mfu", lambda r: r["step"])
    if not points:
        return
    twin = axes.twinx()
    xs, ys = zip(*points, strict=True)
    twin.plot(xs, [100 * y for y in ys], color="tab:red", label="mfu")
    twin.set_ylabel("MFU (%)")
    twin.set_ylim(bottom=0)
    lines = axes.get_lines() + twin.get_lines()
    axes.legend(lines, [line.get_label() for line in lines], loc="best", fontsize="small")


def dashboard_panels(figures: MethodFigures) -> list[Panel]:
    """PANELS with the method's loss label (and its held-out loss where it is one), then the method's own
    panels."""
    common = [
        (title, figures.loss_label, keys if figures.held_out_loss else ("loss",), zero)
        if title.startswith("Loss")
        else (title, label, keys, zero)
        for title, label, keys, zero in PANELS
    ]
    return common + list(figures.panels)


def write_dashboard(
    records: list[dict[str, Any]], out_dir: Path, title: str, figures: MethodFigures = SFT.figures
) -> Path:
    """Every panel of the run's method in one PNG, `report.png`."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    tokens = tokens_at(records)
    panels = dashboard_panels(figures)
    rows = -(-len(panels) // 4)
    figure, grid = plt.subplots(rows, 4, figsize=(20, 4.5 * rows))
    for axes in grid.flat[len(panels) :]:
        axes.set_visible(False)
    for axes, panel in zip(grid.flat, panels, strict=False):
        by_tokens = panel[0] == "Loss by tokens"
        x_of = (lambda r: tokens[r["step"]]) if by_tokens else (lambda r: r["step"])
        _draw_panel(axes, records, panel, x_of, "tokens seen" if by_tokens else "step")
        if by_tokens:
            axes.xaxis.set_major_formatter(EngFormatter())  # 120k, 3.2G: not 120000
        if panel[0] == "Throughput":
            _add_mfu(axes, records)
    figure.suptitle(title)
    figure.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = RunDir(out_dir).report
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def report(run_dir: str, out_dir: str | None = None) -> tuple[dict[str, Any], Path]:
    """The run's summary, and its dashboard written to `out_dir` (default: the run dir)."""
    directory = Path(run_dir)
    records = read_metrics(directory)
    config, ds_config = saved_configs(directory)
    figures = method_of_saved(config).figures
    title = run_title(directory, config, ds_config)
    dashboard = write_dashboard(records, Path(out_dir) if out_dir else directory, title, figures)
    return summarize(records, figures), dashboard


def saved_configs(directory: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The run's config.yaml and DeepSpeed config as dicts; None for each when missing or unreadable
    (metrics copied without the run's files still make a report)."""
    import yaml

    run = RunDir(directory)
    try:
        config = yaml.safe_load(run.config.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        config = None
    try:
        ds_config = json.loads(run.ds_config.read_text())
    except (OSError, ValueError):
        ds_config = None
    return (config if isinstance(config, dict) else None), (
        ds_config if isinstance(ds_config, dict) else None
    )


def run_title(directory: Path, config: dict[str, Any] | None, ds_config: dict[str, Any] | None) -> str:
    """The run dir, and what was trained how: model, method, precision, ZeRO stage and any tensor/sequence
    layout (read from the run's config and DeepSpeed config)."""
    if config is None or ds_config is None:
        return str(directory)  # metrics without the run's files: the plots still say whose they are
    model = config.get("model", {})
    parts = [
        str(model.get("path") or model.get("preset")),
        *([method_of_saved(config).name] if method_of_saved(config) is not SFT else []),
        str(config.get("precision")),
        f"ZeRO-{ds_config.get('zero_optimization', {}).get('stage', 0)}",
    ]
    parallel = config.get("parallel") or {}
    tensor = parallel.get("tensor") or ds_config.get("tensor_parallel", {}).get("autotp_size", 1)
    sequence = parallel.get("sequence") or ds_config.get("sequence_parallel_size", 1)
    parts += [f"tensor {tensor}"] if tensor > 1 else []
    parts += [f"sequence {sequence}"] if sequence > 1 else []
    return f"{directory} ({', '.join(parts)})"
