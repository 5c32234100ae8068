"""What tests share: the repository's path, a tiny model config, the real CLI in a subprocess, the
arguments of the exact-comparison runs, and a checkpoint laid out as save_checkpoint lays it out. (Fixtures live in conftest.py; tests import these from here.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tiny_gpt2_config(vocab_size: int):
    """A two-layer GPT-2 without dropout, so two runs of the same batch give the same numbers."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=32,
        n_layer=2,
        n_embd=32,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def word_level_tokenizer(words: list[str], chat_template: str | None = None):
    """A tokenizer of whole words (<eos>, <pad> and <unk> first), so tests can count and read its tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = ["<eos>", "<pad>", "<unk>", *words]
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=word_level, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = chat_template
    return fast


# A 10-step fp32 tiny-Llama run logging every step and saving at step 5: runs of it that differ only in
# how they compute (layouts, compile) give the same losses, up to summation order.
EXACT_RUN_ARGS = [
    "model.preset=tiny-llama",
    "precision=fp32",
    "zero.stage=1",
    "data.max_seq_len=64",
    "data.vocab_size=1024",
    "data.max_tokens_per_batch=1024",
    "train.max_steps=10",
    "schedule.warmup_steps=1",
    "train.eval_every=10",
    "train.eval_batches=2",
    "train.log_every=1",
    "checkpoint.save_every=5",
    "data.num_workers=0",
    "wandb.mode=disabled",
]


def run_lmscale(
    *args: str, cwd: Path | None = None, timeout: int = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the real `lmscale` CLI in a subprocess, as a user would (`env` adds variables)."""
    return subprocess.run(
        [sys.executable, "-m", "lmscale.cli", *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def fake_checkpoint(run: Path, step: int, payload: bytes) -> Path:
    """A complete checkpoint whose manifest records sizes and checksums, as save_checkpoint writes it."""
    from lmscale.checkpointing.manifest import file_digest
    from lmscale.checkpointing.rundir import RunDir

    path = run / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(payload)
    files = {
        "mp_rank_00_model_states.pt": {
            "bytes": len(payload),
            "blake2b": file_digest(path / "mp_rank_00_model_states.pt"),
        }
    }
    RunDir.complete_marker(path).write_text(json.dumps({"step": step, "world_size": 1, "files": files}))
    return path


# The S3-compatible server of the object-storage tests (conftest's `s3` fixture: moto's, on the loopback).
S3_PORT = 45671  # fixed: the server is the session's own
S3_BUCKET = "lmscale-runs"
S3_ENDPOINT = f"http://127.0.0.1:{S3_PORT}"
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ENDPOINT_URL": S3_ENDPOINT,
    "AWS_EC2_METADATA_DISABLED": "true",  # no waiting on a cloud metadata service that is not there
}
S3_NO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "",
    "AWS_SECRET_ACCESS_KEY": "",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_CONFIG_FILE": "/nonexistent",
}


# A short run of the tiny GPT-2 on the embedded corpus, checkpointing every 2 steps (the fault and
# checkpoint tests; later overrides win).
SHORT_RUN_ARGS = [
    "model.preset=tiny-gpt2",
    "data.max_seq_len=64",
    "data.vocab_size=1024",
    "data.max_tokens_per_batch=1024",
    "train.max_steps=8",
    "schedule.warmup_steps=1",
    "train.eval_every=100",
    "train.eval_batches=2",
    "train.log_every=1",
    "checkpoint.save_every=2",
    "data.num_workers=0",
    "wandb.mode=disabled",
    "precision=bf16",
]
