"""lmscale vs TRL on post-training, side by side in one run, on the same everything.

Same starting model (the tiny GPT-2 preset) and tokenizer (a BPE trained here, with a ChatML-style chat
template whose `{% generation %}` markers both sides read for the assistant mask), the same multi-turn chat
records and preference pairs built from paragraphs of the standard library, one epoch each, the same
DeepSpeed ZeRO-2 bf16 set-up on the same 2 CPU ranks (one torch thread each), the same LR, warm-up and cosine
decay. Chat SFT: lmscale (every assistant turn a target, length buckets under a token budget) against TRL's
SFTTrainer with `assistant_only_loss=True`, with `packing=True` (its padding-free best-fit packing) and
without packing, at the batch size that carries the same real tokens per step. DPO: lmscale against
DPOTrainer with `precompute_ref_log_probs=True` (both score the reference before training, outside the
timed loop), at the same pairs per step. Prints, per row, the loss targets (assistant tokens; for DPO both
replies' tokens) per second of training, the held-out loss of the trained model (scored here the same way for
both: assistant-token cross-entropy on the held-out chats; the DPO loss against the starting model on the
held-out pairs) and the peak resident set of the largest process (a rank); ends with the ratios against
TRL's fastest row. Usage:

    python bench/vs_trl.py [--chats 1200] [--pairs 600] [--max-seq-len 512] [--budget 2048] [--seed N]
                            [--only sft|dpo]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from vs_hf_trainer import REPO, SEED, run_measured, shared_overrides, timed_run_overrides

# ChatML-like, with the assistant's reply and its end-of-turn inside the generation markers: the tokens both
# lmscale (return_assistant_tokens_mask) and TRL (assistant_only_loss) train on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ message['content'] }}<|im_end|>\n{% endgeneration %}"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def paragraphs(files: list[str], limit: int, longest: int = 700) -> list[str]:
    found = []
    for name in files:
        for block in Path(name).read_text(encoding="utf-8", errors="replace").split("\n\n"):
            if 40 <= len(block.strip()) <= longest:
                found.append(block.strip())
            if len(found) == limit:
                return found
    return found


def chats(texts: list[str]) -> list[dict]:
    """Two-turn conversations of consecutive paragraphs: user, assistant, user, assistant."""
    roles = ("user", "assistant") * 2
    return [
        {"messages": [{"role": r, "content": t} for r, t in zip(roles, texts[i : i + 4], strict=True)]}
        for i in range(0, len(texts) - 3, 4)
    ]


def pairs(texts: list[str]) -> list[dict]:
    """A paragraph as prompt, the next as the chosen reply, its words backwards as the rejected one."""
    return [
        {"prompt": texts[i], "chosen": texts[i + 1], "rejected": " ".join(reversed(texts[i + 1].split()))}
        for i in range(0, len(texts) - 1, 2)
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_data(workdir: Path, args) -> dict[str, Path]:
    from lmscale.data.sources import embedded_corpus_files

    train_files, held_out_files = embedded_corpus_files()
    train, held_out = paragraphs(train_files, 4 * args.chats), paragraphs(held_out_files, 4 * args.chats // 8)
    return {
        "chat": write_jsonl(workdir / "chat.jsonl", chats(train)),
        "chat_eval": write_jsonl(workdir / "chat_eval.jsonl", chats(held_out)),
        "pairs": write_jsonl(workdir / "pairs.jsonl", pairs(train[: 2 * args.pairs])),
        "pairs_eval": write_jsonl(workdir / "pairs_eval.jsonl", pairs(held_out[: 2 * args.pairs // 8])),
    }


def build_base(directory: Path, texts: list[str], max_seq_len: int) -> None:
    """The starting model both sides train: the tiny GPT-2 preset and a BPE tokenizer with the chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    from lmscale.model.build import preset_config

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=2048, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>", bos_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(SEED)
    config = preset_config(
        "tiny-gpt2", len(tokenizer), max_seq_len, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    GPT2LMHeadModel(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def lmscale_overrides(args, workdir: Path, data: Path, held_out: Path, data_format: str) -> list[str]:
    return [
        f"model.path={workdir / 'base'}",
        f"data.path={data}",
        f"data.eval_path={held_out}",
        f"data.format={data_format}",
        f"finetune.method={'dpo' if data_format == 'preference' else 'sft'}",
        *shared_overrides(args, workdir),
    ]


def prepared(args, workdir: Path, data: Path, held_out: Path, data_format: str):
    """lmscale's tokenized (train, held-out) records and its steps in one epoch on 2 ranks."""
    from lmscale.config import load_config
    from lmscale.data.bucketing import plan_epoch
    from lmscale.data.pipeline import prepare_data

    config, _ = load_config(None, lmscale_overrides(args, workdir, data, held_out, data_format))
    result = prepare_data(config.data, str(workdir / "base"))
    lengths, targets = np.asarray(result.train["length"]), np.asarray(result.train["targets"])
    steps = len(plan_epoch(lengths, 2, args.seed, 0, max_tokens=args.budget, targets=targets))
    return result, steps


def lmscale_row(
    args, workdir: Path, name: str, data: Path, held_out: Path, data_format: str, steps: int
) -> dict:
    out = workdir / name
    overrides = [
        *lmscale_overrides(args, workdir, data, held_out, data_format),
        *timed_run_overrides(out, steps),
    ]
    output, peak_mb = run_measured(
        [sys.executable, "-m", "lmscale.cli", "launch", "--gpus-per-node", "2", *overrides]
    )
    seconds = float(re.search(r"after \d+ steps, [\d,]+ tokens in ([\d.]+) s", output).group(1))
    run_measured([sys.executable, "-m", "lmscale.cli", "export", str(out), "--out", str(out / "model")])
    return {"seconds": seconds, "peak_mb": peak_mb, "model": out / "model"}


def trl_row(args, workdir: Path, name: str, mode: str, data: Path, batch_size: int, *flags: str) -> dict:
    out = workdir / name
    command = [
        shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", str(REPO / "bench" / "trl_worker.py"),
        "--mode", mode, "--data", str(data), "--base", str(workdir / "base"), "--out", str(out),
        "--batch-size", str(batch_size), "--max-length", str(args.max_seq_len), "--lr", str(args.lr),
        "--warmup-steps", str(args.warmup), "--seed", str(args.seed), *flags,
    ]  # fmt: skip
    import torch  # each rank its share of the cores, as lmscale gives its ranks (the launcher: all of them)

    output, peak_mb = run_measured(
        command, env={"OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // 2))}
    )
    figures = json.loads([line for line in output.splitlines() if line.startswith('{"target_tokens"')][-1])
    return {
        "seconds": figures["loop_s"],
        "targets": figures["target_tokens"],
        "peak_mb": peak_mb,
        "model": out / "model",
    }


def held_out_chat_loss(model_dir: Path, sequences, pad_id: int) -> float:
    """Mean cross-entropy of the held-out chats' assistant tokens (lmscale's tokenization and spans)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmscale.data.batches import collate, target_count
    from lmscale.objectives.loss import summed_loss

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(sequences), 8):
            rows = sequences[start : start + 8]
            batch = collate(rows["input_ids"], pad_id, target_spans=rows["target_spans"])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += float(summed_loss(logits, batch["labels"]))
            count += target_count(batch["labels"])
    return total / count


def held_out_dpo_loss(model_dir: Path, base_dir: Path, pairs_data, pad_id: int) -> float:
    """The DPO loss (lmscale's default: sigmoid, beta 0.1) of the held-out pairs, against the starting model
    as reference."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmscale.config import DpoConfig
    from lmscale.data.batches import collate_pairs
    from lmscale.objectives.dpo import pair_scores, sequence_logps

    models = [
        AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
        for d in (model_dir, base_dir)
    ]
    losses = []
    with torch.no_grad():
        for start in range(0, len(pairs_data), 8):
            batch = collate_pairs(pairs_data[start : start + 8], pad_id)
            (policy, targets), (reference, _) = (
                sequence_logps(m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               batch["labels"])
                for m in models
            )  # fmt: skip
            losses.append(pair_scores(policy, reference, targets, DpoConfig(beta=0.1)).losses)
    return float(torch.cat(losses).mean())


def report(title: str, rows: dict[str, dict]) -> dict[str, float]:
    print(f"\n{title}")
    print(f"{'setup':<32}{'targets':>10}{'seconds':>9}{'targets/s':>11}{'held-out loss':>15}{'peak MB':>9}")
    for name, r in rows.items():
        r["per_s"] = r["targets"] / r["seconds"]
        print(
            f"{name:<32}{r['targets']:>10,}{r['seconds']:>9.1f}{r['per_s']:>11.0f}{r['held_out']:>15.4f}"
            f"{r['peak_mb']:>9.0f}"
        )
    return {name: r["per_s"] for name, r in rows.items()}


def sft_rows(args, workdir: Path, files: dict[str, Path]) -> dict[str, dict]:
    data, steps = prepared(args, workdir, files["chat"], files["chat_eval"], "chat")
    lengths = np.asarray(data.train["length"])
    targets = int(np.sum(data.train["targets"]))
    padded_rows = max(1, round(lengths.sum() / (2 * steps) / lengths.mean()))  # same real tokens per step
    packed_rows = max(1, round(lengths.sum() / (2 * steps) / args.max_seq_len))  # packed rows are ~full
    print(f"chat SFT: {len(lengths)} conversations, {int(lengths.sum()):,} tokens, {targets:,} assistant targets; "
          f"lmscale {steps} steps of {args.budget} tokens per rank; TRL {padded_rows} rows or {packed_rows} "
          "packed rows per rank", flush=True)  # fmt: skip
    rows = {"lmscale (every turn, bucket)": lmscale_row(args, workdir, "sft", files["chat"], files["chat_eval"],
                                                        "chat", steps) | {"targets": targets}}  # fmt: skip
    rows["trl SFTTrainer (packing)"] = trl_row(
        args, workdir, "trl-sft-packed", "sft", files["chat"], packed_rows, "--packing"
    )
    rows["trl SFTTrainer (no packing)"] = trl_row(args, workdir, "trl-sft", "sft", files["chat"], padded_rows)
    pad_id = data.tokenizer.pad_token_id
    for row in rows.values():
        row["held_out"] = held_out_chat_loss(row["model"], data.eval, pad_id)
    return rows


def dpo_rows(args, workdir: Path, files: dict[str, Path]) -> dict[str, dict]:
    data, steps = prepared(args, workdir, files["pairs"], files["pairs_eval"], "preference")
    count = len(data.train)
    targets = int(sum(len(c) + len(r) - 2 * p for c, r, p in
                      zip(data.train["input_ids"], data.train["rejected_ids"], data.train["prompt_len"], strict=True)))  # fmt: skip
    per_rank = max(1, round(count / (2 * steps)))
    print(
        f"DPO: {count} pairs, {targets:,} reply tokens; lmscale {steps} steps, TRL {per_rank} pairs per rank",
        flush=True,
    )
    rows = {"lmscale DPO (bucket)": lmscale_row(args, workdir, "dpo", files["pairs"], files["pairs_eval"],
                                                "preference", steps) | {"targets": targets}}  # fmt: skip
    rows["trl DPOTrainer (precomputed ref)"] = trl_row(
        args, workdir, "trl-dpo", "dpo", files["pairs"], per_rank
    )
    for row in rows.values():
        row["held_out"] = held_out_dpo_loss(
            row["model"], workdir / "base", data.eval, data.tokenizer.pad_token_id
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=1200)
    parser.add_argument("--pairs", type=int, default=600)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--budget", type=int, default=2048, help="lmscale tokens per micro-batch per rank")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--seed", type=int, default=SEED, help="data order on both sides (the model's is fixed)"
    )
    parser.add_argument("--only", choices=["sft", "dpo"], help="run one comparison")
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        files = write_data(workdir, args)
        texts = [
            m["content"]
            for line in files["chat"].read_text().splitlines()
            for m in json.loads(line)["messages"]
        ]
        build_base(workdir / "base", texts, args.max_seq_len)
        speeds = {}
        if args.only in (None, "sft"):
            speeds["sft"] = report("chat SFT, one epoch", sft_rows(args, workdir, files))
        if args.only in (None, "dpo"):
            speeds["dpo"] = report("DPO, one epoch", dpo_rows(args, workdir, files))
    print(f"(whole benchmark {time.time() - started:.0f} s)")
    for kind, rows in speeds.items():
        ours = next(v for k, v in rows.items() if k.startswith("lmscale"))
        fastest = max(v for k, v in rows.items() if k.startswith("trl"))
        print(f"ratio lmscale/trl_{kind}: {ours / fastest:.2f}")


if __name__ == "__main__":
    main()
