"""DeepSeek-V3's auxiliary-loss-free load balancing (`model.router_bias_update`).

A DeepSeek-V3 router adds a per-expert bias (`e_score_correction_bias`) to its scores when it chooses experts,
not to the weights it gives them. DeepSeek trains that bias apart from the gradients: after each step, each
layer's bias moves by gamma up for every expert that got fewer tokens than the layer's mean over the whole
batch, and down for every expert that got more (DeepSeek-V3 technical report, section 2.1.2; gamma = 0.001
for most of its pre-training). The model has no auxiliary balancing loss, so without this update nothing
balances its experts. Neither transformers nor DeepSpeed does it: HF keeps the bias as loaded, and DeepSpeed
0.19.8's AutoEP refuses `load_balance_coeff` for its DeepSeek presets (and never updates its own
`expert_bias`). Written here: the update is a few lines over the counts lmscale.model.expert_routing takes.

The counts are all ranks' (one all-reduce of [layers, experts] per step), so every rank moves its copy of the
bias alike: a buffer, whole on every rank under any ZeRO stage and expert split. Being a buffer, it is saved in
checkpoints and exports with the model. It is kept in float32, as HF declares it
(`_keep_in_fp32_modules_strict`): in bf16 a step of 0.001 is lost next to a bias of 0.25.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lmscale.errors import ConfigError
from lmscale.model.expert_routing import routers

BIAS = "e_score_correction_bias"


def routing_biases(model: torch.nn.Module) -> list[torch.Tensor]:
    """Each MoE router's routing bias, in forward order; empty unless every router has one."""
    found = [getattr(router, BIAS, None) for router in routers(model)]
    return found if found and all(isinstance(bias, torch.Tensor) for bias in found) else []


def check_routing_bias(model: torch.nn.Module, speed: float) -> None:
    """model.router_bias_update needs routers that choose with a bias (DeepSeek-V3's kind)."""
    if speed > 0 and not routing_biases(model):
        raise ConfigError(
            f"model.router_bias_update={speed} moves the routers' routing bias (DeepSeek-V3's "
            f"{BIAS}), and this model's routers have none: unset model.router_bias_update"
        )


def keep_routing_bias_in_fp32(model: torch.nn.Module) -> None:
    """Each router's bias back in float32 where the engine cast it (DeepSpeed before 0.19 cast every buffer to
    the training precision; 0.19 keeps them). Before a checkpoint is loaded into it, so a resume is exact."""
    for router in routers(model):
        bias = getattr(router, BIAS)
        if bias.dtype != torch.float32:
            setattr(router, BIAS, bias.float())  # a registered buffer stays registered


class RouterBiasBalancer:
    """After each optimizer step: every router's bias moves by `speed` toward its layer's mean load."""

    def __init__(self, model: torch.nn.Module, speed: float) -> None:
        self.routers = routers(model)
        self.speed = speed

    def after_step(self, counts: torch.Tensor | None) -> None:
        """`counts`: this rank's tokens per [layer, expert] over the step's micro-batches. Every rank calls
        this after every optimizer step (it joins a collective)."""
        if counts is None:  # no router ran (no training batch reached the experts): nothing to move by
            return
        total = counts.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        for router, load in zip(self.routers, total, strict=True):
            bias = getattr(router, BIAS)
            bias.add_(torch.sign(load.mean() - load).to(bias.dtype), alpha=self.speed)

    def figures(self) -> dict[str, float]:
        """The largest routing bias of any layer and expert, in either direction (logged each log step)."""
        return {"router_bias_absmax": max(float(getattr(r, BIAS).abs().max()) for r in self.routers)}
