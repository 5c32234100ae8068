"""The whole run's config: every section, and the rules that span sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmscale.config.data import DataConfig, whole_record_problems
from lmscale.config.finetune import FinetuneConfig
from lmscale.config.model import ModelConfig
from lmscale.config.parallel import ParallelConfig
from lmscale.config.reporting import EvalConfig, LoggingConfig, MetricsConfig, WandbConfig
from lmscale.config.section import Section
from lmscale.config.training import CheckpointConfig, OptimConfig, ScheduleConfig, TrainConfig, ZeroConfig
from lmscale.methods import method_for, method_problems


class Config(Section):
    output_dir: str = Field(
        "runs/tiny-cpu", description="Run directory: config.yaml, metrics.jsonl, checkpoints/."
    )
    seed: int = Field(1234, description="Seed for model init, data order and dropout.")
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="bf16, fp16 (GPU only) or fp32.")
    deepspeed_config: str | None = Field(
        None,
        description="DeepSpeed JSON to start from (e.g. ds_configs/zero2_bf16.json); lmscale keys fill its 'auto's.",
    )
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    zero: ZeroConfig = ZeroConfig()
    parallel: ParallelConfig = ParallelConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    wandb: WandbConfig = WandbConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check_across_sections(self) -> Config:
        """Every rule that spans sections, all reported at once (one fix per run, not one per try)."""
        problems = lr_plan_problems(self)
        problems += tensor_parallel_problems(self) + sequence_parallel_problems(self)
        problems += expert_parallel_problems(self) + router_bias_problems(self)
        problems += optimizer_problems(self)
        problems += task_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def lr_plan_problems(config: Config) -> list[str]:
    problems = []
    schedule, lr, steps = config.schedule, config.optim.lr, config.train.max_steps
    if schedule.floor_lr(lr) > lr:
        problems.append(
            f"schedule.min_lr={schedule.min_lr} exceeds optim.lr={lr}: set min_lr <= lr, "
            "or schedule.min_lr_ratio (e.g. 0.1) for a floor that follows the LR"
        )
    warmup = schedule.warmup_for(steps)
    if steps is not None and warmup >= steps:
        problems.append(
            f"schedule.warmup_steps={warmup} is not below train.max_steps={steps}: shorten the warm-up, "
            "or set schedule.warmup_fraction (e.g. 0.05) for one that scales with the run"
        )
    return problems


def task_problems(config: Config) -> list[str]:
    problems = method_problems(config)
    method = method_for(config.finetune)
    if method.whole_records and config.data.format == "text":  # record formats are checked by DataConfig
        problems += whole_record_problems(config.data, method.key)
    return problems


def optimizer_problems(config: Config) -> list[str]:
    """What an optimizer, or its states' precision, does not combine with."""
    problems = state_dtype_problems(config)
    if config.optim.name != "muon":
        return problems
    if config.zero.offload != "none":
        problems.append(
            "optim.name=muon does not go with zero.offload=cpu (DeepSpeed steps offloaded states with its CPU "
            "Adam only): set zero.offload=none, or use optim.name=adamw"
        )
    if config.parallel.tensor > 1:
        problems.append(
            f"optim.name=muon orthogonalizes whole matrices, which parallel.tensor={config.parallel.tensor} "
            "splits across ranks: use parallel.tensor=1"
        )
    return problems


def state_dtype_problems(config: Config) -> list[str]:
    if config.optim.state_dtype != "bf16":
        return []
    problems = []
    if config.precision != "bf16":
        problems.append(
            f"optim.state_dtype=bf16 needs precision=bf16 (got {config.precision}): set precision=bf16"
        )
    if config.zero.stage == 0:
        problems.append(
            "optim.state_dtype=bf16 is DeepSpeed's ZeRO optimizer's (bf16_master_weights_and_grads): set "
            "zero.stage=1, 2 or 3"
        )
    if config.optim.name not in ("adamw", "muon"):
        problems.append(
            f"optim.state_dtype=bf16 is tested with adamw and muon, not {config.optim.name}: set optim.name=adamw, "
            "or optim.state_dtype=fp32"
        )
    return problems


def tensor_parallel_problems(config: Config) -> list[str]:
    """What AutoTP training does not combine with, as lmscale runs it (the layout itself is checked
    against the rank count in lmscale.parallel.ds_config, and against the model's shape in the worker)."""
    tensor = config.parallel.tensor
    if tensor == 1:
        return []
    problems = []
    if config.zero.stage == 3:
        problems.append(
            f"parallel.tensor={tensor} does not combine with zero.stage=3 (AutoTP training shards weights "
            "itself): use zero.stage=1 or 2"
        )
    if config.zero.stage == 0:
        problems.append(
            f"parallel.tensor={tensor} needs zero.stage 1 or 2, whose fp32 master weights are what a "
            "tensor-parallel checkpoint is consolidated (exported, resumed on another layout) from: set zero.stage=1"
        )
    if config.zero.offload != "none":
        problems.append(f"parallel.tensor={tensor} is not tested with zero.offload: set zero.offload=none")
    if config.finetune.lora is not None:
        problems.append(
            f"parallel.tensor={tensor} does not split LoRA adapters: train LoRA with parallel.tensor=1"
        )
    method = method_for(config.finetune)
    if not method.tensor_parallel:
        problems.append(
            f"parallel.tensor={tensor} splits a language model's output layer, not what {method.key} trains: "
            "use parallel.tensor=1"
        )
    return problems


def expert_parallel_problems(config: Config) -> list[str]:
    """What lmscale's AutoEP expert parallelism is not tested with (the rank count and the model's experts
    are checked later, in lmscale.parallel.ds_config and against the model's config)."""
    expert = config.parallel.expert
    if expert == 1:
        return []
    key = f"parallel.expert={expert}"
    problems = []
    if config.zero.offload != "none":
        problems.append(f"{key} is not tested with zero.offload: set zero.offload=none")
    if config.finetune.lora is not None:
        problems.append(
            f"{key} does not put LoRA adapters on AutoEP's grouped experts: train LoRA with parallel.expert=1"
        )
    if config.optim.name == "muon":
        problems.append(
            f"{key}: Muon orthogonalizes 2-D matrices and AutoEP stores each layer's experts as one 3-D tensor: "
            "use optim.name=adamw, or parallel.expert=1"
        )
    if config.model.compile:
        problems.append(f"{key} is not tested with model.compile: unset model.compile")
    method = method_for(config.finetune)
    if not method.expert_parallel:
        problems.append(
            f"{key} is tested with language-model training (pre-training and SFT), not with {method.key}: "
            "use parallel.expert=1"
        )
    return problems


def router_bias_problems(config: Config) -> list[str]:
    """The routing bias moves by the tokens each training step sent to each expert, which the cross-entropy
    objective counts (whether the model's routers have a bias is checked when it is built)."""
    speed = config.model.router_bias_update
    method = method_for(config.finetune)
    if speed == 0 or method.objective is None:
        return []
    return [
        f"model.router_bias_update={speed} balances experts by the tokens of cross-entropy training steps "
        f"(pre-training, SFT, classification), not of {method.key}: unset model.router_bias_update"
    ]


def sequence_parallel_problems(config: Config) -> list[str]:
    """What lmscale's Ulysses sequence parallelism does not combine with (the rank count and the model's
    heads are checked later, in lmscale.parallel.ds_config and the worker)."""
    sequence = config.parallel.sequence
    if sequence == 1:
        return []
    key = f"parallel.sequence={sequence}"
    problems = []
    if config.model.attn_implementation == "eager":
        problems.append(
            f"{key} needs model.attn_implementation sdpa or flash_attention_2 (Ulysses drops the attention mask, "
            "which eager attention needs): set model.attn_implementation=sdpa"
        )
    if config.data.batching == "pack":
        problems.append(
            f"{key} attends causally over whole rows, across packed documents: use data.batching=bucket"
        )
    if config.data.streaming:
        problems.append(f"{key} slices planned batches: unset data.streaming")
    if config.data.seq_len_warmup_steps:
        problems.append(
            f"{key} slices rows before the length warm-up could cut them: set data.seq_len_warmup_steps=0"
        )
    if not method_for(config.finetune).sequence_parallel:
        problems.append(f"{key} trains language models with cross-entropy: use it with finetune.method=sft")
    if config.finetune.lora is not None:
        problems.append(f"{key} is not tested with LoRA: unset finetune.lora")
    if config.zero.offload != "none":
        problems.append(f"{key} is not tested with zero.offload: set zero.offload=none")
    return problems
