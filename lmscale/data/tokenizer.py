"""A byte-level BPE trained on the training split with `tokenizers`, cached by corpus fingerprint."""

from __future__ import annotations

import logging
from pathlib import Path

from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lmscale.errors import ConfigError

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def _train_bpe(documents: Dataset, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # Byte-level: every string encodes, no unknown tokens. add_prefix_space off keeps code indentation exact.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    batches = (documents[i : i + 256]["text"] for i in range(0, len(documents), 256))
    tokenizer.train_from_iterator(batches, trainer=trainer, length=len(documents))
    return tokenizer


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD, bos_token=EOS)


def trained_tokenizer(
    documents: Dataset, vocab_size: int, cache_dir: str, corpus_key: str | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `documents`, or reuse the one cached for the same corpus and size.

    The cache key is the documents' datasets fingerprint unless `corpus_key` names the corpus.
    """
    directory = Path(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{corpus_key or documents._fingerprint}"
    if (directory / "tokenizer.json").is_file():
        log.info("tokenizer: reusing %s", directory)
        return PreTrainedTokenizerFast.from_pretrained(str(directory))
    log.info("tokenizer: training a %d-token byte-level BPE on %d documents", vocab_size, len(documents))
    tokenizer = _wrap(_train_bpe(documents, vocab_size))
    partial = directory.with_name(directory.name + ".partial")
    tokenizer.save_pretrained(str(partial))
    partial.rename(directory)  # a directory that exists is complete
    return tokenizer


def local_tokenizer(path: str, key: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load an HF tokenizer directory (named by config `key` in errors), adding a PAD token if it lacks one."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises several types for a bad directory
        raise ConfigError(
            f"{key}={path} holds no loadable tokenizer ({type(exc).__name__}): save one there with "
            "save_pretrained, or set data.tokenizer to a tokenizer directory"
        ) from None
    if tokenizer.eos_token is None:
        raise ConfigError(
            f"{key}={path}: the tokenizer has no EOS token; set eos_token in its tokenizer_config.json"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
