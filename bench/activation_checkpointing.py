"""Peak memory and step time of one forward/backward with and without activation checkpointing, on CPU.

Each setting runs in its own fresh process (peak RSS is per process); the model and batch are the same.
Prints the figures side by side and their ratios. Usage: python bench/activation_checkpointing.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

LAYERS, HIDDEN, HEADS, SEQ, BATCH, VOCAB = 6, 512, 8, 512, 4, 8192


def one_step(checkpointing: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    model(ids[:1, :8], labels=ids[:1, :8]).loss.backward()  # warm up allocator and kernels
    model.zero_grad(set_to_none=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"activation_peak_mb": (peak - before) / 1024, "step_s": elapsed}


def main() -> None:
    if len(sys.argv) == 2:  # the child: one setting
        print(json.dumps(one_step(sys.argv[1] == "on")))
        return
    results = {}
    for setting in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, setting], capture_output=True, text=True, check=True)
        results[setting] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"GPT-2 shape {LAYERS}x{HIDDEN}, batch {BATCH}x{SEQ} tokens, fp32 on CPU, one forward+backward")
    for setting, figures in results.items():
        print(
            f"  checkpointing {setting:>3}: peak memory above the model {figures['activation_peak_mb']:8.0f} MB, "
            f"step {figures['step_s']:6.2f} s"
        )
    off, on = results["off"], results["on"]
    print(f"memory ratio on/off: {on['activation_peak_mb'] / off['activation_peak_mb']:.2f}")
    print(f"time ratio on/off: {on['step_s'] / off['step_s']:.2f}")


if __name__ == "__main__":
    main()
