"""The memory planner against hand-worked numbers, and against the partitions DeepSpeed really writes."""

import json

import pytest
import torch
from conftest import run_lmscale
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from lmscale.config import Config
from lmscale.plan import (
    GIB,
    Hardware,
    ModelFacts,
    activation_bytes_per_token,
    buffer_bytes,
    facts_of,
    largest_token_budget,
    model_state_bytes,
    plan_rows,
    recommend,
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


def test_lora_keeps_states_for_the_adapters_only():
    from lmscale.config import LoraConfig
    from lmscale.finetune import apply_lora

    with torch.device("meta"):
        model = apply_lora(AutoModelForCausalLM.from_config(GPT2Config()), LoraConfig(r=8), "causal_lm")
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


def test_activation_bytes_per_token_by_hand():
    gpt2 = ModelFacts(params=GPT2_124M, largest_layer_params=0, layers=12, hidden=768, heads=12, vocab=50257)
    # eager: 12 x (34 x 768 + 5 x 12 x 1024) + 6 x 50257 = 1,050,624 + 301,542
    assert activation_bytes_per_token(gpt2, 1024, False, "eager", "bf16") == 1_352_166
    # fused attention keeps no scores: 12 x 34 x 768 + 301,542
    assert activation_bytes_per_token(gpt2, 1024, False, "sdpa", "bf16") == 614_886
    # checkpointing: each layer's input (2 x 768 x 12) + one layer recomputed + logits
    assert activation_bytes_per_token(gpt2, 1024, True, "eager", "bf16") == 18_432 + 87_552 + 301_542
    assert activation_bytes_per_token(gpt2, 1024, False, "sdpa", "fp32") == 2 * 614_886


def test_recommendation_prefers_no_partitioning_then_no_offload():
    facts = meta_facts(GPT2Config())
    config = Config()
    small_gpu = Hardware(gpus_per_node=8, gpu_mem_bytes=3 * GIB)
    rows = plan_rows(facts, config, small_gpu, tokens=1024)
    fits = {(r.stage, r.offload): r.fits for r in rows}
    assert not fits[(0, False)] and fits[(3, False)]
    best = recommend(rows)
    assert (best.stage, best.offload) == min((s, o) for (s, o), ok in fits.items() if ok and not o)
    budget = largest_token_budget(facts, config, small_gpu, best)
    assert budget > 0 and budget % config.data.max_seq_len == 0
    assert recommend(plan_rows(facts, config, Hardware(8, gpu_mem_bytes=0.5 * GIB), 1024)) is None


def test_plan_command_prints_json_rows():
    result = run_lmscale("plan", "configs/gpt2-124m.yaml", "--gpus-per-node", "8", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
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
        )
        for extra in ([], ["finetune.lora.r=8"])
    )
    assert lora[0]["model_state_bytes"] < full[0]["model_state_bytes"] / 7  # 2 bytes per weight, not 16
    assert all(row["deepspeed_estimate_bytes"] is None for row in lora)  # DeepSpeed's assume all train


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_predicted_partitions_match_what_two_ranks_write(tmp_path, cache_dir, stage):
    """Each rank's optimizer shard holds its fp32 weights and Adam moments: 12 psi / N bytes predicted."""
    out = tmp_path / "run"
    result = run_lmscale(
        "launch", "--gpus-per-node", "2", f"zero.stage={stage}", f"output_dir={out}", f"data.cache_dir={cache_dir}",
        "data.max_seq_len=64", "data.vocab_size=1024", "data.max_tokens_per_batch=1024", "train.max_steps=1",
        "schedule.warmup_steps=0", "train.eval_batches=1", "wandb.mode=disabled", "precision=bf16",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    from lmscale.data.tokenizer import local_tokenizer
    from lmscale.export import run_config
    from lmscale.plan import model_facts

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
