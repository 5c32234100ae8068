"""train.* (length, batch, evaluation), optim.*, schedule.*, checkpoint.* and zero.*."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lmscale.config.section import Section

# The names lmscale.training.optimizers and lmscale.training.schedules register (a test keeps them equal): the
# config names its choices without importing the training code.
OPTIMIZER_NAMES = ("adamw", "adafactor", "lion", "lamb", "sgd", "muon")
SCHEDULE_NAMES = (
    "constant",
    "linear",
    "cosine",
    "cosine_restarts",
    "step",
    "exponential",
    "piecewise",
    "cyclic",
    "wsd",
)


class EarlyStoppingConfig(Section):
    patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without improvement; unset = never."
    )
    min_delta: float = Field(
        0.0, ge=0, description="An evaluation improves only if eval loss drops by more than this."
    )


class TrainConfig(Section):
    max_steps: int | None = Field(
        250,
        ge=1,
        description="Optimizer steps to train for (or set max_tokens or epochs instead, and this null).",
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Train on about this many real tokens (made into steps from the epoch's plan).",
    )
    epochs: float | None = Field(
        None, gt=0, description="Train for this many passes over the data (may be 0.5)."
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the training loss.")
    chunked_loss: bool = Field(
        False,
        description="Next-token loss without whole [tokens, vocab] logits: the output layer fused into the "
        "loss where the family allows, else blockwise with no fp32 copy (long contexts, large vocabularies); "
        "same loss and gradients.",
    )
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    grad_clip: float = Field(
        1.0, ge=0, description="Clip the global gradient norm to this; 0 disables clipping."
    )
    micro_batch_size: int = Field(
        16,
        ge=1,
        description="pad mode: sequences per rank per forward/backward (bucket mode: nominal, for DeepSpeed).",
    )
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="Sequences per optimizer step (micro_batch_size x grad_accum_steps x data-parallel ranks): "
        "sets grad_accum_steps for the ranks a run has (kept across elastic restarts), or checks it if set too.",
    )
    eval_every: int = Field(
        50, ge=1, description="Evaluate held-out loss/perplexity every N steps (and at the end)."
    )
    eval_batches: int = Field(20, ge=1, description="Micro-batches per rank in one evaluation.")
    log_every: int = Field(10, ge=1, description="Write metrics every N steps.")
    max_nonfinite_steps: int = Field(
        10,
        ge=1,
        description="Stop with an error after this many steps in a row skipped for a non-finite loss/gradient.",
    )
    hang_timeout_s: float | None = Field(
        None,
        gt=0,
        description="A rank that completes no step for this long dumps its stacks and exits non-zero; "
        "unset = 50 x the median step time, at least 900 s.",
    )
    profile_steps: tuple[int, int] | None = Field(
        None,
        description="[A, B]: record steps A to B (1-based, inclusive) with the torch profiler, one trace per rank "
        "in <output_dir>/profile/ (open in Perfetto or TensorBoard).",
    )

    @model_validator(mode="after")
    def _check_profile_steps(self) -> TrainConfig:
        if self.profile_steps is None:
            return self
        first, last = self.profile_steps
        if not 1 <= first <= last or (self.max_steps is not None and last > self.max_steps):
            raise ValueError(
                f"train.profile_steps=[{first}, {last}] is not a range of steps [A, B] with 1 <= A <= B <= "
                f"train.max_steps ({self.max_steps}): e.g. train.profile_steps=[5,7] (a few steps after the first)"
            )
        return self

    @model_validator(mode="after")
    def _check_chunked_loss(self) -> TrainConfig:
        if self.chunked_loss and self.label_smoothing:
            raise ValueError(
                f"train.chunked_loss has no label smoothing (train.label_smoothing={self.label_smoothing}): "
                "unset one of them"
            )
        return self

    @model_validator(mode="after")
    def _check_length(self) -> TrainConfig:
        lengths = {"max_steps": self.max_steps, "max_tokens": self.max_tokens, "epochs": self.epochs}
        chosen = [f"train.{key}={value}" for key, value in lengths.items() if value is not None]
        if len(chosen) != 1:
            raise ValueError(
                f"set exactly one of train.max_steps, train.max_tokens, train.epochs (got "
                f"{', '.join(chosen) or 'none'}): e.g. train.max_steps=null train.max_tokens=100000000"
            )
        return self


class OptimConfig(Section):
    name: Literal[OPTIMIZER_NAMES] = Field(
        "adamw",
        description="adamw, adafactor, lion, lamb, sgd (with momentum), or muon (DeepSpeed's Muon for the blocks' "
        "matrices, AdamW for embeddings, the output layer, norms and biases).",
    )
    lr: float = Field(2e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay.")
    no_weight_decay: list[Literal["bias", "norm", "embedding"]] = Field(
        ["bias", "norm", "embedding"], description="Parameter kinds exempt from weight decay."
    )
    layer_lr_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Layer-wise LR decay: each layer below the top gets this times the LR of the one above.",
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="beta1, beta2 of adamw, lion and lamb.")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd: momentum.")
    muon_lr: float = Field(
        0.02, gt=0, description="muon: peak learning rate of the Muon half (optim.lr is the AdamW half's)."
    )
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="muon: momentum of the Muon half.")
    state_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: master weights, gradients and optimizer states in bf16 (DeepSpeed's "
        "bf16_master_weights_and_grads and bf16_optimizer_states; 6 bytes less per parameter); needs precision=bf16 "
        "and zero.stage 1-3.",
    )


class ScheduleConfig(Section):
    name: Literal[SCHEDULE_NAMES] = Field(
        "cosine", description="LR shape after the warm-up (see the LR schedules section)."
    )
    min_lr: float = Field(
        2e-4, ge=0, description="Floor of linear/cosine/exponential/wsd decays and of cyclic's low point."
    )
    min_lr_ratio: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Floor as a fraction of optim.lr (e.g. 0.1); when set it replaces min_lr (fine-tuning LRs).",
    )
    warmup_steps: int = Field(25, ge=0, description="Steps of linear warm-up from 0 to optim.lr.")
    warmup_fraction: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Warm-up as a fraction of the run's steps (e.g. 0.05); when set it replaces warmup_steps.",
    )
    restart_period: int = Field(100, ge=1, description="cosine_restarts: steps of the first cycle.")
    restart_mult: float = Field(
        1.0, ge=1, description="cosine_restarts: each cycle is this many times longer."
    )
    decay_every: int = Field(100, ge=1, description="step: multiply the LR by decay_gamma every N steps.")
    decay_gamma: float = Field(
        0.5, gt=0, le=1, description="step: the factor applied every decay_every steps."
    )
    lr_points: list[tuple[int, float]] = Field(
        [], description="piecewise: [[step, lr], ...] in ascending steps, linear in between."
    )
    cycle_steps: int = Field(
        50, ge=1, description="cyclic: steps from the low LR to the peak (half a cycle)."
    )
    cycle_mode: Literal["triangular", "triangular2"] = Field(
        "triangular", description="cyclic: triangular, or triangular2 (the peak halves every cycle)."
    )
    decay_fraction: float = Field(
        0.2, gt=0, le=1, description="wsd: fraction of the post-warm-up steps spent decaying to min_lr."
    )

    def floor_lr(self, lr: float) -> float:
        """The decays' floor for a peak LR of `lr`: min_lr, or min_lr_ratio x lr when that is set."""
        return self.min_lr if self.min_lr_ratio is None else self.min_lr_ratio * lr

    def warmup_for(self, max_steps: int | None) -> int:
        """Warm-up steps of a run of `max_steps`: warmup_steps, or warmup_fraction of the run when set
        (a fraction needs the step count: 0 until it is known)."""
        if self.warmup_fraction is None:
            return self.warmup_steps
        return int(self.warmup_fraction * max_steps) if max_steps else 0

    def settled(self, lr: float, max_steps: int) -> ScheduleConfig:
        """A copy whose min_lr and warmup_steps are the values this run uses (the fractions applied)."""
        if self.min_lr_ratio is None and self.warmup_fraction is None:
            return self
        return self.model_copy(
            update={"min_lr": self.floor_lr(lr), "warmup_steps": self.warmup_for(max_steps)}
        )

    @model_validator(mode="after")
    def _check_points(self) -> ScheduleConfig:
        if self.name != "piecewise":
            return self
        points = self.lr_points
        if not points:
            raise ValueError("schedule.name=piecewise needs schedule.lr_points: give [[step, lr], ...]")
        steps = [step for step, _ in points]
        if steps != sorted(set(steps)) or any(lr < 0 for _, lr in points):
            raise ValueError(
                f"schedule.lr_points={[list(p) for p in points]}: steps must ascend and LRs be >= 0"
            )
        return self


class CheckpointConfig(Section):
    save_every: int = Field(
        100, ge=1, description="Save a checkpoint every N steps (and at the end, and on a stop signal)."
    )
    keep_last: int = Field(
        2, ge=2, description="Complete checkpoints kept (at least 2, so one survives a crash mid-save)."
    )
    resume: str = Field(
        "auto",
        description="auto: continue from the newest complete checkpoint in output_dir; none; or a checkpoint path.",
    )
    async_save: bool = Field(
        False,
        alias="async",
        description="Copy each checkpoint to host memory and write it in the background while training goes on.",
    )
    mirror: str | None = Field(
        None,
        description="Upload each complete checkpoint to this fsspec URL (s3://bucket/prefix, gs://, az://, file://); a run with none locally resumes from there.",
    )
    mirror_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options of checkpoint.mirror (e.g. {endpoint_url: ...} for an S3-compatible store); credentials come from the environment.",
    )

    @field_validator("mirror")
    @classmethod
    def _check_mirror_url(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError(
                f"checkpoint.mirror={value} is not a URL: write it with its protocol, e.g. s3://bucket/prefix or file:///abs/path"
            )
        return value


class ZeroConfig(Section):
    stage: int = Field(
        0, ge=0, le=3, description="ZeRO stage: 0 off, 1 optimizer states, 2 +gradients, 3 +parameters."
    )
    offload: Literal["none", "cpu"] = Field(
        "none", description="Offload optimizer states (and stage-3 params) to CPU."
    )

    @model_validator(mode="after")
    def _check_offload(self) -> ZeroConfig:
        if self.offload == "cpu" and self.stage < 2:
            raise ValueError(f"zero.offload=cpu needs zero.stage 2 or 3 (got {self.stage}): set zero.stage=2")
        return self
