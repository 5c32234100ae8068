"""wandb.*, metrics.*, logging.* and eval.*: where figures go, and which benchmarks run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmscale.config.section import Section


class WandbConfig(Section):
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="W&B mode; offline needs no account."
    )
    project: str = Field("lmscale", description="W&B project name.")
    name: str | None = Field(None, description="W&B run name; unset = the output_dir's name.")
    group: str | None = Field(
        None, description="W&B group, to see related runs (a sweep, a seed study) together."
    )


class MetricsConfig(Section):
    peak_tflops: float | None = Field(
        None, gt=0, description="Per-device peak TFLOP/s for MFU/HFU; unset = looked up from the GPU's name."
    )


class LoggingConfig(Section):
    tensorboard: bool = Field(
        False, description="Also write TensorBoard event files to <output_dir>/tensorboard."
    )


class EvalConfig(Section):
    harness_tasks: list[str] = Field(
        [],
        description="lm-evaluation-harness tasks scored during training (at step 0, every harness_every, and the end).",
    )
    harness_every: int | None = Field(
        None, ge=1, description="Steps between harness evaluations; unset = at step 0 and the end only."
    )
    harness_limit: int | None = Field(
        None,
        ge=1,
        description="Documents per harness task (unset = all): the harness's time counts against the step.",
    )
    harness_include_path: str | None = Field(
        None, description="A directory of your own lm-eval task YAMLs for eval.harness_tasks."
    )
