"""One rank of the TRL side of bench/vs_trl.py and bench/vs_trl_grpo.py (started by the `deepspeed` launcher).

TRL's SFTTrainer (assistant-only loss; with --packing its padding-free best-fit packing) or DPOTrainer (with
precomputed reference log-probabilities) under its DeepSpeed integration (ZeRO-2, bf16, CPU), one epoch on the
bench's chat or preference records; or GRPOTrainer (no vLLM: transformers' generate) for --max-steps steps on
the bench's prompts with its reward function (bench/count_reward.py); prints one JSON line of figures on rank 0 and
saves the trained model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from datasets import load_dataset
from hf_trainer_worker import shared_training_args  # this directory: the launcher runs the script from it
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback


def common_args(args) -> dict:
    """HF Trainer's settings as bench/vs_hf_trainer.py's worker sets them, with TRL's sequence length."""
    return shared_training_args(args) | {"max_length": args.max_length}


def sft_trainer(args, model, tokenizer, records):
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(**common_args(args), assistant_only_loss=True, packing=args.packing)
    return SFTTrainer(model=model, args=config, train_dataset=records, processing_class=tokenizer)


def dpo_trainer(args, model, tokenizer, records):
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(**common_args(args), beta=0.1, precompute_ref_log_probs=True)
    return DPOTrainer(model=model, args=config, train_dataset=records, processing_class=tokenizer)


def grpo_trainer(args, model, tokenizer, records):
    """GRPO as bench/vs_trl_grpo.py sets lmscale's: one generation per optimizer step of `--batch-size`
    completions per rank (`--group-size` per prompt), the DAPO loss, no KL term, dropout off."""
    from count_reward import count_reward  # this directory: the same file lmscale's side loads
    from trl import GRPOConfig, GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer that adds up its generation's seconds and tokens (TRL reports them only to W&B)."""

        generation_s, generated_tokens = 0.0, 0

        def _generate_single_turn(self, *inputs, **options):
            started = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(*inputs, **options)
            TimedGRPOTrainer.generation_s += time.perf_counter() - started
            TimedGRPOTrainer.generated_tokens += sum(len(c) for c in completion_ids)
            return completion_ids, logprobs

    settings = shared_training_args(args) | {"max_steps": args.max_steps, "logging_steps": 1}
    config = GRPOConfig(
        **settings,
        num_generations=args.group_size,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        disable_dropout=True,
        use_transformers_continuous_batching=args.continuous_batching,
    )
    return TimedGRPOTrainer(
        model=model,
        reward_funcs=[count_reward],
        args=config,
        train_dataset=records,
        processing_class=tokenizer,
    )


class LoopClock(TrainerCallback):
    """The training loop's seconds, from after the DeepSpeed engine is built (HF's train_runtime counts that
    too) to the last step: what lmscale's closing line times."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.started


def target_tokens(trainer, mode: str) -> int:
    """The loss targets of one epoch: assistant tokens (SFT), the two replies' tokens (DPO)."""
    dataset = trainer.train_dataset
    if mode == "dpo":
        return int(
            sum(len(c) + len(r) for c, r in zip(dataset["chosen_ids"], dataset["rejected_ids"], strict=True))
        )
    return int(sum(sum(label != -100 for label in labels) for labels in dataset["labels"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--mode", choices=["sft", "dpo", "grpo"], required=True)
    parser.add_argument("--data", required=True, help="jsonl of chat (messages) or preference records")
    parser.add_argument("--base", required=True, help="the starting model and tokenizer directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, required=True, help="rows (SFT) or pairs (DPO) per device")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=8, help="GRPO: completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="GRPO: longest completion")
    parser.add_argument("--max-steps", type=int, default=-1, help="GRPO: optimizer steps")
    parser.add_argument(
        "--continuous-batching",
        action="store_true",
        help="GRPO: transformers' continuous-batching generation",
    )
    parser.add_argument("--packing", action="store_true", help="SFT: TRL's padding-free best-fit packing")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    records = load_dataset("json", data_files=args.data, split="train")
    build = {"sft": sft_trainer, "dpo": dpo_trainer, "grpo": grpo_trainer}[args.mode]
    trainer = build(args, model, tokenizer, records)
    targets = target_tokens(trainer, args.mode) if args.mode != "grpo" else 0
    clock = LoopClock()
    trainer.add_callback(clock)
    result = trainer.train()
    trainer.save_model(os.path.join(args.out, "model"))
    if int(os.environ.get("RANK", "0")) == 0:
        tokenizer.save_pretrained(os.path.join(args.out, "model"))
        figures = {
            "target_tokens": targets,
            "loop_s": clock.seconds,
            "train_runtime_s": result.metrics["train_runtime"],
        }
        if args.mode == "grpo":
            figures |= {
                "generation_s": type(trainer).generation_s,
                "generated_tokens": type(trainer).generated_tokens,
                "rewards": [entry["reward"] for entry in trainer.state.log_history if "reward" in entry],
            }
        print(json.dumps(figures | {"steps": result.global_step}))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
