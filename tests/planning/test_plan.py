"""The memory planner against hand-worked numbers, and against the partitions DeepSpeed really writes."""

import json
import re
from dataclasses import replace

import pytest
import torch
from helpers import REPO, run_lmscale
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from lmscale.config import Config
from lmscale.planning.activations import (
    ActivationSetup,
    backward_units,
    block_backward_bytes,
    head_gradient_bytes,
    layer_units,
    loss_backward_bytes,
    outside_units,
    step_activation_bytes,
)
from lmscale.planning.command import recommend
from lmscale.planning.plan import (
    GIB,
    Hardware,
    ModelFacts,
    buffer_bytes,
    facts_of,
    largest_token_budget,
    model_facts,
    model_state_bytes,
    plan_rows,
)

GPT2_124M = 124_439_808  # the published count (tied embeddings, vocab 50257, 1024 positions)
TINYLLAMA_1B = 1_100_048_384  # 22 layers x 2048, GQA 32/4 heads, 5632 MLP, vocab 32000, untied head


def meta_facts(config) -> ModelFacts:
    with torch.device("meta"):
        return facts_of(AutoModelForCausalLM.from_config(config))


def test_parameter_counts_match_the_published_ones():
    assert meta_facts(GPT2Config()).params == GPT2_124M
    llama = LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
    )  # fmt: skip
    assert meta_facts(llama).params == TINYLLAMA_1B


@pytest.mark.parametrize(
    ("stage", "offload", "gpu", "cpu"),
    [
        # psi = 124,439,808 on 8 ranks, mixed precision: 2 + 2 + 12 bytes per parameter
        (0, False, 16 * GPT2_124M, 0),  # 1,991,036,928
        (1, False, 4 * GPT2_124M + 12 * GPT2_124M // 8, 0),  # 684,418,944
        (2, False, 2 * GPT2_124M + 14 * GPT2_124M // 8, 0),  # 466,649,280
        (3, False, 16 * GPT2_124M // 8, 0),  # 248,879,616
        (2, True, 2 * GPT2_124M + 2 * GPT2_124M // 8, 12 * GPT2_124M // 8),
        (3, True, 2 * GPT2_124M // 8, 14 * GPT2_124M // 8),
    ],
)
def test_gpt2_124m_model_states_on_eight_gpus(stage, offload, gpu, cpu):
    assert model_state_bytes(GPT2_124M, stage, 8, offload, "bf16") == (gpu, cpu)


def test_one_billion_llama_fp32_and_bf16():
    assert model_state_bytes(TINYLLAMA_1B, 0, 1, False, "bf16") == (
        17_600_774_144,
        0,
    )  # 16.4 GiB: a 24 GB GPU
    assert model_state_bytes(TINYLLAMA_1B, 0, 1, False, "fp32") == (17_600_774_144, 0)  # 4 + 4 + 8: the same
    assert model_state_bytes(TINYLLAMA_1B, 3, 8, False, "bf16") == (2_200_096_768, 0)


def test_muon_and_bf16_states_shrink_the_optimizers_bytes():
    from lmscale.planning.plan import state_widths

    adam = state_widths("bf16", "adamw", "fp32", 0.0)
    assert (adam.weight, adam.grad, adam.states) == (2, 2, 12)  # the planner's AdamW, unchanged
    assert (
        state_widths("bf16", "adamw", "bf16", 0.0).states == 6
    )  # bf16 master copy and moments: 6 bytes less
    # Adam's two fp32 moments for 10%; one momentum for 90%, bf16 under ZeRO 1-3, fp32 without ZeRO
    assert state_widths("bf16", "muon", "fp32", 0.9).states == pytest.approx(4 + 8 * 0.1 + 2 * 0.9)
    assert state_widths("bf16", "muon", "fp32", 0.9, stage=0).states == pytest.approx(4 + 8 * 0.1 + 4 * 0.9)
    assert state_widths("fp32", "muon", "fp32", 1.0).states == 4
    llama = LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
    )  # fmt: skip
    facts = meta_facts(llama)
    rows = {
        name: plan_rows(facts, Config.model_validate({"optim": {"name": name}}), Hardware(8), tokens=1024)
        for name in ("adamw", "muon")
    }
    # ZeRO-0: Muon keeps one moment instead of two for the blocks' matrices (~88% of TinyLlama's weights)
    saved = rows["adamw"][0].model_state_bytes - rows["muon"][0].model_state_bytes
    assert saved == pytest.approx(4 * facts.split_params, rel=1e-6)


def test_lora_keeps_states_for_the_adapters_only():
    from lmscale.config import LoraConfig
    from lmscale.model.finetune import apply_lora

    with torch.device("meta"):
        model = apply_lora(AutoModelForCausalLM.from_config(GPT2Config()), LoraConfig(r=8))
    facts = facts_of(model)
    adapters = 12 * 8 * (768 + 3 * 768)  # r x (in + out) for each layer's c_attn (768 -> 2304)
    assert (facts.trainable_params, facts.frozen_params) == (adapters, GPT2_124M)
    # every weight in 16-bit; gradients (2) and fp32 weights + Adam moments (12) for the adapters only
    assert model_state_bytes(facts.params, 0, 1, False, "bf16", facts.trainable_params) == (
        2 * (GPT2_124M + adapters) + 14 * adapters,
        0,
    )
    # buckets: gradients and (ZeRO 1-2) updated partitions are the adapters'; ZeRO-3 gathers every weight
    assert buffer_bytes(facts.params, 2, adapters) == 2 * 2 * adapters + GIB
    assert buffer_bytes(facts.params, 3, adapters) == 2 * (adapters + GPT2_124M + adapters) + GIB


def bf16_row(seq_len: int, **options) -> ActivationSetup:
    return ActivationSetup(seq_len=seq_len, precision="bf16", **options)


def test_activation_bytes_by_hand():
    gpt2 = ModelFacts(params=GPT2_124M, largest_layer_params=0, layers=12, hidden=768, heads=12, vocab=50257)
    h, w, vocab = 768, 4 * 768, 50257
    # a block keeps 16 units of h in 16-bit: two LayerNorms' inputs and outputs (4), queries, keys, values and
    # the output projection's input (4), the fused GELU's input and output (2 x 4h); one block's backward adds
    # 3h + one MLP intermediate's gradient; the loss's backward: the final norm (2h) and 12 bytes per
    # vocabulary entry. The step's peak is the larger phase: the loss's backward, here.
    layer, backward, outside = 16 * h, 3 * h + w, 2 * h + 12 * vocab / 2
    assert loss_backward_bytes(gpt2, bf16_row(1024)) == 2 * (12 * layer + outside)
    assert block_backward_bytes(gpt2, bf16_row(1024)) == 2 * (12 * layer + backward)
    assert loss_backward_bytes(gpt2, bf16_row(1024)) > block_backward_bytes(gpt2, bf16_row(1024))
    # eager: each block keeps the fp32 probabilities and their 16-bit copy (3 units per head and position);
    # a block's backward holds their fp32 gradient (2 units), wider than the MLP's
    scores = 12 * 1024
    eager = bf16_row(1024, attention="eager")
    assert block_backward_bytes(gpt2, eager) == 2 * (12 * (layer + 3 * scores) + 3 * h + 2 * scores)
    assert loss_backward_bytes(gpt2, eager) == 2 * (12 * (layer + 3 * scores) + outside)
    assert loss_backward_bytes(gpt2, eager) > block_backward_bytes(gpt2, eager)
    # checkpointing: every block's input; a block's backward also holds the block recomputed
    checkpointed = bf16_row(1024, checkpointing=True)
    assert loss_backward_bytes(gpt2, checkpointed) == 2 * (12 * h + outside)
    assert block_backward_bytes(gpt2, checkpointed) == 2 * (12 * h + layer + backward)
    # fp32: the same units at 4 bytes, the loss's 12 bytes per vocabulary entry alike
    fp32 = ActivationSetup(seq_len=1024, precision="fp32")
    assert loss_backward_bytes(gpt2, fp32) == 4 * (12 * layer + 2 * h + 12 * vocab / 4)
    assert loss_backward_bytes(gpt2, fp32) > block_backward_bytes(gpt2, fp32)


def test_step_peak_is_the_largest_phase_with_its_once_per_step_gradients():
    """The fused loss's output-layer gradient lives in the loss's backward only, unless the output layer is tied
    to the embedding: then autograd holds it through every block's backward, and at the end of backward the
    embedding's gradient joins it (three vocabulary x hidden matrices)."""
    llama = tiny_llama_facts()
    h, vocab = llama.hidden, llama.vocab
    fused = bf16_row(128, chunked_loss=True, checkpointing=True)
    head = vocab * h * 2
    loss, block = loss_backward_bytes(llama, fused), block_backward_bytes(llama, fused)
    for tokens in (128, 4096, 65536):
        untied = replace(llama, tied_embeddings=False)
        assert step_activation_bytes(untied, fused, tokens) == int(
            max(loss * tokens + head, block * tokens, head)
        )
        tied = replace(llama, tied_embeddings=True)
        expected = max(loss * tokens + head, block * tokens + head, 3 * head)
        assert step_activation_bytes(tied, fused, tokens) == int(expected)


def test_activation_bytes_of_a_llama_block_by_hand():
    """RMSNorm upcasts its input to fp32 in 16-bit (2 units), keeps the normalized input and its output; the
    gated MLP keeps four intermediates; grouped-query keys and values are narrower; Qwen3's per-head norms of
    queries and keys keep their input and normalized output."""
    facts = tiny_llama_facts()
    h, q, kv, w = 64, 64, 32, 176
    assert (facts.gated_mlp, facts.rms_norm, facts.qk_norm, facts.mlp_width) == (True, True, False, w)
    assert layer_units(facts, bf16_row(128)) == 2 * 4 * h + 2 * q + 2 * kv + 4 * w
    assert (
        layer_units(facts, ActivationSetup(seq_len=128, precision="fp32"))
        == 2 * 3 * h + 2 * q + 2 * kv + 4 * w
    )
    qwen3 = replace(facts, qk_norm=True)
    assert layer_units(qwen3, bf16_row(128)) == layer_units(facts, bf16_row(128)) + 3 * (q + kv)


def test_recommendation_is_the_fastest_set_up_that_fits():
    facts = meta_facts(GPT2Config())
    config = Config()
    small_gpu = Hardware(gpus_per_node=8, gpu_mem_bytes=3 * GIB)
    rows = plan_rows(facts, config, small_gpu, tokens=1024)
    fits = {(r.stage, r.offload): r.fits for r in rows}
    assert not fits[(0, False)] and fits[(3, False)]
    best = recommend(rows)
    assert (best.stage, best.offload) == ((2, False) if fits[(2, False)] else (3, False))
    roomy = plan_rows(facts, config, Hardware(gpus_per_node=8), tokens=1024)
    # ZeRO-1 moves what ZeRO-0 moves; ZeRO-2 reduces after every micro-batch, so it leads only without accumulation
    assert recommend(roomy, grad_accum_steps=4).stage == 1 and recommend(roomy, grad_accum_steps=1).stage == 2
    budget = largest_token_budget(facts, config, small_gpu, best)
    assert budget > 0 and budget % config.data.max_seq_len == 0
    assert recommend(plan_rows(facts, config, Hardware(8, gpu_mem_bytes=0.5 * GIB), 1024)) is None


def test_plan_command_prints_json_rows():
    result = run_lmscale("plan", "configs/gpt2-124m.yaml", "--gpus-per-node", "8", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert [(r["stage"], r["offload"]) for r in rows] == [
        (0, False),
        (1, False),
        (2, False),
        (2, True),
        (3, False),
        (3, True),
    ]
    assert {"model_state_bytes", "activation_bytes", "total_bytes", "fits"} <= set(rows[0])
    assert sum(r["recommended"] for r in rows) == 1


def test_plan_command_sizes_a_lora_run_by_its_adapters():
    full, lora = (
        json.loads(
            run_lmscale("plan", "configs/gpt2-124m.yaml", "--gpus-per-node", "1", "--json", *extra).stdout
        )["rows"]
        for extra in ([], ["finetune.lora.r=8"])
    )
    assert lora[0]["model_state_bytes"] < full[0]["model_state_bytes"] / 7  # 2 bytes per weight, not 16
    assert all(row["deepspeed_estimate_bytes"] is None for row in lora)  # DeepSpeed's assume all train


@pytest.mark.slow
# ZeRO-1 writes ZeRO-2's optimizer shards (DeepSpeed's stage_1_and_2.py): 2 stands for both (CI time).
@pytest.mark.parametrize("stage", [2, 3])
def test_predicted_partitions_match_what_two_ranks_write(tmp_path, cache_dir, stage):
    """Each rank's optimizer shard holds its fp32 weights and Adam moments: 12 psi / N bytes predicted."""
    out = tmp_path / "run"
    result = run_lmscale(
        "launch", "--gpus-per-node", "2", f"zero.stage={stage}", f"output_dir={out}", f"data.cache_dir={cache_dir}",
        "data.max_seq_len=64", "data.vocab_size=1024", "data.max_tokens_per_batch=1024", "train.max_steps=1",
        "schedule.warmup_steps=0", "train.eval_batches=1", "wandb.mode=disabled", "precision=bf16",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    from lmscale.checkpointing.export import run_config
    from lmscale.data.tokenizer import local_tokenizer
    from lmscale.planning.plan import model_facts

    vocab = len(local_tokenizer(str(out / "tokenizer"), "tokenizer"))
    psi = model_facts(run_config(out), vocab_size=vocab).params
    checkpoint = out / "checkpoints" / "step_00000001"
    shards = sorted(checkpoint.glob("*optim_states.pt"))
    assert len(shards) == 2
    predicted_optimizer = 12 * psi / 2
    for shard in shards:
        assert shard.stat().st_size == pytest.approx(predicted_optimizer, rel=0.10)
    if stage < 3:  # the 16-bit weights are whole on every rank: rank 0 writes them once
        assert (checkpoint / "mp_rank_00_model_states.pt").stat().st_size == pytest.approx(2 * psi, rel=0.10)
    else:  # partitioned: no rank's model-state file holds the weights
        assert all(
            f.stat().st_size < 0.1 * 2 * psi for f in checkpoint.glob("zero_pp_rank_*_model_states.pt")
        )


LLAMA3_8B = 8_030_261_248  # the published count: 32 layers x 4096, GQA 32/8 heads, 14336 MLP, vocab 128256


def tiny_llama_facts():
    return meta_facts(
        LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=500, tie_word_embeddings=True)
    )  # fmt: skip


def test_tensor_parallelism_divides_the_blocks_linears_only():
    facts = tiny_llama_facts()
    # per layer: q 64x64, k and v 64x32, o 64x64, gate/up/down 3 x 64x176
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 176
    assert facts.split_params == 2 * per_layer and facts.kv_heads == 2
    whole = facts.params - facts.split_params  # embeddings (tied head) and norms stay whole
    assert facts.params_per_rank(2) == whole + per_layer
    h, q, kv, w = 64, 64, 32, 176
    # a tensor-parallel rank keeps half of what lives inside the split linears; the norms stay whole
    assert layer_units(facts, bf16_row(128, tensor=2)) == 2 * 4 * h + (2 * q + 2 * kv + 4 * w) / 2
    # The chunked loss: Llama's output layer fuses into it (its backward holds an fp32 block of logits the size
    # of the hidden states, the hidden states' fp32 gradient and in 16-bit the block's gradient cast back: 10
    # bytes per hidden element; once per step the output layer's weight gradient); a family that cannot fuse
    # keeps its 16-bit logits and their gradient (DeepSpeed's GPU kernel makes no fp32 copy).
    assert facts.fusable_head
    fused = bf16_row(128, chunked_loss=True)
    assert outside_units(facts, fused) == 4 * h + 10 * h / 2
    assert head_gradient_bytes(facts, fused) == 500 * h * 2
    blockwise = replace(facts, fusable_head=False)
    assert outside_units(blockwise, fused) == 4 * h + 2 * 500
    assert head_gradient_bytes(blockwise, fused) == 0


def test_plan_rows_of_tensor_and_sequence_layouts():
    facts, config = tiny_llama_facts(), Config()
    hardware = Hardware(gpus_per_node=8, gpu_mem_bytes=80 * GIB)
    plain = plan_rows(facts, config, hardware, tokens=4096)
    tensor = plan_rows(facts, config, hardware, tokens=4096, tensor=2)
    sequence = plan_rows(facts, config, hardware, tokens=4096, sequence=4)
    assert [(r.stage, r.offload) for r in tensor] == [(1, False), (2, False)]  # AutoTP: ZeRO 1-2
    assert tensor[0].keys() == "parallel.tensor=2 zero.stage=1"
    # ZeRO-1 over 4 data-parallel ranks of the per-rank share; sequence ranks: ZeRO over all 8
    per_rank = facts.params_per_rank(2)
    assert tensor[0].model_state_bytes == model_state_bytes(per_rank, 1, 4, False, "bf16")[0]
    assert sequence[1].model_state_bytes == plain[1].model_state_bytes
    assert sequence[0].activation_bytes == plain[0].activation_bytes // 4
    assert sequence[3].keys() == "parallel.sequence=4 zero.stage=2 zero.offload=cpu"


def test_plan_recommends_sequence_parallelism_when_a_long_context_does_not_fit():
    result = run_lmscale("plan", "configs/llama-8b-32k.yaml", "--gpus-per-node", "8", "--json", "parallel.sequence=1",
                         "data.max_seq_len=393216", "data.max_tokens_per_batch=393216")  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert not any(r["fits"] for r in rows if r["sequence"] == 1 and r["tensor"] == 1)
    (best,) = [r for r in rows if r["recommended"]]
    assert best["sequence"] > 1 and best["total_bytes"] <= 0.9 * 80 * GIB
    text = run_lmscale("plan", "configs/llama-8b-32k.yaml", "--gpus-per-node", "8")
    assert "recommended: parallel.sequence=4 zero.stage=1 (48.2 GiB per GPU at 32,768 tokens" in text.stdout
    # the headroom is offered as the same 524,288-token step in fewer micro-batches, never as a silently larger step
    assert "524,288 tokens per optimizer step" in text.stdout
    assert "data.max_tokens_per_batch=131072 train.grad_accum_steps=2 (60.6 GiB per GPU)" in text.stdout
    assert "8,030.3M parameters" in text.stdout  # Llama 3 8B's published count: 8,030,261,248


def test_llama_8b_preset_has_the_published_parameter_count():
    from lmscale.model.build import preset_config

    assert meta_facts(preset_config("llama-8b", 128256, 8192, 0, 0)).params == LLAMA3_8B


def test_model_facts_are_counted_once_then_read_from_the_cache(tmp_path, monkeypatch):
    from transformers import AutoConfig

    import lmscale.planning.plan as plan

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # GPT-NeoX: a family lmscale.planning.config_count leaves to the meta device
    neox = AutoConfig.for_model("gpt_neox", hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    neox.save_pretrained(tmp_path / "neox")
    config = Config(model={"path": str(tmp_path / "neox")})
    counted = plan.model_facts(config)
    (cached_file,) = (tmp_path / "cache" / "lmscale" / "model-facts").glob("*.json")

    def no_counting(*_):
        raise AssertionError("counted again")

    monkeypatch.setattr(plan, "count_model_facts", no_counting)
    assert plan.model_facts(config) == counted
    # Anything that changes the model is another entry: LoRA adapters, say.
    with pytest.raises(AssertionError, match="counted again"):
        plan.model_facts(Config(model={"path": str(tmp_path / "neox")}, finetune={"lora": {"r": 4}}))
    monkeypatch.setenv("LMSCALE_CACHE", "off")
    with pytest.raises(AssertionError, match="counted again"):
        plan.model_facts(config)
    monkeypatch.delenv("LMSCALE_CACHE")
    cached_file.write_text("{not json")  # a damaged entry is counted again, not an error
    with pytest.raises(AssertionError, match="counted again"):
        plan.model_facts(config)


def test_layouts_tried_when_nothing_fits_go_sequence_then_tensor_then_both():
    from lmscale.planning.plan import other_layouts

    facts = tiny_llama_facts()  # 4 heads, 2 key-value heads
    hardware = Hardware(gpus_per_node=8, gpu_mem_bytes=80 * GIB)
    layouts = other_layouts(facts, Config(), hardware)
    assert layouts[:4] == [(1, 2), (1, 4), (2, 1), (2, 2)]  # sequence 8 and tensor 4 do not divide the heads
    assert all(t * s <= 8 and (4 // t) % s == 0 for t, s in layouts)
    configured = Config(parallel={"tensor": 2}, zero={"stage": 1})
    assert other_layouts(facts, configured, hardware) == []  # a configured layout stays
    # A mixture-of-experts model splits its rows with every expert on every rank, its attention only with its
    # experts split, and not both at once (lmscale.parallel.layout.moe_group_problems).
    moe = replace(facts, expert_params=facts.params // 2, experts=4, top_k=2)
    assert other_layouts(moe, Config(), hardware) == [(1, 2), (1, 4)]
    assert other_layouts(moe, Config(parallel={"expert": 2}), hardware) == [(2, 1)]


@pytest.mark.parametrize("recipe", ["llama-1b", "llama-8b-32k", "qwen3-30b-a3b"])
def test_recipes_say_what_the_planner_says(recipe, capsys):
    """A recipe's ZeRO stage is the planner's recommendation, and its comment quotes the planner's total."""
    from lmscale.planning.command import plan_command
    from lmscale.runs.preflight import resolve_run_config

    text = (REPO / "configs" / f"{recipe}.yaml").read_text()
    config = resolve_run_config(str(REPO / "configs" / f"{recipe}.yaml"), [], 8, has_gpu=True)[0]
    _, best, advice = plan_command(config, Hardware(8), as_json=True)
    capsys.readouterr()
    assert best.stage == config.zero.stage and (best.tensor, best.sequence) == (1, config.parallel.sequence)
    assert best.expert == config.parallel.expert
    quoted = re.search(r"~(\d+(?:\.\d+)?) GiB per GPU", text)
    assert quoted and abs(float(quoted.group(1)) - advice.total_bytes / GIB) < 0.6, (quoted, advice)
    assert f"{advice.step_tokens:,} tokens" in text.replace("\n# ", " ")


def test_grpo_plans_its_sampling_kv_cache_and_only_the_layouts_it_trains_in():
    from lmscale.planning.command import micro_batch_tokens
    from lmscale.planning.plan import generation_bytes, other_layouts

    facts = ModelFacts(
        params=TINYLLAMA_1B, largest_layer_params=1, layers=22, hidden=2048, heads=32, vocab=32000, kv_heads=4
    )
    grpo = {"rewards": ["lmscale.rewards:exact_answer"], "prompts_per_step": 64, "group_size": 16}
    config = Config(
        data={"format": "prompt", "max_seq_len": 2048},
        finetune={"method": "grpo", "grpo": grpo},
        train={"grad_accum_steps": 16},
    )
    # 64 prompts x 16 over 8 GPUs = 128 completions of up to 2048 tokens; per token K and V of 22 layers x 4
    # key-value heads x 64 dimensions in 16 bits; and one step's fp32 logits per completion
    expected = 128 * 2048 * (2 * 22 * 4 * 64 * 2) + 128 * 32000 * 4
    assert generation_bytes(facts, config, 8) == expected
    hardware = Hardware(gpus_per_node=8, gpu_mem_bytes=80 * GIB)
    assert micro_batch_tokens(config, hardware) == 128 // 16 * 2048
    (row, *_) = plan_rows(facts, config, hardware, micro_batch_tokens(config, hardware))
    assert row.generation_bytes == expected
    assert row.total_bytes == row.model_state_bytes + max(row.activation_bytes, expected) + row.buffer_bytes
    assert other_layouts(facts, config, hardware) == []  # GRPO trains in neither tensor nor sequence layouts


def test_expert_parallelism_divides_the_experts_states_and_adds_the_token_exchange():
    from lmscale.planning.plan import ADAM_WIDTHS, all_to_all_bytes, sharded_state_bytes

    moe = ModelFacts(1000, 0, layers=2, hidden=16, heads=2, vocab=10, expert_params=800, experts=8, top_k=2)
    widths = ADAM_WIDTHS["bf16"]  # 2 + 2 + 12 bytes per parameter
    # ZeRO-1 on 8 ranks, experts split 4 ways: the 200 shared weights' states over 8 ranks (2x200 + 2x200 +
    # 12x200/8), the rank's 200 experts' states over the 2 ranks holding the same experts (400 + 400 + 1200).
    assert sharded_state_bytes(moe, 1000, 1000, 1, (8, 4), False, "bf16", widths) == (1100 + 2000, 0)
    assert sharded_state_bytes(moe, 1000, 1000, 1, (8, 1), False, "bf16", widths) == (2000 + 2000 + 1500, 0)
    # Folded into AutoTP (tensor 2), the expert groups span the tensor groups: the 4 ranks of 16 holding the
    # same experts partition them, not the 8 data-parallel ranks / 4
    folded = sharded_state_bytes(moe, 1000, 1000, 1, (8, 4), False, "bf16", widths, tensor=2)
    assert folded == (1100 + 400 + 400 + 12 * 200 // 4, 0)
    assert (
        all_to_all_bytes(moe, 1024, 4, "bf16") == 2 * 1024 * 2 * 16 * 2
        and all_to_all_bytes(moe, 1024, 1, "bf16") == 0
    )
    assert moe.expert_degrees(ranks=16, gpus_per_node=8) == [2, 4, 8]


def test_tiled_mlp_and_activation_offload_by_hand():
    gpt2 = ModelFacts(params=GPT2_124M, largest_layer_params=0, layers=12, hidden=768, heads=12, vocab=50257)
    h, w = 768, 4 * 768
    # tiled: the MLP keeps nothing; its backward recomputes one slice (hidden-size tokens of 1,024) with its
    # four intermediates and two gradients
    tiled = bf16_row(1024, tiled_mlp=True)
    assert layer_units(gpt2, tiled) == 8 * h
    assert backward_units(gpt2, tiled) == 3 * h + 6 * w * 768 / 1024
    assert backward_units(gpt2, bf16_row(1024, tiled_mlp=True, tiled_tokens=256)) == 3 * h + 6 * w / 4
    # offload: no block's saved input on the GPU during the loss's backward, and during a block's backward only
    # its own (copied back for the recompute), not twelve
    checkpointed, offloaded = (
        bf16_row(1024, checkpointing=True),
        bf16_row(1024, checkpointing=True, offload=True),
    )
    assert loss_backward_bytes(gpt2, checkpointed) - loss_backward_bytes(gpt2, offloaded) == 2 * 12 * h
    assert block_backward_bytes(gpt2, checkpointed) - block_backward_bytes(gpt2, offloaded) == 2 * 11 * h
    for phase in (loss_backward_bytes, block_backward_bytes):
        assert phase(gpt2, bf16_row(1024, offload=True)) == phase(gpt2, bf16_row(1024))


def test_plan_tries_lmscales_memory_options_cheapest_first(capsys):
    """Qwen3-30B-A3B's shape on 8 GPUs: without expert parallelism only ZeRO-3 fits 80 GB, so the planner
    offers the smallest expert split that fits ZeRO 1-2 (8 ways: 4 leaves too little for the activations); on 48 GB nothing fits without CPU offload, and bf16
    optimizer states under ZeRO-3 do (expert splits alone do not)."""
    from lmscale.planning.command import plan_command
    from lmscale.planning.options import memory_options
    from lmscale.runs.preflight import resolve_run_config

    recipe = str(REPO / "configs" / "qwen3-30b-a3b.yaml")
    config = resolve_run_config(recipe, ["parallel.expert=1"], 8, has_gpu=True)[0]
    _, best, advice = plan_command(config, Hardware(8), as_json=True)
    assert advice.keys == "parallel.expert=8 zero.stage=1" and best.expert == 8
    assert round(advice.total_bytes / GIB, 1) == 68.5  # as README.md's table says
    _, best, advice = plan_command(config, Hardware(8, gpu_mem_bytes=48 * GIB), as_json=True)
    assert advice.keys == "optim.state_dtype=bf16 zero.stage=3" and best.options == (
        "optim.state_dtype=bf16",
    )
    capsys.readouterr()
    facts = model_facts(config)
    options = memory_options(facts, config, Hardware(8))
    assert options[:3] == [("parallel.expert=2",), ("parallel.expert=4",), ("parallel.expert=8",)]
    assert ("model.tiled_mlp=true",) not in options and facts.tileable_mlp is False  # experts are not tiled
    assert options[-1] == (
        "parallel.expert=8", "model.activation_checkpointing=true", "model.activation_offload=true",
        "optim.state_dtype=bf16", "optim.name=muon",
    )  # fmt: skip
