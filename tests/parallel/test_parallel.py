"""Tensor-parallel layouts: how ranks divide, what the DeepSpeed config says, and every bad layout refused
with its fix before anything runs."""

import pytest
import torch
from transformers import GPT2Config, LlamaConfig

from lmscale.config import load_config
from lmscale.data.batches import collate, sequence_slice
from lmscale.errors import ConfigError
from lmscale.parallel.ds_config import resolve
from lmscale.parallel.layout import (
    Layout,
    head_split_problems,
    layout_problems,
    model_split_problems,
    split_problems,
)


def resolved(world_size, *overrides):
    config, explicit = load_config(None, list(overrides))
    return resolve(config, explicit, world_size, has_gpu=False)


def test_tensor_groups_are_consecutive_ranks_as_deepspeed_lays_them_out():
    layout = Layout(world_size=4, tensor=2)
    assert layout.data == 2 and layout.copies == 2
    assert [layout.data_rank(r) for r in range(4)] == [0, 0, 1, 1]
    assert [layout.tensor_rank(r) for r in range(4)] == [0, 1, 0, 1]
    assert Layout(4).data == 4 and Layout(4).copies == 1
    assert layout.describe() == "2 data-parallel x 2 tensor-parallel rank(s)"


def test_deepspeed_config_asks_for_autotp():
    config, ds = resolved(4, "parallel.tensor=2", "zero.stage=1", "train.micro_batch_size=3")
    assert ds["tensor_parallel"]["autotp_size"] == 2
    assert (
        ds["train_batch_size"] == 3 * 4
    )  # DeepSpeed counts every rank (it checks before AutoTP's groups exist)
    _, plain = resolved(4, "zero.stage=1", "train.micro_batch_size=3")
    assert "tensor_parallel" not in plain and plain["train_batch_size"] == 12


def test_global_batch_size_is_counted_in_data_parallel_ranks():
    tp = (4, "parallel.tensor=2", "zero.stage=1", "train.micro_batch_size=3")
    config, ds = resolved(*tp, "train.global_batch_size=12")  # 2 data-parallel ranks: accumulate 2
    assert config.train.grad_accum_steps == 2 and ds["gradient_accumulation_steps"] == 2
    with pytest.raises(ConfigError, match="x 2 rank"):
        resolved(*tp, "train.grad_accum_steps=1", "train.global_batch_size=12")
    with pytest.raises(ConfigError, match=r"global_batch_size=9 is not a multiple of .* x 2 rank\(s\) = 6"):
        resolved(*tp, "train.global_batch_size=9")


def test_a_deepspeed_json_sets_the_tensor_degree(tmp_path):
    json_path = tmp_path / "tp.json"
    json_path.write_text('{"tensor_parallel": {"autotp_size": 2}, "zero_optimization": {"stage": 1}}')
    config, ds = resolved(2, f"deepspeed_config={json_path}")
    assert config.parallel.tensor == 2 and ds["tensor_parallel"]["autotp_size"] == 2
    with pytest.raises(ConfigError, match="parallel.tensor=1 but"):
        resolved(2, f"deepspeed_config={json_path}", "parallel.tensor=1")


@pytest.mark.parametrize(
    ("world_size", "overrides", "message"),
    [
        (3, ["zero.stage=1"], "parallel.tensor=2 does not divide the job's 3 rank(s)"),
        (2, ["zero.stage=3"], "does not combine with zero.stage=3"),
        (2, ["zero.stage=0"], "needs zero.stage 1 or 2"),
        (2, ["zero.stage=2", "zero.offload=cpu"], "not tested with zero.offload"),
        (2, ["zero.stage=1", "finetune.lora.r=8"], "does not split LoRA adapters"),
    ],
)
def test_bad_layouts_are_refused_with_the_fix(world_size, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolved(world_size, "parallel.tensor=2", *overrides)


def test_the_split_must_divide_heads_key_value_heads_and_mlp_width():
    llama = LlamaConfig(num_attention_heads=6, num_key_value_heads=3, intermediate_size=96, hidden_size=48)
    assert split_problems(llama, 3) == []
    problems = split_problems(llama, 2)
    assert len(problems) == 1 and "the model's 3 key-value heads" in problems[0]
    assert "choose a parallel.tensor that divides 3" in problems[0]
    assert len(split_problems(llama, 4)) == 2  # 6 heads, 3 key-value heads; 96 divides by 4
    assert "96 MLP width" in split_problems(llama, 5)[-1]
    assert split_problems(GPT2Config(n_head=4), 2) == [] and split_problems(GPT2Config(n_head=4), 1) == []
    assert "4 attention heads" in split_problems(GPT2Config(n_head=4), 3)[0]


def test_families_autotp_cannot_split_are_named():
    from transformers import AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    (problem,) = model_split_problems(gpt2, Layout(2, tensor=2))
    assert "DeepSpeed AutoTP cannot split gpt2 models" in problem and "model.preset=tiny-llama" in problem
    assert model_split_problems(gpt2, Layout(2)) == []
    llama = AutoModelForCausalLM.from_config(
        LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
                    intermediate_size=32, vocab_size=64)
    )  # fmt: skip
    assert model_split_problems(llama, Layout(2, tensor=2)) == []
    assert model_split_problems(llama, Layout(2, sequence=2)) == []
    (problem,) = model_split_problems(gpt2, Layout(2, sequence=2))
    assert "gpt2 attention does not fit DeepSpeed Ulysses" in problem


def test_sequence_groups_share_batches_and_count_them_once():
    layout = Layout(world_size=4, sequence=2)
    assert layout.data == 2 and layout.copies == 2
    assert [layout.data_rank(r) for r in range(4)] == [0, 0, 1, 1]
    assert [layout.sequence_rank(r) for r in range(4)] == [0, 1, 0, 1]
    assert layout.describe() == "2 data-parallel x 2 sequence-parallel rank(s)"


def test_tensor_and_sequence_groups_compose_tensor_fastest():
    layout = Layout(world_size=8, tensor=2, sequence=2)
    assert layout.data == 2 and layout.copies == 4
    assert [layout.tensor_rank(r) for r in range(8)] == [0, 1] * 4
    assert [layout.sequence_rank(r) for r in range(8)] == [0, 0, 1, 1] * 2
    assert [layout.data_rank(r) for r in range(8)] == [0] * 4 + [1] * 4
    # a sequence group: the ranks holding the same tensor slice of one data-parallel group
    assert layout.sequence_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert Layout(4, sequence=2).sequence_groups() == [[0, 1], [2, 3]]
    assert layout.describe() == "2 data-parallel x 2 sequence-parallel x 2 tensor-parallel rank(s)"


def test_tensor_with_sequence_parallel_deepspeed_config():
    _, ds = resolved(
        4, "parallel.tensor=2", "parallel.sequence=2", "zero.stage=1", "train.micro_batch_size=3"
    )
    # AutoTP's mesh replaces the sequence groups inside DeepSpeed, which then counts every rank
    assert ds["tensor_parallel"]["autotp_size"] == 2 and "sequence_parallel_size" not in ds
    assert ds["train_batch_size"] == 3 * 4


def test_ulysses_deals_out_each_tensor_slices_heads():
    llama = LlamaConfig(num_attention_heads=8, num_key_value_heads=4, hidden_size=64)
    assert head_split_problems(llama, 2, tensor=2) == []
    (problem,) = head_split_problems(llama, 8, tensor=2)[:1]
    assert "does not divide each tensor slice's 4 attention heads" in problem


def test_sequence_parallel_deepspeed_config():
    _, ds = resolved(4, "parallel.sequence=2", "zero.stage=2", "train.micro_batch_size=3")
    assert ds["sequence_parallel_size"] == 2 and "tensor_parallel" not in ds
    assert ds["train_batch_size"] == 3 * 2  # DeepSpeed divides sequence-parallel ranks out of its count


@pytest.mark.parametrize(
    ("world_size", "overrides", "message"),
    [
        (3, [], "parallel.sequence=2 does not divide the job's 3 rank(s)"),
        (
            6,
            ["parallel.tensor=2", "zero.stage=1"],
            "parallel.tensor=2 x parallel.sequence=2 = 4 ranks per group",
        ),
        (2, ["model.attn_implementation=eager"], "needs model.attn_implementation sdpa"),
        (2, ["data.batching=pack"], "across packed documents: use data.batching=bucket"),
        (2, ["data.streaming=true", "train.max_steps=10", "schedule.warmup_steps=1"], "unset data.streaming"),
        (2, ["data.seq_len_warmup_steps=10"], "set data.seq_len_warmup_steps=0"),
        (2, ["finetune.lora.r=8"], "not tested with LoRA"),
    ],
)
def test_bad_sequence_layouts_are_refused_with_the_fix(world_size, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolved(world_size, "parallel.sequence=2", *overrides)


def test_sequence_split_must_fit_the_heads():
    llama = LlamaConfig(num_attention_heads=6, num_key_value_heads=2, hidden_size=48)
    assert head_split_problems(llama, 2) == []
    assert (
        head_split_problems(LlamaConfig(num_attention_heads=8, num_key_value_heads=2), 4) == []
    )  # kv replicated
    (problem,) = head_split_problems(llama, 4)
    assert "does not divide the model's 6 attention heads" in problem
    assert (
        "3 key-value heads"
        in head_split_problems(LlamaConfig(num_attention_heads=6, num_key_value_heads=3, hidden_size=48), 2)[
            0
        ]
    )


def test_a_sequence_slice_holds_contiguous_tokens_global_positions_and_shifted_targets():
    tensors = collate([[5, 6, 7, 8, 9], [1, 2, 3]], pad_id=0)  # width 5: padded to 6 for 2 ranks
    first, second = (sequence_slice(tensors, 0, rank, 2) for rank in (0, 1))
    assert first["input_ids"].tolist() == [[5, 6, 7], [1, 2, 3]]
    assert second["input_ids"].tolist() == [[8, 9, 0], [0, 0, 0]]
    assert second["position_ids"].tolist() == [[3, 4, 5], [3, 4, 5]]
    # Each position's own next token; the last slice's last target and padding are ignored.
    assert first["labels"].tolist() == [[6, 7, 8], [2, 3, -100]]
    assert second["labels"].tolist() == [[9, -100, -100], [-100, -100, -100]]
    assert "attention_mask" not in first
    whole = int((tensors["labels"][:, 1:] != -100).sum())
    assert whole == sum(int((s["labels"] != -100).sum()) for s in (first, second))


def test_slicing_and_the_aligned_loss_give_the_unsplit_loss():
    from lmscale.objectives.loss import aligned_token_loss, summed_token_loss

    tensors = collate([[5, 6, 7, 8, 9], [1, 2, 3]], pad_id=0)
    logits = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(0))
    whole = summed_token_loss(logits[:, :5], tensors["labels"])
    parts = [sequence_slice(tensors, 0, rank, 2)["labels"] for rank in (0, 1)]
    split = sum(aligned_token_loss(logits[:, 3 * r : 3 * r + 3], parts[r]) for r in (0, 1))
    torch.testing.assert_close(split, whole)
    chunked = sum(aligned_token_loss(logits[:, 3 * r : 3 * r + 3], parts[r], chunked=True) for r in (0, 1))
    torch.testing.assert_close(chunked, whole)


def test_sequence_parallel_batches_count_the_whole_batch_and_the_rounding_padding():
    from datasets import Dataset

    from lmscale.data.batches import BatchSettings, BatchStream

    rows = [[1 + i % 7] * n for i, n in enumerate([5, 5, 3, 7, 7, 2])]
    data = Dataset.from_dict({"input_ids": rows, "length": [len(r) for r in rows]})
    shards = [
        next(iter(BatchStream(data, BatchSettings("bucket", 64, 1, 8, 0, (rank, 2)), 0, 1, seed=1, pad_id=0)))
        for rank in (0, 1)
    ]
    whole = next(iter(BatchStream(data, BatchSettings("bucket", 64, 1, 8, 0), 0, 1, seed=1, pad_id=0)))
    for shard in shards:
        assert (shard.real_tokens, shard.sequences) == (whole.real_tokens, whole.sequences)
        assert shard.padded_tokens >= whole.padded_tokens and shard.padded_tokens % 2 == 0
    assert sum(s.local_targets for s in shards) == whole.local_targets == whole.group_targets


def test_mixture_of_experts_models_split_tensors_only_with_their_experts_and_rows_without_them():
    from transformers import AutoModelForCausalLM, MixtralConfig

    moe = AutoModelForCausalLM.from_config(
        MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)
    )  # fmt: skip
    (problem,) = model_split_problems(moe, Layout(4, sequence=2, expert=2))
    assert "splits a mixture-of-experts model's rows or its experts, not both yet" in problem
    assert model_split_problems(moe, Layout(2, sequence=2)) == []  # Ulysses, every expert on every rank
    (problem,) = model_split_problems(moe, Layout(2, tensor=2))
    assert "only together with its experts" in problem and "parallel.expert" in problem
    assert model_split_problems(moe, Layout(2)) == []
    assert model_split_problems(moe, Layout(2, tensor=2, expert=2)) == []  # AutoEP + AutoTP folding
    # Folded expert groups span the tensor groups: the degree divides all the ranks, not the replicas.
    assert layout_problems(2, 1, 2, expert=2) == []
    (problem,) = layout_problems(2, 1, 4, expert=3)
    assert "parallel.expert=3 does not divide the job's 4 rank(s)" in problem
    assert Layout(4, tensor=2, expert=2).expert_copies == 2
