"""The batches fed to the model: collation of planned groups, and the resumable stream of them."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.utils.data import DataLoader

from lmscale.data.bucketing import FILLER, EpochPlan, plan_resumed_epoch
from lmscale.data.epoch import EpochFigures, epoch_figures

log = logging.getLogger(__name__)

# Signals by which a rank is asked to stop at a step boundary (lmscale.training.signals): they may reach a whole
# process group or tree (Ctrl-C at a terminal, DeepSpeed's launcher terminating the ranks' trees, SLURM).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore stop signals: the rank they serve decides when to stop (and closes them);
    a worker killed by one would break that rank's last step before its checkpoint."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


IGNORE_INDEX = -100  # label value the HF loss skips: padding is never a target
# The second sequence of a record planned as two rows: a preference pair's rejected reply
# (lmscale.data.preferences), an unpaired record's mismatched KL sequence (lmscale.data.unpaired).
SECOND_ROWS = ("rejected_ids", "kl_ids")
# The columns that hold the reference model's log-probabilities of both rows of a record (computed before
# training: lmscale.objectives.dpo), by the record's second-row column.
REFERENCE_COLUMNS = {
    "rejected_ids": ("ref_chosen_logp", "ref_rejected_logp"),
    "kl_ids": ("ref_logp", "ref_kl_logp"),
}
# Per-record numbers a two-row batch carries beside its rows: the reference log-probabilities, a pair's
# margin, an unpaired record's label.
RECORD_VALUES = (*(c for pair in REFERENCE_COLUMNS.values() for c in pair), "margin", "desirable")
# per-sequence columns of fine-tuning data (lmscale.data.tasks, lmscale.data.preferences, lmscale.objectives.dpo)
TASK_COLUMNS = ("prompt_len", "target_spans", "label", *SECOND_ROWS, *RECORD_VALUES)


@dataclass(frozen=True)
class StreamPosition:
    """Where a streamed batch came from, so that a resume continues right after it: one DataLoader worker's
    place in its shard."""

    worker: int
    epoch: int
    buffer: int  # the shuffle buffer's index within the epoch
    documents: int  # the shard's documents read before that buffer
    batches: int  # batches emitted from that buffer, this one included

    def saved(self) -> list[int]:
        """The checkpoint's form (JSON, keyed by worker)."""
        return [self.epoch, self.buffer, self.documents, self.batches]

    @classmethod
    def from_saved(cls, worker: int, saved: list[int]) -> StreamPosition:
        return cls(worker, *(int(v) for v in saved))


@dataclass
class Batch:
    """One rank's micro-batch: the tensors the model and the loss read, and the counts the loop measures.

    `batch[name]` is a tensor (input_ids, labels, attention_mask or position_ids, and for preference
    pairs ref_chosen_logp / ref_rejected_logp); the counts are attributes.
    """

    tensors: dict[str, torch.Tensor]
    real_tokens: int  # tokens of real sequences (no padding)
    padded_tokens: int  # tokens the model computes on (rows x width)
    sequences: int
    sum_sq_len: int  # sum of squared sequence lengths: attention FLOPs follow each sequence's own length
    local_targets: int  # this rank's loss targets
    # Loss targets of this micro-batch's whole group on all ranks, known from the epoch plan; None when
    # streamed (each rank then knows only its own, and the loop adds them up).
    group_targets: int | None = None
    group_lengths: torch.Tensor | None = None  # every rank's sequence lengths in the group (length warm-up)
    # Two-row records (preference pairs, unpaired records): rows [0, pairs) are the first sequences (the chosen
    # reply, the completion), [pairs, 2 pairs) the second (the rejected reply, the KL sequence).
    pairs: int = 0
    stream_position: StreamPosition | None = None  # streamed: where the batch came from
    # The labels are each position's own next-token target already (a sequence-parallel slice, whose last
    # token is predicted from the next slice), not the inputs to shift by one.
    labels_aligned: bool = False

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def pin_memory(self) -> Batch:
        """Called by the DataLoader (pin_memory=True): page-locked tensors copy to the GPU asynchronously."""
        return replace(self, tensors={k: v.pin_memory() for k, v in self.tensors.items()})


def step_targets(micro_batches: list[Batch]) -> int | None:
    """Loss targets of a whole optimizer step on all ranks, when the plan knows them (None: streamed)."""
    if any(b.group_targets is None for b in micro_batches):
        return None
    return sum(b.group_targets for b in micro_batches)


def collate(
    rows: list[list[int]],
    pad_id: int,
    pad_to: int | None = None,
    prompt_lens: list[int] | None = None,
    classes: list[int] | None = None,
    target_spans: list[list[list[int]]] | None = None,
) -> dict[str, torch.Tensor]:
    """Pad sequences to the longest (or to `pad_to`); labels are the inputs with padding ignored.

    `prompt_lens` masks each row's first tokens out of the labels (preference pairs: only the replies are
    targets), `target_spans` keeps only each row's [start, end) spans (instruction and chat data); `classes`
    makes the labels one class id per row instead (sequence classification).
    An empty `rows` (a filler batch) becomes one padding row with no targets, so the rank still runs
    a forward pass in step with the others but adds nothing to the loss.
    """
    width = max([len(r) for r in rows] + [pad_to or 0, 1])
    input_ids = torch.full((max(len(rows), 1), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    for row, prompt_len in enumerate(prompt_lens or []):
        labels[row, :prompt_len] = IGNORE_INDEX
    if target_spans is not None:
        labels = only_spans(labels, target_spans)
    if classes is not None:
        labels = torch.full((input_ids.size(0),), IGNORE_INDEX, dtype=torch.long)
        labels[: len(classes)] = torch.as_tensor(classes, dtype=torch.long)
    if not rows:
        attention_mask[0, 0] = 1  # an all-masked row would give NaN attention; its label stays ignored
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def only_spans(labels: torch.Tensor, spans: list[list[list[int]]]) -> torch.Tensor:
    """The labels with every position outside its row's [start, end) target spans ignored (instruction and
    chat data: the completion, or each assistant message, is the target)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    for row, row_spans in enumerate(spans):
        for start, end in row_spans:
            keep[row, start:end] = True
    return labels.masked_fill(~keep, IGNORE_INDEX)


def collate_pairs(records: dict, pad_id: int) -> dict[str, torch.Tensor]:
    """Two-row records (preference pairs, unpaired records with their KL sequence) as one batch: the first
    sequences in the first half of the rows, the second in the other (so row i and row i + pairs are one
    record), with the reference log-probabilities once known."""
    second = next(name for name in SECOND_ROWS if name in records)
    first, other = list(records["input_ids"]), list(records[second])
    batch = collate(first + other, pad_id, prompt_lens=list(records["prompt_len"]) * 2)
    for name in RECORD_VALUES:
        if name in records:
            batch[name] = torch.as_tensor(records[name], dtype=torch.float32)
    return batch


def target_count(labels: torch.Tensor) -> int:
    """Loss targets in a batch's labels: next tokens (2-D labels) or class ids (1-D labels)."""
    targets = labels if labels.dim() == 1 else labels[:, 1:]
    return int((targets != IGNORE_INDEX).sum())


def collate_packed(rows: list[list[list[int]]], pad_id: int, width: int) -> dict[str, torch.Tensor]:
    """Rows of whole documents laid end to end, with per-document position ids and no attention mask.

    HF models (transformers >= 4.54) read restarting position ids as document boundaries and attend
    within each document only; the first token of each document is not a target, since its only
    context would be the previous document.
    """
    input_ids = torch.full((max(len(rows), 1), width), pad_id, dtype=torch.long)
    position_ids = torch.arange(width).repeat(input_ids.size(0), 1)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, pieces in enumerate(rows):
        offset = 0
        for ids in pieces:
            ids_tensor = torch.as_tensor(ids, dtype=torch.long)
            end = offset + len(ids)
            input_ids[row, offset:end] = ids_tensor
            position_ids[row, offset:end] = torch.arange(len(ids))
            labels[row, offset + 1 : end] = ids_tensor[1:]
            offset = end
        position_ids[row, offset:] = torch.arange(width - offset)  # the padding tail is a block of its own
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


class EpochBatches(torch.utils.data.Dataset):
    """Item g is this rank's collated batch of group g of an epoch plan, with the counts the loop needs."""

    def __init__(
        self,
        sequences: Dataset,
        lengths: np.ndarray,
        plan: EpochPlan,
        rank: int,
        pad_id: int,
        pad_to: int | None,
        sequence_shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.sequence_shard = sequence_shard
        # Fine-tuning data carries a prompt length (masked out of the loss) or a class label per sequence.
        self.extra = [c for c in TASK_COLUMNS if c in sequences.column_names]
        self.paired = any(name in self.extra for name in SECOND_ROWS)  # two rows per record
        self.sequences = sequences.select_columns(["input_ids", *self.extra])
        self.lengths, self.plan, self.rank, self.pad_id, self.pad_to = lengths, plan, rank, pad_id, pad_to

    def __len__(self) -> int:
        return len(self.plan)

    def _rows(self, row_ids: list[int]) -> list[list[int]]:
        return list(self.sequences[row_ids]["input_ids"]) if row_ids else []

    def _collate(self, row_ids: list[int]) -> dict[str, torch.Tensor]:
        if not self.extra:
            return collate(self._rows(row_ids), self.pad_id, self.pad_to)
        records = self.sequences[row_ids] if row_ids else {c: [] for c in ["input_ids", *self.extra]}
        if self.paired:
            return collate_pairs(records, self.pad_id)
        return collate(
            list(records["input_ids"]),
            self.pad_id,
            self.pad_to,
            prompt_lens=records.get("prompt_len"),
            classes=records.get("label"),
            target_spans=records.get("target_spans"),
        )

    def _own_lengths(self, row_ids: list[int], tensors: dict) -> np.ndarray:
        """The token count of each sequence in this rank's batch."""
        if self.paired:  # a pair's planned length is its cost (two rows): count the rows
            return tensors["attention_mask"].sum(dim=1).numpy()[: 2 * len(row_ids)]
        if not row_ids:
            return np.zeros(0, int)
        return self.lengths[np.concatenate([self.plan.row_sequences(r) for r in row_ids])]

    def __getitem__(self, group: int) -> Batch:
        row_ids = [int(r) for r in self.plan.groups[group][self.rank] if r != FILLER]
        if self.plan.packed_rows is None:
            tensors = self._collate(row_ids)
        else:
            pieces = [self._rows([int(i) for i in self.plan.packed_rows[r]]) for r in row_ids]
            tensors = collate_packed(pieces, self.pad_id, self.pad_to)
        members = [self.plan.row_sequences(int(r)) for b in self.plan.groups[group] for r in b if r != FILLER]
        own = self._own_lengths(row_ids, tensors)
        pairs = len(row_ids) if self.paired else 0
        targets = pairs or target_count(tensors["labels"])
        padded_tokens = tensors["input_ids"].numel()
        shard_rank, shard_count = self.sequence_shard
        if shard_count > 1:  # the counts stay the whole batch's: every rank of the group reports them
            tensors = sequence_slice(tensors, self.pad_id, shard_rank, shard_count)
            padded_tokens = tensors["input_ids"].numel() * shard_count  # with the rounding-up padding
            targets = int((tensors["labels"] != IGNORE_INDEX).sum())
        return Batch(
            tensors,
            real_tokens=int(own.sum()),
            padded_tokens=padded_tokens,
            sequences=len(own),
            sum_sq_len=int((own**2).sum()),
            local_targets=targets,
            group_targets=int(self.plan.group_targets[group]),
            group_lengths=torch.as_tensor(np.concatenate(members) if members else np.zeros(0, np.int64)),
            pairs=pairs,
            labels_aligned=shard_count > 1,
        )


def sequence_slice(
    tensors: dict[str, torch.Tensor], pad_id: int, rank: int, size: int
) -> dict[str, torch.Tensor]:
    """One sequence-parallel rank's share of a batch: the `rank`-th of `size` contiguous slices of every row.

    Rows are padded to a multiple of `size` first. The labels are shifted to next-token targets before
    slicing (a Batch of them has `labels_aligned`), because a slice's last token is predicted from the next
    slice; position ids
    stay global (Ulysses gathers them, and rotary embeddings read them). No attention mask: Ulysses
    attends causally by position, and right padding never precedes a real token. `token_mask` says which
    of the slice's tokens are real (a mixture-of-experts router's load-balancing loss leaves padding out,
    lmscale.objectives.balancing); it is not a model input.
    """
    input_ids = tensors["input_ids"]
    rows, width = input_ids.shape
    padded = -(-width // size) * size
    extra = padded - width
    positions = tensors.get("position_ids", torch.arange(width).repeat(rows, 1))
    next_tokens = tensors["labels"][:, 1:]
    real = tensors.get("attention_mask", torch.ones_like(input_ids))
    full = {
        "input_ids": F.pad(input_ids, (0, extra), value=pad_id),
        "token_mask": F.pad(real, (0, extra), value=0),
        "position_ids": torch.cat([positions, positions[:, -1:] + torch.arange(1, extra + 1)], dim=1),
        "labels": F.pad(next_tokens, (0, extra + 1), value=IGNORE_INDEX),
    }
    share = padded // size
    return {name: tensor[:, rank * share : (rank + 1) * share].contiguous() for name, tensor in full.items()}


def seq_len_cap(step: int, start: int, max_seq_len: int, warmup_steps: int) -> int | None:
    """Sequence-length warm-up: the cap grows linearly from `start` to max_seq_len (a multiple of 8); None after."""
    if warmup_steps == 0 or step >= warmup_steps:
        return None
    cap = start + (max_seq_len - start) * step / warmup_steps
    return min(max_seq_len, max(8, int(cap) // 8 * 8))


def truncate_batch(batch: Batch, cap: int) -> Batch:
    """Cut every row to `cap` tokens and recount what the loop measures (bucket and pad batches only)."""
    cut = {k: batch[k][:, :cap] for k in ("input_ids", "attention_mask", "labels")}
    row_lengths = cut["attention_mask"].sum(dim=1)
    group_targets = None
    if batch.group_lengths is not None:  # streamed batches know only this rank's targets
        group_targets = int((batch.group_lengths.clamp(max=cap) - 1).clamp(min=0).sum())
    return replace(
        batch,
        tensors={**batch.tensors, **cut},
        real_tokens=int(row_lengths.sum()),
        padded_tokens=cut["input_ids"].numel(),
        sum_sq_len=int((row_lengths**2).sum()),
        local_targets=target_count(cut["labels"]),
        group_targets=group_targets,
    )


@dataclass
class BatchSettings:
    batching: str  # "bucket", "pack" or "pad"
    max_tokens_per_batch: int
    micro_batch_size: int
    max_seq_len: int
    num_workers: int
    # (this rank's place, ranks) in its sequence-parallel group: each batch is cut to that slice of every row
    sequence_shard: tuple[int, int] = (0, 1)


class BatchStream:
    """This rank's batches, epoch after epoch, resumable at any batch from (seed, epoch, cursor).

    Resuming recomputes the epoch's plan (a pure function of the lengths, seed and epoch) and starts
    at the cursor: nothing before it is loaded or iterated.
    """

    def __init__(
        self,
        sequences: Dataset,
        settings: BatchSettings,
        rank: int,
        world_size: int,
        seed: int,
        pad_id: int,
        shuffle: bool = True,
    ) -> None:
        self.sequences, self.settings, self.rank, self.world_size = sequences, settings, rank, world_size
        self.seed, self.pad_id, self.shuffle = seed, pad_id, shuffle
        # Lengths were stored at tokenization time: reading the column is all start-up costs.
        self.lengths = np.asarray(sequences.data.column("length").to_numpy(), dtype=np.int64)
        self.targets = (
            np.asarray(sequences.data.column("targets").to_numpy(), dtype=np.int64)
            if "targets" in sequences.column_names
            else None
        )
        self.epoch, self.cursor = 0, 0
        # [world_size, cursor] of earlier parts of this epoch that ran on other rank counts
        self.segments: list[list[int]] = []

    def plan(self, epoch: int, whole: bool = False) -> EpochPlan:
        """The epoch's plan: what is left of it after earlier rank counts, or with `whole` all of it."""
        s = self.settings
        return plan_resumed_epoch(
            self.lengths,
            self.world_size,
            self.seed,
            epoch,
            self.segments if epoch == self.epoch and not whole else [],
            mode=s.batching,
            max_tokens=s.max_tokens_per_batch,
            rows=s.micro_batch_size,
            max_seq_len=s.max_seq_len,
            shuffle=self.shuffle,
            targets=self.targets,
        )

    @property
    def pad_to(self) -> int | None:
        return self.settings.max_seq_len if self.settings.batching in ("pad", "pack") else None

    def epoch_figures(self) -> EpochFigures:
        """Sequences, real and padded tokens of a whole epoch (the current one's full plan)."""
        figures = epoch_figures(self.plan(self.epoch, whole=True), self.lengths, self.pad_to)
        if "tokens" in self.sequences.column_names:  # preference pairs: `length` is a pair's planned cost
            return replace(figures, real_tokens=int(np.sum(self.sequences.data.column("tokens").to_numpy())))
        return figures

    def loader(self, epoch: int, start: int, stop: int | None = None) -> DataLoader:
        """Batches `start` to `stop` (at most the epoch's end) of an epoch."""
        plan = self.plan(epoch)
        pad_to = self.pad_to
        shard = self.settings.sequence_shard
        batches = EpochBatches(self.sequences, self.lengths, plan, self.rank, self.pad_id, pad_to, shard)
        workers = self.settings.num_workers
        return DataLoader(
            batches,
            batch_size=None,
            sampler=range(start, len(plan) if stop is None else min(stop, len(plan))),
            num_workers=workers,
            prefetch_factor=4 if workers else None,
            worker_init_fn=ignore_stop_signals,
            pin_memory=torch.cuda.is_available(),  # page-locked batches copy to the GPU asynchronously
            # Its own generator: creating an iterator must not draw from the global RNG, which dropout
            # uses, or a resumed run would see different dropout masks than an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def __iter__(self) -> Iterator[Batch]:
        while True:
            for batch in self.loader(self.epoch, self.cursor):
                self.cursor += (
                    1  # counted as consumed once handed out, so a checkpoint after it resumes past it
                )
                yield batch
            self.epoch, self.cursor, self.segments = self.epoch + 1, 0, []

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "world_size": self.world_size,
            "segments": self.segments,
        }

    def load_state_dict(self, state: dict) -> bool:
        """Continue where `state` stopped, also when it was written by a different number of ranks;
        always True (a planned position always applies; streamed ones may not, see StreamingBatches)."""
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self.segments = [list(part) for part in state.get("segments", [])]
        if state["world_size"] != self.world_size:
            # The groups done so far were planned for the old rank count: plan what they left anew.
            self.segments.append([state["world_size"], self.cursor])
            self.cursor = 0
        return True
