"""The training loop: it receives a ready engine, data and a metrics sink, and only orchestrates."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from lmscale.config import TrainConfig
from lmscale.data.batches import IGNORE_INDEX
from lmscale.logging import MetricsSink


@dataclass
class TrainResult:
    steps: int
    tokens: int
    wall_time_s: float
    initial_eval_loss: float
    final_eval_loss: float


def batches_forever(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Epoch after epoch, each shuffled differently (the sampler's seed + epoch)."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def all_ranks_sum(values: list[float | torch.Tensor], device: torch.device) -> list[float]:
    """Sum scalars over all ranks in one collective."""
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return stacked.tolist()


@torch.no_grad()
def evaluate(engine: Any, loader: DataLoader, max_batches: int) -> float:
    """Mean held-out loss per target token over all ranks (every rank runs the same number of batches)."""
    engine.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    targets = 0
    for index, batch in enumerate(loader):
        if index >= max_batches:
            break
        batch_targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
        loss_sum += loss.double() * batch_targets
        targets += batch_targets
    engine.train()
    total_loss, total_targets = all_ranks_sum([loss_sum, targets], engine.device)
    return total_loss / max(total_targets, 1)


def gradient_norm(engine: Any) -> float | None:
    """Global gradient norm before clipping, for engines that do not report one (ZeRO-0 in fp32).

    Called just before the optimizer step on logging steps only, while `param.grad` is still whole.
    """
    if engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: an untrained model's exp(loss) can overflow


def train(
    engine: Any, train_loader: DataLoader, eval_loader: DataLoader, config: TrainConfig, sink: MetricsSink
) -> TrainResult:
    """Run `config.max_steps` optimizer steps, logging every `log_every` and evaluating every `eval_every`."""
    batches = batches_forever(train_loader)
    initial_eval = evaluate(engine, eval_loader, config.eval_batches)
    sink.log(0, {"eval_loss": initial_eval, "eval_ppl": perplexity(initial_eval)})
    sink.message(f"untrained held-out loss {initial_eval:.4f}, perplexity {perplexity(initial_eval):.1f}")
    # Losses stay on the device between log steps: reading them every step would force a sync.
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    micro_steps, window_tokens, total_tokens = 0, 0, 0
    window_start = start = time.perf_counter()
    final_eval = initial_eval
    for step in range(1, config.max_steps + 1):
        is_last = step == config.max_steps
        is_log_step = step % config.log_every == 0 or is_last
        own_grad_norm = None
        for micro in range(config.grad_accum_steps):
            batch = next(batches)
            window_tokens += int(batch["attention_mask"].sum())  # counted on the host copy: no device sync
            loss = engine(**{k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}).loss
            engine.backward(loss)
            if is_log_step and micro == config.grad_accum_steps - 1:
                own_grad_norm = gradient_norm(engine)
            engine.step()
            loss_sum += loss.detach().double()
            micro_steps += 1
        sink.advance()
        if is_log_step:
            loss_total, micro_total, tokens = all_ranks_sum(
                [loss_sum, micro_steps, window_tokens], engine.device
            )
            elapsed = time.perf_counter() - window_start
            total_tokens += int(tokens)
            sink.log(
                step,
                {
                    "loss": loss_total / micro_total,
                    "lr": engine.get_lr()[0],
                    "grad_norm": float(
                        own_grad_norm if own_grad_norm is not None else engine.get_global_grad_norm()
                    ),
                    "tokens_per_s": tokens / elapsed,
                    "tokens_seen": total_tokens,
                },
            )
            loss_sum.zero_()
            micro_steps, window_tokens = 0, 0
            window_start = time.perf_counter()
        if step % config.eval_every == 0 or is_last:
            final_eval = evaluate(engine, eval_loader, config.eval_batches)
            sink.log(step, {"eval_loss": final_eval, "eval_ppl": perplexity(final_eval)})
            sink.message(
                f"step {step}: held-out loss {final_eval:.4f}, perplexity {perplexity(final_eval):.2f}"
            )
            window_start = time.perf_counter()  # evaluation time is not training throughput
    return TrainResult(
        steps=config.max_steps,
        tokens=total_tokens,
        wall_time_s=time.perf_counter() - start,
        initial_eval_loss=initial_eval,
        final_eval_loss=final_eval,
    )
