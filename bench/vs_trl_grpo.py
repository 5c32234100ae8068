"""lmscale vs TRL on GRPO, side by side in one run, on the same everything.

The task: count between two numbers ("count from 13 to 18:" -> " 14 15 16 17 18"), rewarded by
`bench/count_reward.py` (the share of the numbers right before the first mistake, less a little for numbers
past the end; written in TRL's reward-function signature, and loaded by both sides from that file). The
starting model is the tiny GPT-2 preset with a BPE trained here, fine-tuned first (lmscale SFT, one process)
on counts of which half have one number wrong, so that sampled answers differ within a group and the reward
has something to teach. Then
lmscale (`finetune.method=grpo`) and TRL's GRPOTrainer (transformers' generate, no vLLM) each train it for the
same steps with the same prompts per step, group size, completion length, sampling (temperature 1, no top-k or
top-p), DAPO loss without a KL term, dropout off, LR schedule and AdamW settings, under DeepSpeed ZeRO-2 bf16 on
the same 2 CPU ranks (one torch thread each). Prints, per side, optimizer steps per second of the training loop,
generation tokens per second (all ranks), the peak resident set of the largest process (a rank), the mean
sampled reward of the last steps and the held-out reward of greedy answers (scored here the same way for both),
and ends with `ratio lmscale/trl_grpo: X` (steps per second). Usage:

    python bench/vs_trl_grpo.py [--steps 40] [--prompts-per-step 16] [--group-size 8] [--max-new-tokens 24]
                                [--seed N] [--continuous-batching]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from vs_hf_trainer import REPO, SEED, run_measured, shared_overrides
from vs_trl import build_base, write_jsonl

REWARD = f"{Path(__file__).resolve().parent / 'count_reward.py'}:count_reward"  # both sides load this file


def copy_prompt(digits: list[int]) -> str:
    return f"copy: {' '.join(map(str, digits))} ="


def write_data(workdir: Path, args) -> dict[str, Path]:
    """SFT records (half the copies with one digit wrong), training prompts and held-out prompts."""
    rng = random.Random(args.seed)

    def digits() -> list[int]:
        return [rng.randrange(10) for _ in range(rng.randint(4, 10))]

    sft = []
    for _ in range(args.sft_records):
        shown = digits()
        copied = list(shown)
        if rng.random() < 0.5:
            copied[rng.randrange(len(copied))] = rng.randrange(10)
        sft.append({"prompt": copy_prompt(shown), "completion": " " + " ".join(map(str, copied))})
    prompts = [
        (d := digits(), {"prompt": copy_prompt(d), "answer": " ".join(map(str, d))})[1]
        for _ in range(args.prompts)
    ]
    held_out = [
        (d := digits(), {"prompt": copy_prompt(d), "answer": " ".join(map(str, d))})[1] for _ in range(200)
    ]
    return {
        "sft": write_jsonl(workdir / "sft.jsonl", sft),
        "prompts": write_jsonl(workdir / "prompts.jsonl", prompts),
        "held_out": write_jsonl(workdir / "held_out.jsonl", held_out),
    }


def lmscale(*arguments: str) -> str:
    output, _ = run_measured([sys.executable, "-m", "lmscale.cli", *arguments])
    return output


def starting_model(args, workdir: Path, files: dict[str, Path]) -> Path:
    """The tiny GPT-2 preset fine-tuned on the noisy copies, exported: where both sides start."""
    texts = [line for line in files["sft"].read_text().splitlines()]
    build_base(workdir / "base", texts, args.max_seq_len)
    lmscale(
        "train", f"model.path={workdir / 'base'}", f"data.path={files['sft']}", "data.format=prompt_completion",
        *shared_overrides(args, workdir), "zero.stage=0", "precision=fp32", f"output_dir={workdir / 'sft'}",
        f"train.max_steps={args.sft_steps}", f"train.eval_every={args.sft_steps}", "optim.lr=2e-3",
    )  # fmt: skip
    lmscale("export", str(workdir / "sft"), "--out", str(workdir / "start"))
    return workdir / "start"


def lmscale_row(args, workdir: Path, files: dict[str, Path], start: Path) -> dict:
    out = workdir / "lmscale"
    overrides = [
        f"model.path={start}", f"data.path={files['prompts']}", f"data.eval_path={files['held_out']}",
        "data.format=prompt", "finetune.method=grpo", f"finetune.grpo.rewards=[{REWARD}]",
        f"finetune.grpo.prompts_per_step={args.prompts_per_step}", f"finetune.grpo.group_size={args.group_size}",
        f"finetune.grpo.max_new_tokens={args.max_new_tokens}", "finetune.grpo.eval_prompts=8",
        *shared_overrides(args, workdir), f"output_dir={out}", f"train.max_steps={args.steps}",
        f"train.eval_every={args.steps}", f"checkpoint.save_every={args.steps}", "train.log_every=1",
    ]  # fmt: skip
    output, peak_mb = run_measured(
        [sys.executable, "-m", "lmscale.cli", "launch", "--gpus-per-node", "2", *overrides]
    )
    seconds = float(re.search(r"after \d+ steps, [\d,]+ tokens in ([\d.]+) s", output).group(1))
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    completions = args.prompts_per_step * args.group_size
    generated = sum(s["completion_length"] * completions for s in steps)
    generation_s = sum(s["generation_s"] for s in steps)
    lmscale("export", str(out), "--out", str(out / "model"))
    return {
        "seconds": seconds,
        "generation_tokens_per_s": generated / generation_s,
        "rewards": [s["reward"] for s in steps],
        "peak_mb": peak_mb,
        "model": out / "model",
    }


def trl_row(args, workdir: Path, files: dict[str, Path], start: Path, continuous: bool) -> dict | None:
    out = workdir / ("trl-cb" if continuous else "trl")
    per_rank = args.prompts_per_step * args.group_size // 2
    command = [
        shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", str(REPO / "bench" / "trl_worker.py"),
        "--mode", "grpo", "--data", str(files["prompts"]), "--base", str(start), "--out", str(out),
        "--batch-size", str(per_rank), "--group-size", str(args.group_size),
        "--max-new-tokens", str(args.max_new_tokens), "--max-steps", str(args.steps), "--lr", str(args.lr),
        "--warmup-steps", str(args.warmup), "--seed", str(args.seed),
        *(["--continuous-batching"] if continuous else []),
    ]  # fmt: skip
    import torch  # each rank its share of the cores, as lmscale gives its ranks (the launcher: all of them)

    try:
        output, peak_mb = run_measured(
            command, env={"OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // 2))}
        )
    except SystemExit as failure:  # a setting TRL offers that does not run here: say so, keep the other rows
        if not continuous:
            raise
        print(f"trl GRPOTrainer with continuous batching failed:\n{str(failure)[-1500:]}", flush=True)
        return None
    figures = json.loads([line for line in output.splitlines() if line.startswith('{"target_tokens"')][-1])
    return {
        "seconds": figures["loop_s"],
        # rank 0's tokens and seconds: both ranks generate as many in the same time
        "generation_tokens_per_s": 2 * figures["generated_tokens"] / figures["generation_s"],
        "rewards": figures["rewards"],
        "peak_mb": peak_mb,
        "model": out / "model",
    }


def show_row(name: str, row: dict) -> None:
    """A row's raw figures as soon as it is done (a later row that fails loses nothing)."""
    shown = {k: v for k, v in row.items() if k != "model"}
    print(f"{name}: {json.dumps(shown)}", flush=True)


def greedy_reward(model_dir: Path, held_out: Path, max_new_tokens: int) -> float:
    """The mean reward of greedy answers to the held-out prompts (the same code for both sides)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmscale.rewards import load_reward_function
    from lmscale.rollouts.generation import Sampling, end_token_ids, sample

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    records = [json.loads(line) for line in held_out.read_text().splitlines()]
    prompt_ids = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in records]
    completions = sample(
        model, torch.device("cpu"), prompt_ids, Sampling(max_new_tokens, greedy=True), 0,
        tokenizer.pad_token_id, end_token_ids(tokenizer, model), synced=False,
    )  # fmt: skip
    texts = tokenizer.batch_decode(completions.ids, skip_special_tokens=True)
    reward = load_reward_function(REWARD)
    rewards = reward([r["prompt"] for r in records], texts, [r["answer"] for r in records])
    return sum(rewards) / len(rewards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--sft-records", type=int, default=4000)
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--max-seq-len", type=int, default=48)
    parser.add_argument("--budget", type=int, default=4096, help="lmscale SFT tokens per micro-batch")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=SEED, help="data and sampling on both sides")
    parser.add_argument(
        "--continuous-batching", action="store_true", help="also run TRL with continuous-batching generation"
    )
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        files = write_data(workdir, args)
        start = starting_model(args, workdir, files)
        rows = {"lmscale GRPO": lmscale_row(args, workdir, files, start)}
        show_row("lmscale GRPO", rows["lmscale GRPO"])
        rows["trl GRPOTrainer"] = trl_row(args, workdir, files, start, continuous=False)
        show_row("trl GRPOTrainer", rows["trl GRPOTrainer"])
        if args.continuous_batching:
            row = trl_row(args, workdir, files, start, continuous=True)
            if row is not None:
                rows["trl GRPOTrainer (continuous batching)"] = row
        start_reward = greedy_reward(start, files["held_out"], args.max_new_tokens)
        for row in rows.values():
            row["held_out"] = greedy_reward(row["model"], files["held_out"], args.max_new_tokens)
        last = max(1, args.steps // 4)
        print(f"\nGRPO, {args.steps} steps of {args.prompts_per_step} prompts x {args.group_size} completions "
              f"(up to {args.max_new_tokens} tokens); held-out greedy reward at the start {start_reward:.3f}")  # fmt: skip
        print(
            f"{'setup':<40}{'steps/s':>9}{'gen tok/s':>11}{'peak MB':>9}{f'reward (last {last})':>19}{'held-out':>10}"
        )
        for name, r in rows.items():
            r["steps_per_s"] = args.steps / r["seconds"]
            late = sum(r["rewards"][-last:]) / len(r["rewards"][-last:])
            print(f"{name:<40}{r['steps_per_s']:>9.3f}{r['generation_tokens_per_s']:>11.0f}{r['peak_mb']:>9.0f}"
                  f"{late:>19.3f}{r['held_out']:>10.3f}")  # fmt: skip
    print(f"(whole benchmark {time.time() - started:.0f} s)")
    fastest = max(r["steps_per_s"] for name, r in rows.items() if name.startswith("trl"))
    print(f"ratio lmscale/trl_grpo: {rows['lmscale GRPO']['steps_per_s'] / fastest:.2f}")


if __name__ == "__main__":
    main()
