"""Where metrics go: `metrics.jsonl` in the run dir, Weights & Biases, and a progress bar; rank 0 only."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmscale.config import Config

log = logging.getLogger("lmscale")


def configure_console(is_rank_zero: bool) -> None:
    """INFO on rank 0; other ranks speak only of problems, so a job prints each message once."""
    logging.basicConfig(
        level=logging.INFO if is_rank_zero else logging.WARNING,
        format="lmscale: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("datasets", "DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_warning()
    transformers.logging.set_verbosity_error()


class MetricsSink:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors it to W&B and the bar."""

    def __init__(self, config: Config, output_dir: Path, total_steps: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.wandb_run = None
        self.bar = None
        self.shown: dict[str, str] = {}
        if not enabled:
            return
        if config.wandb.mode != "disabled":
            self.wandb_run = _start_wandb(config, output_dir)
        self.bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        self.shown.update(
            {k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "tokens_per_s", "eval_ppl")}
        )
        self.bar.set_postfix(self.shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        """A line on the console that does not break the progress bar."""
        if self.enabled:
            tqdm.write(f"lmscale: {text}", file=sys.stderr)

    def close(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.summary.update(summary)
            directory = self.wandb_run.dir
            offline = self.wandb_run.settings.mode == "offline"
            self.wandb_run.finish()
            if offline:
                log.info("W&B run saved offline; upload it with: wandb sync %s", Path(directory).parent)


def _start_wandb(config: Config, output_dir: Path) -> Any:
    import wandb

    return wandb.init(
        project=config.wandb.project,
        name=config.wandb.name or output_dir.name,
        mode=config.wandb.mode,
        dir=str(output_dir),
        config=config.model_dump(mode="json"),
        settings=wandb.Settings(quiet=True),
    )
