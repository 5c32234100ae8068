"""One rank of the HF Trainer side of bench/vs_hf_trainer.py (started by the `deepspeed` launcher).

HF Trainer with its DeepSpeed integration (ZeRO-2, bf16, CPU), on the sequences lmscale tokenized:
padded to the longest row of each batch, or with --padding-free flattened into one row per batch with
per-document position ids (transformers' DataCollatorWithFlattening; attention stays within each
document), optionally with --torch-compile; prints one JSON line of figures on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

# The HF-side benchmarks' DeepSpeed config, as lmscale's runs are set: ZeRO-2, bf16 (batch settings: HF's).
DEEPSPEED_ZERO2 = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": True},
    "zero_optimization": {"stage": 2},
    "steps_per_print": 10**9,
}


def shared_training_args(args) -> dict:
    """What the HF-side benchmarks (this one, bench/trl_worker.py) set as lmscale's runs do: one epoch, LR with
    warm-up and cosine decay, AdamW with lmscale's beta2 and weight decay, clipping at 1, ZeRO-2 bf16 on CPU."""
    return dict(
        output_dir=args.out,
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=1,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=0.1,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        bf16=True,
        use_cpu=True,
        deepspeed=DEEPSPEED_ZERO2,
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=1,
        seed=args.seed,
        disable_tqdm=True,
    )


def pad_to_longest(pad_id: int):
    """Rows padded to the batch's longest; padding is neither attended to nor a target."""

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
            mask[i, : len(row["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    return collate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--sequences", required=True, help="save_to_disk of lmscale's tokenized train split")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--model-config", required=True, help="directory with the model's config.json")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, required=True, help="rows per device per step")
    parser.add_argument("--group-by-length", action="store_true")
    parser.add_argument("--padding-free", action="store_true", help="DataCollatorWithFlattening: no padding")
    parser.add_argument("--torch-compile", action="store_true", help="TrainingArguments(torch_compile=True)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.tokenizer)
    sequences = load_from_disk(args.sequences).select_columns(["input_ids", "length"])
    torch.manual_seed(args.seed)
    from transformers import AutoConfig

    model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(args.model_config), dtype=torch.float32
    )
    model.config.use_cache = False
    training = TrainingArguments(
        **shared_training_args(args),
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        length_column_name="length",
        torch_compile=args.torch_compile,
    )
    if args.padding_free:
        from transformers import DataCollatorWithFlattening

        collator = DataCollatorWithFlattening(return_position_ids=True)
    else:
        collator = pad_to_longest(tokenizer.pad_token_id)
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=sequences,
        data_collator=collator,
    )
    result = trainer.train()
    trainer.save_model(os.path.join(args.out, "model"))
    if int(os.environ.get("RANK", "0")) == 0:
        tokenizer.save_pretrained(os.path.join(args.out, "model"))
        real_tokens = int(sum(sequences["length"]))
        runtime = result.metrics["train_runtime"]
        print(
            json.dumps({"real_tokens": real_tokens, "train_runtime_s": runtime, "steps": result.global_step})
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
