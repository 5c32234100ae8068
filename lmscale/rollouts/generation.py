"""Sampling completions with the model inside the DeepSpeed engine, through transformers' `generate` with its
KV cache.

Under ZeRO-3 the engine's hooks gather each block's parameters as the forward pass reaches it and free them
after, so the whole model is never gathered at once (TRL gathers it whole for generation, the memory peak
its users meet); `synced_gpus` keeps every rank stepping until all ranks' completions are done, as those
gathers need. Sampling is seeded per (generation, rank) in a forked RNG: a resumed run samples the same
completions, and training's own random state is untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    greedy: bool = False  # the most likely token each time (held-out evaluation)


@dataclass
class Completions:
    ids: list[list[int]]  # each completion's tokens, up to and including its end token
    truncated: list[bool]  # it reached max_new_tokens without an end token
    seconds: float  # time spent generating

    @property
    def tokens(self) -> int:
        return sum(len(c) for c in self.ids)


def left_padded(prompts: list[list[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of prompts padded on the left, so every completion starts at one column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def cut_at_end(row: list[int], end_ids: set[int]) -> tuple[list[int], bool]:
    """(the completion up to and including its first end token, whether it had none)."""
    for index, token in enumerate(row):
        if token in end_ids:
            return row[: index + 1], False
    return row, True


def end_token_ids(tokenizer: Any, model: Any) -> set[int]:
    """Where a completion ends: the tokenizer's end token and any the model's generation config names."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, list):
        ids |= set(configured)
    elif configured is not None:
        ids.add(configured)
    return ids


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    device: torch.device,
    prompts: list[list[int]],
    sampling: Sampling,
    seed: int,
    pad_id: int,
    end_ids: set[int],
    synced: bool,
) -> Completions:
    """One completion per prompt (repeat a prompt for a group), sampled by `model` (the engine's module, or a
    loaded model) in eval mode."""
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    input_ids, attention_mask = left_padded(prompts, pad_id, device)
    devices = [torch.cuda.current_device()] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not sampling.greedy,
            temperature=sampling.temperature if not sampling.greedy else None,
            top_p=sampling.top_p if not sampling.greedy else None,
            top_k=sampling.top_k if not sampling.greedy else None,
            pad_token_id=pad_id,
            eos_token_id=sorted(end_ids),
            use_cache=True,
            synced_gpus=synced,
        )
    model.train(was_training)
    rows = output[:, input_ids.size(1) :].tolist()
    cut = [cut_at_end(row, end_ids) for row in rows]
    return Completions([c for c, _ in cut], [t for _, t in cut], time.perf_counter() - started)
