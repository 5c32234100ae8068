"""The planner's ZeRO partitions against what DeepSpeed really writes, for ZeRO 1, 2 and 3 on 2 CPU ranks,
and its optimizer-state bytes for AdamW, bf16 optimizer states and Muon.

Each stage trains one step of the tiny GPT-2 on 2 CPU ranks and checkpoints; each rank's optimizer
shard holds that rank's fp32 weights and Adam moments (12Ψ/N bytes predicted), and with ZeRO 1 and 2
the 16-bit weights are whole (2Ψ, written once by rank 0). Then the tiny Llama (whose blocks' linear
layers Muon takes) under ZeRO-1 with AdamW, `optim.state_dtype: bf16` (bf16 master copy and moments: 6Ψ/N)
and `optim.name: muon` (one momentum for the blocks' matrices, Adam's two for the rest), each shard against
the planner's states figure (lmscale.planning.plan.state_widths). Prints predicted, measured and their ratio.
On CPU the states' bytes are what can be measured; GPU memory of the same set-ups: bench/gpu.md.
Usage: python bench/zero_memory.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train_one_step(out: Path, cache: Path, stage: int, *extra: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "lmscale.cli", "launch", "--gpus-per-node", "2", f"zero.stage={stage}", f"output_dir={out}",
         f"data.cache_dir={cache}", "data.max_seq_len=64", "data.vocab_size=1024", "data.max_tokens_per_batch=1024",
         "train.max_steps=1", "schedule.warmup_steps=0", "train.eval_batches=1", "wandb.mode=disabled", "precision=bf16",
         *extra],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip


def largest_shard(checkpoint: Path) -> int:
    return max(f.stat().st_size for f in checkpoint.glob("*optim_states.pt"))


# The optimizer set-ups whose states the planner counts differently (tiny Llama, ZeRO-1, bf16 training).
STATE_SETUPS = {
    "adamw (fp32 master + 2 moments)": [],
    "adamw, optim.state_dtype=bf16": ["optim.state_dtype=bf16"],
    "muon (fp32 master, 1-2 moments)": ["optim.name=muon"],
}


def optimizer_state_rows(tmp: Path) -> None:
    from lmscale.checkpointing.export import run_config
    from lmscale.data.tokenizer import local_tokenizer
    from lmscale.planning.plan import model_facts, muon_fraction, state_widths

    print(f"\n{'optimizer (tiny Llama, ZeRO-1, 2 ranks)':<40}{'predicted':>12}{'measured':>12}{'ratio':>8}")
    for label, extra in STATE_SETUPS.items():
        out = tmp / label.split(" ")[0].replace(",", "") / str(len(extra) and extra[0])
        train_one_step(out, tmp / "cache", 1, "model.preset=tiny-llama", *extra)
        config = run_config(out)
        facts = model_facts(config, vocab_size=len(local_tokenizer(str(out / "tokenizer"), "tokenizer")))
        optim = config.optim
        widths = state_widths(config.precision, optim.name, optim.state_dtype, muon_fraction(facts), stage=1)
        predicted = widths.states * facts.params / 2
        measured = largest_shard(out / "checkpoints" / "step_00000001")
        print(f"{label:<40}{predicted / 1e6:>10.2f}MB{measured / 1e6:>10.2f}MB{measured / predicted:>8.3f}")


def main() -> None:
    from lmscale.checkpointing.export import run_config
    from lmscale.data.tokenizer import local_tokenizer
    from lmscale.planning.plan import model_facts

    print(f"{'ZeRO':>4}  {'what (per rank)':<34}{'predicted':>12}{'measured':>12}{'ratio':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for stage in (1, 2, 3):
            out = Path(tmp) / f"zero{stage}"
            train_one_step(out, Path(tmp) / "cache", stage)
            vocab = len(local_tokenizer(str(out / "tokenizer"), "tokenizer"))
            psi = model_facts(run_config(out), vocab_size=vocab).params
            checkpoint = out / "checkpoints" / "step_00000001"
            rows = [
                (
                    "optimizer shard (12 psi / N)",
                    12 * psi / 2,
                    largest_shard(checkpoint),
                )
            ]
            if stage < 3:
                rows.append(
                    (
                        "16-bit weights, whole (2 psi)",
                        2 * psi,
                        (checkpoint / "mp_rank_00_model_states.pt").stat().st_size,
                    )
                )
            for what, predicted, measured in rows:
                print(
                    f"{stage:>4}  {what:<34}{predicted / 1e6:>10.2f}MB{measured / 1e6:>10.2f}MB{measured / predicted:>8.3f}"
                )
        optimizer_state_rows(Path(tmp))


if __name__ == "__main__":
    main()
