"""Fine-tuning fixtures made from real text: the standard library's functions and their docstrings.

- instruction records: prompt = a function's signature, completion = the first line of its docstring;
- labelled records: a function's source, labelled by whether it contains a loop;
- a small "pretrained" GPT-2 saved with `save_pretrained`, with a BPE tokenizer trained on the same code
  (no hub downloads here, so the tests make the model a user would bring).
"""

from __future__ import annotations

import ast
import functools
import json
import re
import sys
from pathlib import Path

STDLIB = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"


def documented_functions(limit: int) -> list[tuple[str, str, str]]:
    """(signature line, first docstring line, source) of stdlib functions, in a fixed order."""
    return _documented_functions(max(limit, 800))[:limit]


@functools.cache  # parsing the stdlib takes seconds; every data helper of a test process reads the same list
def _documented_functions(limit: int) -> list[tuple[str, str, str]]:
    found = []
    for path in sorted(STDLIB.glob("*.py")):
        source = path.read_text(encoding="utf-8", errors="ignore")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines = re.findall(r"[^\r\n]*(?:\r\n|\r|\n|$)", source)  # line ends as the parser counts them
        for node in ast.walk(tree):
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            if not doc or not doc.strip():
                continue
            found.append(
                (lines[node.lineno - 1].strip(), doc.strip().splitlines()[0], _segment(lines, node)[:600])
            )
            if len(found) == limit:
                return found
    return found


def _segment(lines: list[str], node: ast.AST) -> str:
    """`ast.get_source_segment` from lines split once per file (it splits the whole file on every call)."""
    first, last = (lines[i].encode() for i in (node.lineno - 1, node.end_lineno - 1))
    if node.lineno == node.end_lineno:
        return first[node.col_offset : node.end_col_offset].decode()
    middle = "".join(lines[node.lineno : node.end_lineno - 1])
    return first[node.col_offset :].decode() + middle + last[: node.end_col_offset].decode()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def instruction_records(limit: int = 600) -> list[dict]:
    return [{"prompt": f"{sig}\n", "completion": doc} for sig, doc, _ in documented_functions(limit)]


def chat_records(limit: int = 300) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Document {sig}"},
                {"role": "assistant", "content": doc},
            ]
        }
        for sig, doc, _ in documented_functions(limit)
    ]


def labelled_records(limit: int = 600) -> list[dict]:
    return [
        {"text": body, "label": "loop" if ("for " in body or "while " in body) else "straight"}
        for _, _, body in documented_functions(limit)
    ]


def save_pretrained_model(directory: Path, layers: int = 2, hidden: int = 64, family: str = "gpt2") -> Path:
    """A small GPT-2 (or Llama: `family="llama"`, which AutoTP can split) and its tokenizer, as
    `save_pretrained` writes them."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    texts = [body for _, _, body in documented_functions(800)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>", bos_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    special = {
        "bos_token_id": tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if family == "llama":
        shape = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers}
        heads = {"num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256}
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **shape, **heads, **special))
    else:
        shape = {"n_positions": 256, "n_layer": layers, "n_embd": hidden, "n_head": 2}
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), **shape, **special))
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def preference_records(limit: int = 600) -> list[dict]:
    """Prompt = a signature; chosen = its docstring's first line; rejected = the same words backwards."""
    return [
        {"prompt": f"{sig}\n", "chosen": doc, "rejected": " ".join(reversed(doc.split()))}
        for sig, doc, _ in documented_functions(limit)
        if len(doc.split()) > 2
    ]


def unpaired_records(limit: int = 600) -> list[dict]:
    """The preference records unpaired (KTO): the chosen reply labelled desirable, the rejected one not."""
    return [
        {"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"}
        for pair in preference_records(limit)
        for side in ("chosen", "rejected")
    ]


def sum_records(count: int, right_share: float, seed: int = 0) -> list[dict]:
    """Instruction records "a+b=" -> the sum, for a, b in 0..4, where only `right_share` of the completions are
    right and the rest one too many: a model fine-tuned on them answers wrong greedily but samples the right
    answer often enough for a reward to teach it (GRPO's test task)."""
    import random

    rng = random.Random(seed)
    records = []
    for _ in range(count):
        a, b = rng.randrange(5), rng.randrange(5)
        answer = a + b if rng.random() < right_share else a + b + 1
        records.append({"prompt": f"{a}+{b}=", "completion": str(answer)})
    return records


def sum_prompts(count: int, seed: int = 1) -> list[dict]:
    """Prompts "a+b=" with their `answer` field, for a reward function to check."""
    import random

    rng = random.Random(seed)
    pairs = [(rng.randrange(5), rng.randrange(5)) for _ in range(count)]
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs]
