"""`lmscale report RUN_DIR`: the run's summary and a dashboard PNG, read back from metrics.jsonl."""

from __future__ import annotations

import json
from collections import deque
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


# A mixture-of-experts run's panels, after the method's, each only where its metrics were logged (a dense
# run shows none of them).
MOE_PANELS: list[Panel] = [
    (
        "Expert load",
        "tokens per expert / its layer's mean",
        ("expert_load_max_over_mean", "expert_load_min_over_mean"),
        True,
    ),
    ("Router loss", "load-balancing loss", ("router_aux_loss", "eval_router_aux_loss"), True),
    ("Routing bias", "largest |bias| (any layer, expert)", ("router_bias_absmax",), True),
]
EXPERT_LOADS_TITLE = "Expert load by layer"


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


def last_expert_loads(run_dir: Path) -> tuple[int, list[list[float]]] | None:
    """(step, tokens per expert of each layer) of the last complete line of expert_load.jsonl, or None."""
    path = RunDir(run_dir).expert_load
    if not path.is_file():
        return None
    with path.open() as lines:
        last_two = deque(lines, maxlen=2)  # a long run's file is large: stream it, keep the end
    for line in reversed(last_two):
        try:
            record = json.loads(line)
            return int(record["step"]), record["tokens_per_expert"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a killed run: the one before it is whole
    return None


def logged_panels(panels: list[Panel], records: list[dict[str, Any]]) -> list[Panel]:
    logged = {key for record in records for key in record}
    return [panel for panel in panels if logged.intersection(panel[2])]


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


def _draw_expert_loads(axes, figure, loads: tuple[int, list[list[float]]]) -> None:
    """Each layer's tokens per expert at the last logged step, over the layer's mean: a row per layer, white at
    balance, red for busy experts, blue for idle ones."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator

    step, counts = loads
    ratios = [[count / max(sum(layer) / len(layer), 1e-9) for count in layer] for layer in counts]
    highest = max(max(row) for row in ratios)
    image = axes.imshow(
        ratios, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(highest, 2.0))
    )
    axes.set(title=f"{EXPERT_LOADS_TITLE} (step {step})", xlabel="expert", ylabel="MoE layer")
    for axis in (axes.xaxis, axes.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))  # experts and layers are whole numbers
    figure.colorbar(image, ax=axes, label="tokens / layer's mean")


def write_dashboard(
    records: list[dict[str, Any]],
    out_dir: Path,
    title: str,
    figures: MethodFigures = SFT.figures,
    expert_loads: tuple[int, list[list[float]]] | None = None,
) -> Path:
    """Every panel of the run's method in one PNG, `report.png`; a mixture-of-experts run's routing panels
    after them, with `expert_loads` (`last_expert_loads`) as a map of the last logged step's loads."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    tokens = tokens_at(records)
    panels = dashboard_panels(figures) + logged_panels(MOE_PANELS, records)
    drawn = len(panels) + (expert_loads is not None)
    rows = -(-drawn // 4)
    figure, grid = plt.subplots(rows, 4, figsize=(20, 4.5 * rows))
    for axes in grid.flat[drawn:]:
        axes.set_visible(False)
    if expert_loads is not None:
        _draw_expert_loads(grid.flat[len(panels)], figure, expert_loads)
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
    dashboard = write_dashboard(
        records, Path(out_dir) if out_dir else directory, title, figures, last_expert_loads(directory)
    )
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
    """The run dir, and what was trained how: model, method, precision, ZeRO stage and any tensor/sequence/expert
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
    expert = parallel.get("expert") or ds_config.get("expert_parallel", {}).get("autoep_size", 1)
    parts += [f"tensor {tensor}"] if tensor > 1 else []
    parts += [f"sequence {sequence}"] if sequence > 1 else []
    parts += [f"expert {expert}"] if expert > 1 else []
    return f"{directory} ({', '.join(parts)})"
