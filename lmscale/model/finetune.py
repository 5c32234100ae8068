"""Fine-tuning choices applied to a built model: LoRA adapters (peft) and gradual unfreezing.

Gradual unfreezing works by *depth* (0 = embeddings, i + 1 = block i, L + 1 = final norm and head;
see `lmscale.training.optim.layer_depth`). A layer not yet joined is frozen two ways at once:
- its parameter group's LR factor is 0, so no optimizer (including ZeRO's flat fp32 partitions, which
  step every element of a group, and decoupled weight decay, which scales with the LR) moves it;
- its parameters have `requires_grad=False`, so backward computes no weight gradients for it and,
  with the top layers first, stops below the lowest trained layer (most of the saving).
Every parameter still enters `deepspeed.initialize` trainable, so ZeRO partitions the same groups
whatever the step; only the two switches above change during the run. Both are pure functions of
the step, so a resumed run sets them exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lmscale.config import LoraConfig, UnfreezeConfig
from lmscale.errors import ConfigError

log = logging.getLogger(__name__)


def apply_lora(model: torch.nn.Module, lora: LoraConfig, class_head: bool = False) -> torch.nn.Module:
    """Wrap the model in peft LoRA adapters: only the adapters (and a classification head) train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    task_type = TaskType.SEQ_CLS if class_head else TaskType.CAUSAL_LM
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
        # GPT-2's projections are Conv1D, whose weights are stored transposed
        fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2",
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:  # unknown family without defaults, or names not in the model
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_projection(m)})
        raise ConfigError(
            f"finetune.lora.target_modules={lora.target_modules}: {str(exc).splitlines()[0]} Set it to some "
            f"of this model's projections: {', '.join(linear[:8])}"
        ) from None


def _is_projection(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's linear layers


def is_joined(depth: int, step: int, num_layers: int, unfreeze: UnfreezeConfig | None) -> bool:
    """Whether the layer at `depth` trains at optimizer step `step` (0-based).

    Step 0 trains two units (top: head and top block; bottom: embeddings and block 0); one more joins
    every `every_steps` steps, so all L + 2 units train from step L x every_steps on.
    """
    if unfreeze is None:
        return True
    units_open = 2 + step // unfreeze.every_steps
    if unfreeze.start_from == "top":
        return depth > num_layers + 1 - units_open
    return depth < units_open


def all_joined_step(num_layers: int, unfreeze: UnfreezeConfig) -> int:
    """The first 0-based step at which every layer trains."""
    return num_layers * unfreeze.every_steps


@dataclass
class Unfreezing:
    """Switches `requires_grad` of the trainable parameters by depth as the schedule opens layers."""

    params_by_depth: dict[int, list[torch.nn.Parameter]]
    num_layers: int
    unfreeze: UnfreezeConfig | None

    def apply(self, step: int) -> None:
        """Set which layers train for optimizer step `step`; logs when a layer joins."""
        if self.unfreeze is None:
            return
        for depth, params in self.params_by_depth.items():
            joined = is_joined(depth, step, self.num_layers, self.unfreeze)
            if params and params[0].requires_grad != joined:
                for param in params:
                    param.requires_grad_(joined)
                if joined and step > 0:
                    log.info("unfreeze: step %d: layer depth %d joins training", step + 1, depth)

    @contextlib.contextmanager
    def everything_trainable(self) -> Iterator[None]:
        """All scheduled parameters trainable for the duration (a checkpoint must hold every one)."""
        states = {id(p): p.requires_grad for params in self.params_by_depth.values() for p in params}
        for params in self.params_by_depth.values():
            for param in params:
                param.requires_grad_(True)
        try:
            yield
        finally:
            for params in self.params_by_depth.values():
                for param in params:
                    param.requires_grad_(states[id(param)])
