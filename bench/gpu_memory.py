"""The planner's activation figures against a real step's device memory, with what a CPU can only stand in
for: dropout masks (a GPU's fused dropout keeps one byte per element, a CPU the input's dtype) and what
activation offload saves on the device (on a CPU the host memory it moves to is the memory it was in).

    python bench/gpu_memory.py [--tokens 4096] [--out gpu_memory.json]

Each case builds a model of a family with 8 blocks at a real width (Llama 1B's, GPT-2 124M's, a Qwen3-MoE
block), takes one step so the gradients exist (as DeepSpeed's do), then measures the next step's peak device
memory above what was allocated before it (`torch.cuda.max_memory_allocated`), side by side with the planner's
figure for the same model, row and options (`lmscale.planning.activations`). On a machine without a GPU it
measures the live tensors at torch's dispatcher instead (`lmscale.planning.live_bytes`, what
tests/planning/test_activation_memory.py checks on tiny models), with offload's host copies left out as a GPU
leaves them (`offload_as_on_a_gpu`), and says that the dropout row means nothing there. The figures go into
bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoModelForCausalLM  # noqa: E402

from lmscale.config import ModelConfig  # noqa: E402
from lmscale.model.build import prepare_for_training, preset_config  # noqa: E402
from lmscale.objectives.fused_head import install_fused_head  # noqa: E402
from lmscale.planning.activations import ActivationSetup, step_activation_bytes  # noqa: E402
from lmscale.planning.live_bytes import step_peak, training_step  # noqa: E402
from lmscale.planning.plan import facts_of  # noqa: E402

VOCAB = 32000  # Llama 2's: the output layer's and embedding's transients at a real size
LAYERS = 8  # activation offload keeps 1 block's checkpoint on the device instead of all 8
LLAMA_1B = {  # TinyLlama's block, untied as TinyLlama is (the blocks' activations decide, not the embedding's)
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
}
GPT2_124M = {"n_embd": 768, "n_head": 12}
QWEN3_MOE = {
    "hidden_size": 1024,
    "moe_intermediate_size": 768,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
}
DROPOUT = {"attn_pdrop": 0.1, "resid_pdrop": 0.1, "embd_pdrop": 0.1}

# What the GPU-only cases change, against the case they differ from: (label, base case, changed case).
DIFFERENCES = [
    ("activation offload saves", "llama, checkpointing", "llama, checkpointing + offload"),
    ("dropout masks cost", "gpt2, no dropout", "gpt2, dropout 0.1 (GPU only)"),
]

# name, preset, shape, model options, loss; every case in bf16 with sdpa attention
CASES = [
    ("llama", "tiny-llama", LLAMA_1B, {}, "fused"),
    ("llama, checkpointing", "tiny-llama", LLAMA_1B, {"activation_checkpointing": True}, "fused"),
    (
        "llama, checkpointing + offload",
        "tiny-llama",
        LLAMA_1B,
        {"activation_checkpointing": True, "activation_offload": True},
        "fused",
    ),
    ("llama, tiled MLP", "tiny-llama", LLAMA_1B, {"tiled_mlp": True}, "fused"),
    ("gpt2, no dropout", "tiny-gpt2", GPT2_124M, {}, "plain"),
    ("gpt2, dropout 0.1 (GPU only)", "tiny-gpt2", {**GPT2_124M, **DROPOUT}, {}, "plain"),
    ("qwen3-moe", "tiny-qwen3-moe", QWEN3_MOE, {}, "fused"),
]


def build(
    preset: str, shape: dict, options: ModelConfig, tokens: int, device: torch.device
) -> torch.nn.Module:
    config = preset_config(preset, VOCAB, tokens, 0, 0)
    for dropout in DROPOUT:  # off unless the case sets it
        if hasattr(config, dropout):
            setattr(config, dropout, 0.0)
    for key, value in {**shape, "num_hidden_layers": LAYERS}.items():
        setattr(config, "n_layer" if key == "num_hidden_layers" and preset == "tiny-gpt2" else key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device, torch.bfloat16)
    prepare_for_training(model, options)
    return model.train()


def measured_peak(model: torch.nn.Module, loss: str, tokens: int, device: torch.device) -> int:
    """The second step's peak bytes above what was allocated before it (the gradients exist by then)."""
    ids = torch.randint(0, VOCAB, (tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    if device.type != "cuda":
        return step_peak(model, ids, fused_loss=loss == "fused")
    step = training_step(model, ids, fused_loss=loss == "fused")
    step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def planned_bytes(model: torch.nn.Module, options: ModelConfig, loss: str, tokens: int) -> float:
    setup = ActivationSetup(
        seq_len=tokens,
        precision="bf16",
        attention="sdpa",
        checkpointing=options.activation_checkpointing,
        chunked_loss=loss == "fused",
        tiled_mlp=options.tiled_mlp,
        offload=options.activation_offload,
    )
    facts = facts_of(model)
    return step_activation_bytes(facts, setup, tokens)


def measure(tokens: int, device: torch.device) -> list[dict]:
    rows = []
    for name, preset, shape, option_values, loss in CASES:
        options = ModelConfig(**option_values, attn_implementation="sdpa")
        model = build(preset, shape, options, tokens, device)
        planned = planned_bytes(model, options, loss, tokens)
        if loss == "fused":
            install_fused_head(model)
        measured = measured_peak(model, loss, tokens, device)
        rows.append({"case": name, "planned_mib": planned / 2**20, "measured_mib": measured / 2**20})
        print(f"{name:44s} planned {planned / 2**20:9.1f} MiB  measured {measured / 2**20:9.1f} MiB  "
              f"planned/measured {planned / measured:5.2f}", flush=True)  # fmt: skip
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokens", type=int, default=None, help="tokens per row (default: 4096 on a GPU, 1024 on CPU)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the rows here as JSON")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens = args.tokens or (4096 if device.type == "cuda" else 1024)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (the dropout row means nothing)"
    print(f"{LAYERS} blocks, {tokens} tokens, bf16, sdpa, on {where}", flush=True)
    rows = measure(tokens, device)
    by_case = {row["case"]: row for row in rows}
    for label, base, changed in DIFFERENCES:
        planned = abs(by_case[base]["planned_mib"] - by_case[changed]["planned_mib"])
        measured = abs(by_case[base]["measured_mib"] - by_case[changed]["measured_mib"])
        print(f"{label}: planned {planned:.1f} MiB, measured {measured:.1f} MiB", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": where, "tokens": tokens, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
