import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lmscale.data.bucketing import (
    FILLER,
    consumed_sequences,
    divide_among_ranks,
    plan_epoch,
    plan_resumed_epoch,
)

lengths_strategy = st.lists(st.integers(min_value=2, max_value=64), min_size=1, max_size=300)


def all_indices(plan):
    return [int(i) for group in plan.groups for batch in group for i in batch if i != FILLER]


@settings(max_examples=150, deadline=None)
@given(
    lengths=lengths_strategy,
    world_size=st.integers(1, 4),
    budget=st.integers(64, 512),
    seed=st.integers(0, 9),
)
def test_bucket_plan_properties(lengths, world_size, budget, seed):
    lengths = np.array(lengths)
    plan = plan_epoch(lengths, world_size, seed=seed, epoch=0, max_tokens=budget)
    # every sequence exactly once per epoch, across all ranks
    assert sorted(all_indices(plan)) == list(range(len(lengths)))
    # every rank gets the same number of batches
    assert all(len(group) == world_size for group in plan.groups)
    for group in plan.groups:
        for batch in group:
            real = batch[batch != FILLER]
            # the padded size (rows x longest) never exceeds the budget
            assert len(real) == 0 or len(real) * lengths[real].max() <= budget
    # deterministic for a seed and epoch, different across epochs
    again = plan_epoch(lengths, world_size, seed=seed, epoch=0, max_tokens=budget)
    assert [[b.tolist() for b in g] for g in again.groups] == [[b.tolist() for b in g] for g in plan.groups]
    expected_targets = [sum(int((lengths[b[b != FILLER]] - 1).sum()) for b in g) for g in plan.groups]
    assert plan.group_targets.tolist() == expected_targets


def test_buckets_cut_padding_and_vary_rows():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 257, size=5000)
    plan = plan_epoch(lengths, world_size=2, seed=0, epoch=0, max_tokens=4096)
    padded = sum(len(b) * lengths[b].max() for g in plan.groups for b in g)
    assert 1 - lengths.sum() / padded < 0.02
    rows = [len(b) for g in plan.groups for b in g]
    assert max(rows) > 10 * min(rows)  # short sequences get large batches, long ones small
    other_epoch = plan_epoch(lengths, world_size=2, seed=0, epoch=1, max_tokens=4096)
    assert [g[0].tolist() for g in other_epoch.groups] != [g[0].tolist() for g in plan.groups]


def test_fixed_rows_plan_keeps_every_sequence():
    plan = plan_epoch(np.full(10, 8), world_size=3, seed=0, epoch=0, mode="pad", rows=4)
    assert sorted(all_indices(plan)) == list(range(10))
    assert all(len(g) == 3 for g in plan.groups)


def test_filler_only_when_no_batch_can_be_split():
    batches = divide_among_ranks([np.array([0]), np.array([1]), np.array([2])], world_size=2)
    assert [b.tolist() for b in batches] == [[0], [1], [2], [FILLER]]
    batches = divide_among_ranks([np.array([0, 1]), np.array([2])], world_size=3)
    assert [b.tolist() for b in batches] == [[0], [1], [2]]  # split, no filler


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_strategy, world_size=st.integers(1, 3), seed=st.integers(0, 9))
def test_pack_plan_properties(lengths, world_size, seed):
    lengths = np.array(lengths)
    plan = plan_epoch(lengths, world_size, seed, epoch=0, mode="pack", max_tokens=256, max_seq_len=64)
    rows = [r for g in plan.groups for b in g for r in b if r != FILLER]
    sequences = sorted(int(i) for r in rows for i in plan.row_sequences(r))
    assert sequences == list(range(len(lengths)))  # each sequence once, none split or dropped
    assert all(lengths[plan.row_sequences(r)].sum() <= 64 for r in rows)
    assert all(len(b) <= 256 // 64 for g in plan.groups for b in g)
    assert plan.group_targets.sum() == (lengths - 1).sum()


@settings(max_examples=150, deadline=None)
@given(
    lengths=lengths_strategy,
    rank_counts=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    fractions=st.lists(st.floats(0, 1), min_size=3, max_size=3),
    mode=st.sampled_from(["bucket", "pack", "pad"]),
)
def test_an_epoch_resumed_on_other_rank_counts_covers_every_sequence_once(
    lengths, rank_counts, fractions, mode
):
    lengths = np.array(lengths)
    options = {"mode": mode, "max_tokens": 256, "rows": 3, "max_seq_len": 64}
    segments, seen = [], []
    for world_size, fraction in zip(rank_counts[:-1], fractions, strict=False):
        part = plan_resumed_epoch(lengths, world_size, 5, 0, segments, **options)
        cursor = int(fraction * len(part))
        seen += consumed_sequences(part, cursor).tolist()
        segments.append([world_size, cursor])
    rest = plan_resumed_epoch(lengths, rank_counts[-1], 5, 0, segments, **options)
    seen += consumed_sequences(rest, len(rest)).tolist()
    assert sorted(seen) == list(range(len(lengths)))
    assert all(len(group) == rank_counts[-1] for group in rest.groups)


def test_a_resumed_epoch_without_earlier_parts_is_the_plain_plan():
    lengths = np.random.default_rng(0).integers(2, 64, 200)
    for mode in ("bucket", "pack", "pad"):
        plain = plan_epoch(lengths, 2, 1, 3, mode=mode, max_tokens=256, rows=3, max_seq_len=64)
        resumed = plan_resumed_epoch(lengths, 2, 1, 3, [], mode=mode, max_tokens=256, rows=3, max_seq_len=64)
        assert [[b.tolist() for b in g] for g in resumed.groups] == [
            [b.tolist() for b in g] for g in plain.groups
        ]
        assert resumed.group_targets.tolist() == plain.group_targets.tolist()
