"""Where metrics go: `metrics.jsonl` in the run dir, Weights & Biases, and a progress bar; rank 0 only."""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmscale.atomic import write_atomically
from lmscale.checkpointing.rundir import RunDir
from lmscale.config import Config
from lmscale.methods import console_extras

log = logging.getLogger("lmscale")


# Deprecations that one library's call of another raises on every rank, which a user cannot act on: peft
# reads transformers' `is_gradient_checkpointing`; DeepSpeed's ZeRO-3 calls torch's all_gather_into_tensor
# and reduce_scatter_tensor.
LIBRARY_DEPRECATIONS = (
    r"`is_gradient_checkpointing` is deprecated",
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
)


def configure_console(is_rank_zero: bool, libraries: tuple[str, ...] = ("datasets", "transformers")) -> None:
    """INFO on rank 0; other ranks speak only of problems, so a job prints each message once. The HF
    `libraries` a command uses are quieted (their progress bars and info lines); a command that uses
    neither names none, and so never pays for importing them (about a second)."""
    logging.basicConfig(
        level=logging.INFO if is_rank_zero else logging.WARNING,
        format="lmscale: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("datasets", "DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for message in LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    if "datasets" in libraries:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_warning()
    if "transformers" in libraries:
        quiet_transformers()


def quiet_transformers() -> None:
    """transformers' info lines and progress bars off (for commands that import it only when needed)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars: \r redraws in a log file


class MetricsSink:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors it to W&B and the bar."""

    def __init__(
        self, config: Config, run_dir: RunDir, total_steps: int, enabled: bool, initial_step: int = 0
    ) -> None:
        self.enabled = enabled
        self.path = run_dir.metrics
        self.expert_load_path = run_dir.expert_load
        self.wandb_run = None
        self.tensorboard = None
        self.bar = None
        self.shown: dict[str, str] = {}
        self.history: dict[str, list[float]] = {}  # for the end-of-run summary
        if not enabled:
            return
        if config.wandb.mode != "disabled":
            self.wandb_run = _start_wandb(config, run_dir)
        if config.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir.tensorboard))
        self.progress = ProgressLines(total_steps, initial_step)
        if sys.stderr.isatty():  # off a terminal (SLURM's %j.out, CI, | tee) a redrawn bar is noise
            self.bar = tqdm(
                total=total_steps,
                initial=initial_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0,
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            # "step" is the x-axis (define_metric), not W&B's own counter
            self._to_wandb(lambda run: run.log({"step": step, **wandb_names(metrics)}))
        for key, value in metrics.items():
            self.history.setdefault(key, []).append(value)
            if self.tensorboard is not None:
                self.tensorboard.add_scalar(key, value, step)
        self.shown.update({SHOWN[k]: f"{v:.4g}" for k, v in metrics.items() if k in SHOWN})
        if self.bar is not None:
            self.bar.set_postfix(self.shown, refresh=False)
        elif "loss" in metrics:
            self.message(self.progress.line(step, metrics))

    def log_expert_load(self, step: int, tokens: list[list[int]]) -> None:
        """Tokens routed to each expert of each MoE layer since the last logged step (expert_load.jsonl: too
        many figures for metrics.jsonl's scalars; the imbalance figures go there)."""
        if not self.enabled:
            return
        with self.expert_load_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, "tokens_per_expert": tokens}) + "\n")

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        """A line on the console that does not break the progress bar."""
        if self.enabled:
            tqdm.write(f"lmscale: {text}", file=sys.stderr)

    def summary(self, result: dict[str, Any]) -> dict[str, Any]:
        """The run's summary: `result` plus best eval loss and mean throughput/MFU from the history."""
        summary = dict(result)
        if self.history.get("eval_loss"):
            summary["best_eval_loss"] = min(self.history["eval_loss"])
        for key in ("tokens_per_s", "mfu"):
            if self.history.get(key):
                summary[f"mean_{key}"] = sum(self.history[key]) / len(self.history[key])
        return summary

    def close(self, result: dict[str, Any]) -> None:
        """Print the summary table, store the summary in W&B and close the run."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        summary = self.summary(result)
        print_summary_table(summary)
        if self.wandb_run is not None:
            directory = self.wandb_run.dir
            offline = self.wandb_run.settings.mode == "offline"
            self._to_wandb(lambda run: run.summary.update(wandb_summary(summary)))
            self._to_wandb(lambda run: run.finish())
            if offline:
                log.info("W&B run saved offline; upload it with: wandb sync %s", Path(directory).parent)

    def _to_wandb(self, action: Callable[[Any], object]) -> None:
        """W&B is a mirror of metrics.jsonl: if its service is gone (a signal sent to the whole process
        tree ends it too), warn once and go on, so the run still finishes its step and checkpoint."""
        if self.wandb_run is None:
            return
        try:
            action(self.wandb_run)
        except Exception as exc:  # wandb raises ConnectionResetError, BrokenPipeError or its own errors
            log.warning(
                "W&B stopped answering (%s): metrics go on in %s only", exc or type(exc).__name__, self.path
            )
            self.wandb_run = None


class ProgressLines:
    """The progress bar's content as one plain line per logged step, for logs that are files."""

    def __init__(self, total_steps: int, initial_step: int) -> None:
        self.total_steps = total_steps
        self.initial_step = initial_step
        self.started_s = time.perf_counter()

    def eta_s(self, step: int) -> float | None:
        done = step - self.initial_step
        if done <= 0:
            return None
        return (time.perf_counter() - self.started_s) / done * (self.total_steps - step)

    def line(self, step: int, metrics: dict[str, Any]) -> str:
        eta = self.eta_s(step)
        return (
            f"step {step}/{self.total_steps}: loss {metrics['loss']:.4f}, lr {metrics.get('lr', 0):.3e}, "
            f"{metrics.get('tokens_per_s', 0):,.0f} tokens/s{console_extras(metrics)}, ETA {format_duration(eta)}"
        )


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


PERF_METRICS = {
    "tokens_per_s",
    "tokens_per_s_per_device",
    "samples_per_s",
    "tflops_per_device",
    "mfu",
    "hfu",
    "step_time_s",
    "data_wait_s",
    "checkpoint_stall_s",
    "straggler_rank",
    "straggler_lag",
    "padding_frac",
}


def wandb_name(key: str) -> str:
    """A metric's W&B name, grouped by section (train/, eval/, perf/, memory/); metrics.jsonl keeps
    the flat key."""
    if "/" in key:  # already grouped (harness/TASK/METRIC)
        return key
    if key.startswith("eval_"):
        return f"eval/{key.removeprefix('eval_')}"
    if key.startswith("memory_"):
        return f"memory/{key.removeprefix('memory_')}"
    if key in PERF_METRICS:
        return f"perf/{key}"
    return f"train/{key}"


def wandb_names(metrics: dict[str, Any]) -> dict[str, Any]:
    return {wandb_name(key): value for key, value in metrics.items()}


SHOWN = {
    "loss": "loss",
    "tokens_per_s": "tok/s",
    "mfu": "mfu",
    "eval_ppl": "eval_ppl",
    "eval_pref_accuracy": "eval_pref_acc",
}
SUMMARY_ROWS = [
    ("steps", "steps", "{:,}"),
    ("tokens", "tokens", "{:,}"),
    ("wall_time_s", "wall time", "{:.0f} s"),
    ("mean_tokens_per_s", "mean tokens/s", "{:,.0f}"),
    ("mean_mfu", "mean MFU", "{:.1%}"),
    ("eval_loss", "final eval loss", "{:.4f}"),
    ("eval_ppl", "final eval perplexity", "{:.2f}"),
    ("eval_accuracy", "final eval accuracy", "{:.3f}"),
    ("eval_pref_accuracy", "final eval preference accuracy", "{:.3f}"),
    ("eval_rewards_margin", "final eval reward margin", "{:+.3f}"),
    ("best_eval_loss", "best eval loss", "{:.4f}"),
    ("checkpoint", "checkpoint", "{}"),
]


def print_summary_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lmscale run summary", show_header=False)
    for key, label, fmt in SUMMARY_ROWS:
        if key in summary:
            table.add_row(label, fmt.format(summary[key]))
    Console(stderr=True).print(table)


def wandb_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The run summary beside the logged metrics: eval/loss is the final one, perf/mean_... the means."""
    renamed = {
        "best_eval_loss": "eval/best_loss",
        "mean_tokens_per_s": "perf/mean_tokens_per_s",
        "mean_mfu": "perf/mean_mfu",
    }
    return {
        renamed.get(key, wandb_name(key) if key.startswith("eval_") else key): value
        for key, value in summary.items()
    }


def wandb_run_id(run_dir: RunDir) -> str:
    """The run's W&B id, kept in the run dir so a resumed run continues the same W&B run."""
    path = run_dir.wandb_run_id
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    run_id = secrets.token_hex(8)
    write_atomically(path, run_id + "\n")
    return run_id


def _start_wandb(config: Config, run_dir: RunDir) -> Any:
    if config.wandb.mode != "online":
        # wandb's own usage analytics (a process-wide exporter thread that first probes the W&B server, 10 s
        # timeout) follow the process's settings, read from WANDB_MODE, not the mode given to wandb.init: an
        # offline run would still try the network. The mode set here keeps them off with the run.
        os.environ["WANDB_MODE"] = config.wandb.mode
    import wandb

    run = wandb.init(
        project=config.wandb.project,
        name=config.wandb.name or run_dir.root.name,
        group=config.wandb.group,
        mode=config.wandb.mode,
        dir=str(run_dir.root),
        id=wandb_run_id(run_dir),
        resume="allow",
        config=config.model_dump(mode="json"),
        settings=wandb.Settings(quiet=True),
    )
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run
