"""Memory of one long-sequence training step: sequence parallelism (Ulysses) and the chunked loss.

A tiny Llama (4 layers, hidden 256, a 32k vocabulary so the logits weigh what they do in real models)
takes one optimizer step on one row of `--tokens` tokens, under DeepSpeed ZeRO-1 (fp32, or bf16) on CPU ranks
with gloo, with sequence 1 or 2 ranks and three losses: plain (whole logits, an fp32 copy), blockwise
(whole logits, no fp32 copy: `train.chunked_loss` on families whose logits cannot be fused) and fused (the
output layer inside the loss, no whole logits: `train.chunked_loss` on Llama and the other fusable
families, lmscale.objectives.fused_head). Each set-up runs in fresh processes; each rank first takes a short step (so
Adam's states and the gradients exist), then the long one, and reports the growth of its peak resident
set over its resident set before that step: the step's activations, logits and loss temporaries. Prints
each figure and the ratios of the issue's targets: sequence 2 / sequence 1 (target <= 0.6) and the
chunked loss's saving against the size of the fp32 logits (target >= 1).

`--memory-options` measures lmscale's activation options instead, one rank, the fused loss (as Llama trains):
no option, `model.tiled_mlp` (each block's MLP a slice of the row at a time, recomputed in backward),
`model.activation_checkpointing`, and that with `model.activation_offload`. Beside each resident-set growth,
the peak of the live tensors of the same step without the engine (`lmscale.planning.live_bytes`: what a GPU's
allocator would hold, with offload's host copies left out as a GPU leaves them), the planner's activation
figure for the same row (lmscale.planning.activations) and the planner's ratio to the live tensors. On a CPU
the host memory offload moves to is the memory it was in, so its resident set cannot shrink.
Usage: python bench/long_context.py [--tokens 4096] [--precision fp32|bf16] [--memory-options]
"""

from __future__ import annotations

import argparse
import os
import resource

import torch
import torch.multiprocessing as mp

VOCAB = 32000


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# lmscale's activation options by name (model.* keys), for --memory-options
MEMORY_OPTIONS = {
    "none": {},
    "tiled MLP": {"tiled_mlp": True},
    "checkpointing": {"activation_checkpointing": True},
    "checkpointing + offload": {"activation_checkpointing": True, "activation_offload": True},
}


def tiny_llama(tokens: int, options: str) -> torch.nn.Module:
    """The bench's model: 4 Llama blocks of width 256 and a 32k tied vocabulary, with lmscale's options."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmscale.config import ModelConfig
    from lmscale.model.build import prepare_for_training

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=tokens, tie_word_embeddings=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    prepare_for_training(model, ModelConfig(fused_kernels=False, **MEMORY_OPTIONS[options]))
    return model


def live_tensor_peak(tokens: int, precision: str, options: str) -> int:
    """The peak bytes of the live tensors of a fused-loss step of the bench's model, after a first step made
    the gradients (no engine: its ZeRO buckets are the planner's buffers, not activations)."""
    from lmscale.objectives.fused_head import install_fused_head
    from lmscale.planning.live_bytes import step_peak

    model = tiny_llama(tokens, options).train()
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    install_fused_head(model)
    ids = torch.randint(0, VOCAB, (tokens,), generator=torch.Generator().manual_seed(tokens)).tolist()
    return step_peak(model, ids, fused_loss=True)


def step_growth(
    rank: int,
    world_size: int,
    port: int,
    tokens: int,
    loss: str,
    precision: str,
    results,
    options: str = "none",
) -> None:
    """One rank: a short step, then the long one; records the long step's peak growth in bytes."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu",
    )  # fmt: skip
    import deepspeed

    from lmscale.data.batches import collate, sequence_slice
    from lmscale.objectives.fused_head import install_fused_head, loss_targets
    from lmscale.objectives.loss import aligned_token_loss
    from lmscale.parallel.engine import shutdown_distributed
    from lmscale.parallel.layout import Layout
    from lmscale.parallel.ulysses import register_ulysses

    deepspeed.init_distributed(dist_backend="gloo")
    model = tiny_llama(tokens, options)
    mpu = register_ulysses(model, Layout(world_size, sequence=world_size)) if world_size > 1 else None
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": 1,
        "zero_optimization": {"stage": 1},
        "sequence_parallel_size": world_size,
        "bf16": {"enabled": precision == "bf16"},
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=mpu)
    if loss == "fused":
        install_fused_head(engine.module)

    def step(length: int) -> None:
        ids = torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        batch = sequence_slice(collate([ids], pad_id=0), 0, rank, world_size)
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        if loss == "fused":
            with loss_targets(engine.module, batch["labels"]):
                summed = engine(**inputs).logits  # the fused output layer returns the summed loss
        else:
            summed = aligned_token_loss(engine(**inputs).logits, batch["labels"], chunked=loss == "blockwise")
        engine.backward(summed)
        engine.step()

    step(128)
    before = rss_bytes()
    step(tokens)
    results[rank] = max(0, peak_rss_bytes() - before)
    shutdown_distributed()


def measure(world_size: int, tokens: int, loss: str, precision: str, options: str = "none") -> int:
    """The largest long-step growth over the ranks of one fresh job."""
    from lmscale.parallel.engine import free_port

    results = mp.Manager().dict()
    args = (world_size, free_port(), tokens, loss, precision, results, options)
    mp.spawn(step_growth, args=args, nprocs=world_size, join=True)
    return max(results.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens in the long row")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--memory-options", action="store_true", help="measure lmscale's activation options")
    args = parser.parse_args()
    tokens, precision = args.tokens, args.precision
    if args.memory_options:
        memory_options_table(tokens, precision)
        return
    logits_bytes = tokens * VOCAB * 4
    figures = {}
    print(
        f"one {precision} step on {tokens:,} tokens, 32k vocabulary "
        f"(fp32 logits of the whole row: {logits_bytes / 2**20:,.0f} MiB)"
    )
    print(f"{'sequence ranks':>14}  {'loss':<10}{'peak growth per rank':>22}")
    for world_size, loss in [(1, "plain"), (1, "blockwise"), (1, "fused"), (2, "plain"), (2, "fused")]:
        figures[world_size, loss] = measure(world_size, tokens, loss, precision)
        print(f"{world_size:>14}  {loss:<10}{figures[world_size, loss] / 2**20:>20,.0f} MiB")
    plain_ratio = figures[2, "plain"] / figures[1, "plain"]
    print(f"ratio sequence2/sequence1 (plain loss): {plain_ratio:.2f}  (target <= 0.6)")
    print(f"ratio sequence2/sequence1 (fused loss): {figures[2, 'fused'] / figures[1, 'fused']:.2f}")
    for loss in ("blockwise", "fused"):
        saved = figures[1, "plain"] - figures[1, loss]
        print(f"{loss} loss saves {saved / 2**20:,.0f} MiB = {saved / logits_bytes:.2f}x the fp32 logits")
    saved = figures[1, "plain"] - figures[1, "fused"]
    print(
        f"ratio chunked-loss saving/fp32 logits: {saved / logits_bytes:.2f}  (target >= 1; fused, as Llama trains)"
    )


def planner_figure(tokens: int, precision: str, options: dict) -> float:
    """The planner's activation bytes for one row of `tokens` with these model options (fused loss, sdpa),
    with the output layer's weight gradient the fused loss makes once per step."""
    from lmscale.config import Config
    from lmscale.planning.activations import step_activation_bytes
    from lmscale.planning.plan import activation_setup, model_facts

    config = Config(
        model={"preset": "tiny-llama", **options},
        data={"max_seq_len": tokens},
        train={"chunked_loss": True},
        precision=precision,
    )
    facts = model_facts(config, vocab_size=VOCAB)
    setup = activation_setup(config)
    return step_activation_bytes(facts, setup, tokens)


def memory_options_table(tokens: int, precision: str) -> None:
    print(f"one {precision} step on {tokens:,} tokens, one rank, fused loss: lmscale's activation options")
    print(f"{'model options':<26}{'resident':>12}{'live':>12}{'planner':>12}{'planner/live':>14}")
    live = {}
    for name, options in MEMORY_OPTIONS.items():
        resident = measure(1, tokens, "fused", precision, name)
        live[name] = live_tensor_peak(tokens, precision, name)
        planned = planner_figure(tokens, precision, options)
        figures = "".join(f"{value / 2**20:>8,.0f} MiB" for value in (resident, live[name], planned))
        print(f"{name:<26}{figures}{planned / live[name]:>14.2f}")
    print(f"ratio tiled/none (live): {live['tiled MLP'] / live['none']:.2f}")
    print(
        f"ratio offload/checkpointing (live): {live['checkpointing + offload'] / live['checkpointing']:.2f}"
    )


if __name__ == "__main__":
    main()
