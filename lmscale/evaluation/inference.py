"""Loading a trained model for inference, and sampling text from it (`lmscale generate`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmscale.checkpointing.rundir import RunDir
from lmscale.data.tokenizer import local_tokenizer
from lmscale.errors import LmscaleError
from lmscale.model.build import context_length


def load_for_inference(target: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """An exported HF model directory (a whole model or a LoRA adapter), or a run directory (its newest
    complete checkpoint)."""
    if (target / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

        tokenizer = local_tokenizer(str(target), str(target))
        task = json.loads((target / "adapter_config.json").read_text(encoding="utf-8")).get("task_type")
        loader = AutoPeftModelForSequenceClassification if task == "SEQ_CLS" else AutoPeftModelForCausalLM
        return loader.from_pretrained(str(target), dtype=torch.float32).eval(), tokenizer
    if (target / "config.json").is_file():
        tokenizer = local_tokenizer(str(target), str(target))
        config = AutoConfig.from_pretrained(str(target))
        classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
        loader = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
        return loader.from_pretrained(str(target), dtype=torch.float32).eval(), tokenizer
    if RunDir(target).config.is_file():
        from lmscale.checkpointing.export import load_trained_model, pick_checkpoint, run_config

        checkpoint = pick_checkpoint(target, None)
        return load_trained_model(target, checkpoint, run_config(target, checkpoint))
    raise LmscaleError(
        f"{target} is neither a model directory (config.json) nor an lmscale run (config.yaml): "
        "pass the --out of lmscale export, or a run's output_dir"
    )


def is_sequence_classifier(model: torch.nn.Module) -> bool:
    """A model with a class (or reward) head, loaded whole or as a peft adapter: it scores, it does not write."""
    return "ForSequenceClassification" in type(model).__name__


@dataclass
class Sampling:
    max_new_tokens: int = 100
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 0.95  # 1 = off
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1 or self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise LmscaleError(
                f"sampling settings {self}: need max_new_tokens >= 1, temperature >= 0, top_k >= 0, 0 < top_p <= 1"
            )


def check_context(prompt_tokens: int, max_new_tokens: int, positions: int | None) -> None:
    """A model has no position past its last: generating beyond it fails deep inside the model."""
    if positions is None or prompt_tokens + max_new_tokens <= positions:
        return
    room = positions - prompt_tokens
    fix = f"use --max-new-tokens {room} or less" if room > 0 else "shorten the prompt"
    raise LmscaleError(
        f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens {max_new_tokens} exceeds the model's "
        f"{positions} positions: {fix}"
    )


@torch.no_grad()
def generate_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    sampling: Sampling,
    add_special_tokens: bool = True,
) -> str:
    """The prompt's continuation (without the prompt), sampled by HF `generate`."""
    sampling.check()
    torch.manual_seed(sampling.seed)
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)
    inputs = {k: encoded[k] for k in ("input_ids", "attention_mask")}
    if inputs["input_ids"].shape[1] == 0:
        raise LmscaleError("the prompt is empty: give --prompt some text")
    check_context(inputs["input_ids"].shape[1], sampling.max_new_tokens, context_length(model.config))
    greedy = sampling.temperature == 0
    output = model.generate(
        **inputs,
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else sampling.temperature,
        top_k=None if greedy else sampling.top_k,
        top_p=None if greedy else sampling.top_p,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def read_messages(path: Path) -> list[dict]:
    """A conversation from a JSON file: a list of {role, content} messages, or {"messages": [...]}, ending
    with a turn the model answers (not the assistant's)."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmscaleError(f"--messages {path} does not exist: give a JSON file of chat messages") from None
    except json.JSONDecodeError as exc:
        raise LmscaleError(f"--messages {path} is not JSON (line {exc.lineno}): fix the file") from None
    messages = loaded.get("messages") if isinstance(loaded, dict) else loaded
    well_formed = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not well_formed:
        raise LmscaleError(
            f'--messages {path} must hold a list of {{"role": ..., "content": ...}} messages '
            '(or {"messages": [...]})'
        )
    if messages[-1]["role"] == "assistant":
        raise LmscaleError(
            f"--messages {path} ends with the assistant's turn: end it with the turn to answer"
        )
    return messages


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    """The conversation rendered by the tokenizer's chat template, up to where the assistant's reply starts
    (the template a chat fine-tune saved with its run and export)."""
    if not getattr(tokenizer, "chat_template", None):
        raise LmscaleError(
            "this model's tokenizer has no chat template: --chat and --messages need one (a run fine-tuned "
            "with data.format=chat saves it); give the prompt as plain text instead"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate_command(
    target: Path, prompt: str, messages_path: Path | None, chat: bool, sampling: Sampling
) -> str:
    """`lmscale generate`: the prompt and its continuation, or (--chat, --messages) the assistant's reply."""
    sampling.check()
    messages = read_messages(messages_path) if messages_path else None
    if chat and messages is None:
        messages = [{"role": "user", "content": prompt}]
    model, tokenizer = load_for_inference(target)
    if is_sequence_classifier(model):
        raise LmscaleError(
            f"{target} is a sequence classifier (a reward model or a classification head) and writes no text: "
            "rate records with lmscale score (reward models), or evaluate it with lmscale eval"
        )
    if messages is None:
        return prompt + generate_text(model, tokenizer, prompt, sampling)
    # The template writes any special tokens itself (a BOS among them): the tokenizer must not add more.
    rendered = chat_prompt(tokenizer, messages)
    return generate_text(model, tokenizer, rendered, sampling, add_special_tokens=False)
