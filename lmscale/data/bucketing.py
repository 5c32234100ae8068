"""Epoch plans: which sequences go into which batch on which rank, as pure functions of (lengths, seed, epoch).

Written by hand because no library does this well: HF's `group_by_length` keeps a fixed number of
rows per batch (so long rows still dominate the padding) and sorts at start-up on every run.

A plan is a list of *groups*; group g holds one batch per rank, so every rank runs the same number of
forward passes (ZeRO-3 needs that: its parameter all-gathers are collectives). Across all ranks every
sequence appears in exactly one batch per epoch. A batch is an array of dataset indices; index
FILLER stands for a one-row batch with no targets, used only when a plan cannot otherwise be
divided evenly among ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FILLER = -1


@dataclass(frozen=True)
class EpochPlan:
    groups: list[list[np.ndarray]]  # groups[g][rank] -> that rank's batch: row ids
    # loss targets (default: length - 1 per sequence) summed over the group's batches
    group_targets: np.ndarray
    packed_rows: list[np.ndarray] | None = None  # pack mode: row id -> sequences concatenated in that row

    def row_sequences(self, row: int) -> np.ndarray:
        """The sequence indices of a row (one sequence per row unless packed)."""
        return self.packed_rows[row] if self.packed_rows is not None else np.array([row])

    def __len__(self) -> int:
        return len(self.groups)


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def _largest_fitting_end(sorted_lengths: np.ndarray, start: int, max_tokens: int) -> int:
    """Largest end with (end - start) rows x longest row <= max_tokens; lengths ascend, so binary search."""
    low, high = start + 1, len(sorted_lengths)
    while low < high:
        mid = (low + high + 1) // 2
        if (mid - start) * sorted_lengths[mid - 1] <= max_tokens:
            low = mid
        else:
            high = mid - 1
    return low


def length_buckets(lengths: np.ndarray, max_tokens: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of similar-length sequences, each as many rows as fit `max_tokens` padded tokens."""
    order = rng.permutation(len(lengths))
    order = order[np.argsort(lengths[order], kind="stable")]  # ascending length, random order among equals
    sorted_lengths = lengths[order]
    batches, start = [], 0
    while start < len(order):
        end = _largest_fitting_end(sorted_lengths, start, max_tokens)
        batches.append(order[start:end])
        start = end
    return batches


def fixed_batches(count: int, rows: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random batches of `rows` sequences (the last one may be short): the `pad` baseline."""
    order = rng.permutation(count)
    return [order[i : i + rows] for i in range(0, count, rows)]


def pack_rows(lengths: np.ndarray, max_seq_len: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Concatenate sequences, in random order, into rows of at most max_seq_len tokens (next fit, no splits)."""
    rows, current, used = [], [], 0
    for index in rng.permutation(len(lengths)):
        if current and used + lengths[index] > max_seq_len:
            rows.append(np.array(current))
            current, used = [], 0
        current.append(index)
        used += int(lengths[index])
    if current:
        rows.append(np.array(current))
    return rows


def divide_among_ranks(batches: list[np.ndarray], world_size: int) -> list[np.ndarray]:
    """Make the batch count a multiple of world_size without dropping or repeating a sequence.

    Splits the batches with the most rows (neighbours stay neighbours, so groups stay balanced);
    only when no batch has two rows left does it add filler batches.
    """
    batches = list(batches)
    while len(batches) % world_size:
        sizes = np.array([len(b) for b in batches])
        widest = int(sizes.argmax()) if len(sizes) else 0
        if not len(sizes) or sizes[widest] < 2:
            batches += [np.array([FILLER])] * (world_size - len(batches) % world_size)
            break
        half = len(batches[widest]) // 2
        batches[widest : widest + 1] = [batches[widest][:half], batches[widest][half:]]
    return batches


def plan_epoch(
    lengths: np.ndarray,
    world_size: int,
    seed: int,
    epoch: int,
    mode: str = "bucket",
    max_tokens: int = 4096,
    rows: int = 1,
    max_seq_len: int = 0,
    shuffle: bool = True,
    targets: np.ndarray | None = None,
) -> EpochPlan:
    """Plan one epoch.

    bucket: length buckets of at most `max_tokens` padded tokens; pad: `rows` random sequences per batch;
    pack: sequences concatenated into rows of `max_seq_len`, `max_tokens // max_seq_len` rows per batch.
    `targets` counts each sequence's loss targets (default length - 1: every next token).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    rng = _epoch_rng(seed, epoch)
    packed = None
    if mode == "bucket":
        batches = length_buckets(lengths, max_tokens, rng)
    elif mode == "pack":
        packed = pack_rows(lengths, max_seq_len, rng)
        batches = fixed_batches(len(packed), max(1, max_tokens // max_seq_len), rng)
    else:
        batches = fixed_batches(len(lengths), rows, rng)
    batches = divide_among_ranks(batches, world_size)
    # Consecutive batches have similar lengths, so a group's ranks do similar work and none waits long.
    groups = [batches[i : i + world_size] for i in range(0, len(batches), world_size)]
    if shuffle:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    per_sequence = lengths - 1 if targets is None else np.asarray(targets, dtype=np.int64)
    row_targets = per_sequence if packed is None else np.array([int(per_sequence[r].sum()) for r in packed])
    row_targets = np.append(row_targets, 0)  # FILLER (-1) reads this 0: a filler row has no targets
    targets = np.array([sum(int(row_targets[b].sum()) for b in group) for group in groups], dtype=np.int64)
    return EpochPlan(groups=groups, group_targets=targets, packed_rows=packed)


def plan_subset(
    lengths: np.ndarray, sequence_ids: np.ndarray, world_size: int, seed: int, epoch: int, **kw
) -> EpochPlan:
    """`plan_epoch` over only the sequences `sequence_ids`, with batches naming the original indices."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if kw.get("targets") is not None:
        kw = {**kw, "targets": np.asarray(kw["targets"])[sequence_ids]}
    sub = plan_epoch(lengths[sequence_ids], world_size, seed, epoch, **kw)
    if sub.packed_rows is not None:  # batches name packed rows; the rows name sequences
        packed = [sequence_ids[row] for row in sub.packed_rows]
        return EpochPlan(groups=sub.groups, group_targets=sub.group_targets, packed_rows=packed)
    original = np.append(sequence_ids, FILLER)  # index FILLER (-1) maps to FILLER
    groups = [[original[batch] for batch in group] for group in sub.groups]
    return EpochPlan(groups=groups, group_targets=sub.group_targets)


def consumed_sequences(plan: EpochPlan, cursor: int) -> np.ndarray:
    """The sequences the first `cursor` groups of a plan cover, on all ranks."""
    rows = [
        plan.row_sequences(int(r)) for group in plan.groups[:cursor] for b in group for r in b if r != FILLER
    ]
    return np.concatenate(rows) if rows else np.zeros(0, np.int64)


def plan_resumed_epoch(
    lengths: np.ndarray, world_size: int, seed: int, epoch: int, segments: list[list[int]], **kw
) -> EpochPlan:
    """The rest of an epoch whose earlier part ran on other rank counts.

    `segments` lists `[world_size, cursor]` of each earlier part, oldest first: each part planned what
    was left with its own rank count and consumed its first `cursor` groups. What all parts left is
    planned for `world_size` ranks, so across a change of rank count no sequence is skipped or repeated.
    With no segments this is exactly `plan_epoch`.
    """
    remaining = np.arange(len(lengths))
    for part_world_size, part_cursor in segments:
        part = plan_subset(lengths, remaining, part_world_size, seed, epoch, **kw)
        remaining = np.setdiff1d(remaining, consumed_sequences(part, part_cursor))
    return plan_subset(lengths, remaining, world_size, seed, epoch, **kw)
