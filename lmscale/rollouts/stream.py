"""The loop's training batches for GRPO: each generation, this rank's prompts are answered `group_size` times
by the policy, the completions scored, and the rows (prompt + completion, the completion the targets) cut
into the step's micro-batches with their advantages; with `num_iterations` > 1 the same completions serve
that many optimizer steps, scored once by the sampling policy (`old_logps`).

The stream's position is the count of steps served. Prompts and sampling seeds are functions of the
generation's number, so a resumed run regenerates the same completions from the same weights; only a
resume in the middle of a generation's iterations needs the rows themselves (the policy that sampled them
is gone), which each rank saves with the checkpoint (`rank_state_dict`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from datasets import Dataset

from lmscale.config import GrpoConfig
from lmscale.data.batches import Batch, collate, target_count
from lmscale.data.prompts import reward_fields
from lmscale.objectives.dpo import adapters_off
from lmscale.objectives.loss import forward, token_logps
from lmscale.rollouts.generation import Completions, Sampling, sample
from lmscale.rollouts.schedule import rank_prompts, sampling_seed
from lmscale.rollouts.scoring import RewardSet, Scored, advantages_and_figures, score

log = logging.getLogger("lmscale")
ROW_TENSORS = ("input_ids", "attention_mask", "labels", "advantages", "old_logps", "reference_logps")


@dataclass(frozen=True)
class RolloutSettings:
    grpo: GrpoConfig
    seed: int
    grad_accum_steps: int
    data_rank: int
    data_ranks: int
    synced: bool  # ZeRO-3 on several ranks: every rank runs generation's forward passes in step
    log_every: int = 1  # samples.jsonl gets the completions of generations that begin at a log step

    @property
    def prompts_per_rank(self) -> int:
        return self.grpo.prompts_per_step // self.data_ranks

    def sampling(self) -> Sampling:
        g = self.grpo
        return Sampling(g.max_new_tokens, g.temperature, g.top_p, g.top_k)


@dataclass
class Rollout:
    generation: int
    batches: list[Batch]


class Prompts:
    """The prompt records and how the reward functions see them."""

    def __init__(self, records: Dataset, tokenizer: Any) -> None:
        self.records, self.tokenizer = records, tokenizer
        self.fields = reward_fields(records)
        self.conversational = "messages" in records.column_names and "prompt" not in records.column_names

    def __len__(self) -> int:
        return len(self.records)

    def take(self, indices: list[int]) -> tuple[list[list[int]], list[Any], dict[str, list]]:
        """(prompt ids, prompts as the reward functions see them, the records' other fields) of `indices`."""
        chosen = self.records.select(indices)
        shown = chosen["messages"] if self.conversational else chosen["prompt"]
        return chosen["input_ids"], shown, {name: chosen[name] for name in self.fields}

    def as_completions(self, ids: list[list[int]]) -> list[Any]:
        """Completions as the reward functions see them: text, or an assistant message for chat prompts."""
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [[{"role": "assistant", "content": t}] for t in texts] if self.conversational else texts


def repeat(values: list, times: int) -> list:
    return [v for v in values for _ in range(times)]


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `local`, in rank order (each rank holds as many)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts)


class RolloutStream:
    """This rank's GRPO micro-batches, step after step, resumable at any step."""

    def __init__(
        self,
        engine: Any,
        prompts: Prompts,
        settings: RolloutSettings,
        rewards: RewardSet,
        end_ids: set[int],
        samples_path: Path | None = None,
        reference: Any = None,
    ) -> None:
        """`reference`: a frozen engine of the starting model for the KL term (beta > 0); None scores the
        reference with the policy's LoRA adapters off."""
        self.engine, self.prompts, self.settings, self.rewards = engine, prompts, settings, rewards
        self.reference = reference
        self.end_ids, self.samples_path = end_ids, samples_path
        self.pad_id = prompts.tokenizer.pad_token_id
        self.served = 0  # micro-batches handed to the loop
        self.rollout: Rollout | None = None
        self.pending: list[dict[str, float]] = []  # figures of the generations since the last log step
        self.last_start: float | None = None  # when the previous generation began, and its sampling time
        self.last_generation_s = 0.0

    # -- the loop's side --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        accum, iterations = self.settings.grad_accum_steps, self.settings.grpo.num_iterations
        while True:
            step = self.served // accum
            generation = step // iterations
            if self.rollout is None or self.rollout.generation != generation:
                self.rollout = self.roll(generation, first_step=step + 1)
            batch = self.rollout.batches[self.served % accum]
            self.served += 1
            yield batch

    def drain_figures(self) -> dict[str, float]:
        """The mean of each generation figure since the last call (the loop logs them with its window)."""
        pending, self.pending = self.pending, []
        names = dict.fromkeys(name for figures in pending for name in figures)
        return {
            name: sum(f[name] for f in pending if name in f) / sum(1 for f in pending if name in f)
            for name in names
        }

    # -- one generation ---------------------------------------------------------------------------------
    def roll(self, generation: int, first_step: int) -> Rollout:
        settings, grpo = self.settings, self.settings.grpo
        started = time.perf_counter()
        indices = rank_prompts(
            len(self.prompts), grpo.prompts_per_step, settings.seed, generation,
            settings.data_rank, settings.data_ranks,
        ).tolist()  # fmt: skip
        prompt_ids, shown, fields = self.prompts.take(indices)
        rows = repeat(prompt_ids, grpo.group_size)
        seed = sampling_seed(settings.seed, generation, settings.data_rank)
        completions = sample(
            self.engine.module,
            self.engine.device,
            rows,
            settings.sampling(),
            seed,
            self.pad_id,
            self.end_ids,
            settings.synced,
        )
        shown_rows = repeat(shown, grpo.group_size)
        completion_values = self.prompts.as_completions(completions.ids)
        per_function = score(
            self.rewards,
            shown_rows,
            completion_values,
            {name: repeat(values, grpo.group_size) for name, values in fields.items()},
            completions.ids,
        )
        scored, lengths = self.advantages(per_function, completions)
        batches = self.micro_batches(rows, completions, scored.advantages)
        figures = scored.figures | completion_figures(lengths)
        self.add_timing(figures, started, completions)
        self.pending.append(figures)
        self.write_samples(first_step, shown, completion_values, per_function)
        return Rollout(generation, batches)

    def advantages(self, per_function: torch.Tensor, completions: Completions) -> tuple[Scored, torch.Tensor]:
        """Advantages of this rank's completions, normalised with every rank's (a `batch` scale needs them
        all; the figures are the whole generation's), and every rank's [completions, (length, truncated)]."""
        settings = self.settings
        shape = torch.tensor(
            [[len(c), t] for c, t in zip(completions.ids, completions.truncated, strict=True)],
            dtype=torch.float64,
        )
        everyone = gather_rows(torch.cat([per_function, shape], dim=1).to(self.engine.device)).cpu()
        scored = advantages_and_figures(
            everyone[:, :-2], self.rewards.weights, self.rewards.names(), settings.grpo.group_size,
            settings.grpo.scale_rewards,
        )  # fmt: skip
        rows = per_function.size(0)
        own = slice(settings.data_rank * rows, (settings.data_rank + 1) * rows)
        return Scored(scored.advantages[own].float(), scored.figures), everyone[:, -2:]

    def add_timing(self, figures: dict[str, float], started: float, completions: Completions) -> None:
        """Generation tokens/s over all ranks, and the share of the previous generation's steps (from its start
        to this one's) spent sampling: known only now, so it is logged one generation late."""
        totals = torch.tensor([completions.tokens, completions.seconds], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            totals = totals.to(self.engine.device)
            dist.all_reduce(totals)
            totals = totals.cpu()
        ranks = dist.get_world_size() if dist.is_initialized() else 1
        figures["generation_tokens_per_s"] = float(totals[0] / max(totals[1] / ranks, 1e-9))
        figures["generation_s"] = float(totals[1] / ranks)
        if self.last_start is not None:
            figures["generation_share"] = self.last_generation_s / max(started - self.last_start, 1e-9)
        self.last_start, self.last_generation_s = started, figures["generation_s"]

    def micro_batches(
        self, prompts: list[list[int]], completions: Completions, advantages: torch.Tensor
    ) -> list[Batch]:
        """The rows cut into the step's micro-batches, shortest rows together (less padding)."""
        grpo, accum = self.settings.grpo, self.settings.grad_accum_steps
        sequences = [[*p, *c] for p, c in zip(prompts, completions.ids, strict=True)]
        # A truncated completion masked out keeps its row (every rank runs the same passes) but no targets.
        masked = [grpo.mask_truncated_completions and t for t in completions.truncated]
        prompt_lens = [len(s) if m else len(p) for s, p, m in zip(sequences, prompts, masked, strict=True)]
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        size = len(order) // accum
        batches = []
        for part in range(accum):
            chosen = order[part * size : (part + 1) * size]
            tensors = collate(
                [sequences[i] for i in chosen], self.pad_id, prompt_lens=[prompt_lens[i] for i in chosen]
            )
            tensors["advantages"] = advantages[chosen]
            batches.append(self.batch(tensors, [len(sequences[i]) for i in chosen]))
        self.score_with_models(batches)
        return batches

    def batch(self, tensors: dict[str, torch.Tensor], lengths: list[int]) -> Batch:
        labels = tensors["labels"]
        targets = target_count(labels) if self.settings.grpo.loss_type == "dapo" else labels.size(0)
        return Batch(
            tensors=tensors,
            real_tokens=sum(lengths),
            padded_tokens=labels.numel(),
            sequences=len(lengths),
            sum_sq_len=sum(n * n for n in lengths),
            local_targets=targets,
        )

    @torch.no_grad()
    def score_with_models(self, batches: list[Batch]) -> None:
        """Per-token log-probabilities each micro-batch needs beside the live policy's: the sampling policy's
        (num_iterations > 1: it will have moved by the later iterations) and the reference's (beta > 0)."""
        grpo, engine = self.settings.grpo, self.engine
        if grpo.num_iterations == 1 and not grpo.beta:
            return
        engine.eval()
        for batch in batches:
            if grpo.num_iterations > 1:
                logits, labels = forward(engine, batch)
                batch.tensors["old_logps"] = token_logps(logits, labels)[0].cpu()
            if grpo.beta:  # the frozen copy, or the policy with its LoRA adapters off
                scorer = self.reference if self.reference is not None else engine
                with adapters_off(scorer.module):
                    logits, labels = forward(scorer, batch)
                batch.tensors["reference_logps"] = token_logps(logits, labels)[0].cpu()
        engine.train()

    def write_samples(
        self, first_step: int, shown: list[Any], completions: list[Any], per_function: torch.Tensor
    ) -> None:
        """The first prompts' completions and rewards, at log steps, for a person to read (samples.jsonl)."""
        grpo = self.settings.grpo
        due = first_step == 1 or first_step % self.settings.log_every == 0
        if self.samples_path is None or not grpo.samples or not due:
            return
        names, group = self.rewards.names(), grpo.group_size
        with self.samples_path.open("a", encoding="utf-8") as handle:
            for p, prompt in enumerate(shown[: grpo.samples]):
                rows = range(p * group, (p + 1) * group)
                answers = [
                    {
                        "completion": completions[r],
                        "rewards": {
                            n: None if math.isnan(v) else v
                            for n, v in zip(names, per_function[r].tolist(), strict=True)
                        },
                    }
                    for r in rows
                ]
                handle.write(json.dumps({"step": first_step, "prompt": prompt, "answers": answers}) + "\n")

    # -- resuming ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"rollouts": True, "steps": self.served // self.settings.grad_accum_steps}

    def rank_state_dict(self) -> dict | None:
        """This rank's rows, when the next step still uses them (mid-way through a generation's iterations)."""
        steps, iterations = self.served // self.settings.grad_accum_steps, self.settings.grpo.num_iterations
        if self.rollout is None or steps % iterations == 0:
            return None
        saved = [
            {name: batch[name].tolist() for name in ROW_TENSORS if name in batch}
            | {
                "counts": [
                    batch.real_tokens,
                    batch.padded_tokens,
                    batch.sequences,
                    batch.sum_sq_len,
                    batch.local_targets,
                ]
            }
            for batch in self.rollout.batches
        ]
        return {"generation": self.rollout.generation, "batches": saved}

    def load_state_dict(self, state: dict) -> bool:
        """Continue after `state`'s step (with this rank's saved rows under "rank" when the step continues a
        generation); False when it is not a rollout position."""
        if not state.get("rollouts"):
            return False
        self.served = int(state["steps"]) * self.settings.grad_accum_steps
        rank_state = state.get("rank")
        if not rank_state and int(state["steps"]) % self.settings.grpo.num_iterations:
            log.warning(
                "resume: this rank's completions for the steps left of generation %d were not saved (another "
                "rank count?): they are sampled again by the current policy",
                int(state["steps"]) // self.settings.grpo.num_iterations,
            )
        if rank_state:
            self.rollout = Rollout(
                int(rank_state["generation"]), [saved_batch(b) for b in rank_state["batches"]]
            )
        return True


def saved_batch(saved: dict) -> Batch:
    """A micro-batch as `rank_state_dict` saved it (floats round-trip JSON exactly)."""
    tensors = {}
    for name in ROW_TENSORS:
        if name in saved:
            dtype = torch.long if name in ("input_ids", "attention_mask", "labels") else torch.float32
            tensors[name] = torch.tensor(saved[name], dtype=dtype)
    real, padded, sequences, sum_sq, targets = saved["counts"]
    return Batch(tensors, real, padded, sequences, sum_sq, local_targets=targets)


def completion_figures(shape: torch.Tensor) -> dict[str, float]:
    """Completion lengths and the share cut at max_new_tokens, from every rank's [completions, (length,
    truncated)]."""
    return {
        "completion_length": float(shape[:, 0].mean()),
        "completion_length_max": float(shape[:, 0].max()),
        "truncated_frac": float(shape[:, 1].mean()),
    }
