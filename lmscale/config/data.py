"""data.*: sources, formats, cleaning, tokenization and batching."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from lmscale.config.section import Section


class SourceConfig(Section):
    path: str = Field(..., description="A data source, in any form data.path accepts.")
    weight: float = Field(1.0, gt=0, description="Relative share of this source in the training mixture.")


class DataConfig(Section):
    path: str | None = Field(
        None,
        description="Text file, directory, .jsonl/.json, .parquet, .csv, a save_to_disk directory, a Hub "
        "dataset hf://datasets/org/name, or any of those at an fsspec URL (s3://...); unset = the embedded stdlib corpus.",
    )
    glob: str | None = Field(None, description="Files of a directory data.path to read, e.g. '**/*.txt'.")
    hub_config: str | None = Field(
        None,
        description="hf://datasets/... paths: the dataset's configuration (subset); unset = its default.",
    )
    hub_split: str = Field(
        "train", description="hf://datasets/... data.path / data.sources: the split to train on."
    )
    hub_eval_split: str = Field(
        "validation", description="hf://datasets/... data.eval_path: the split held out for evaluation."
    )
    text_field: str = Field(
        "text", description="Field holding the document text in jsonl/parquet/csv/disk data."
    )
    format: Literal["text", "prompt_completion", "chat", "preference", "unpaired", "prompt"] = Field(
        "text",
        description="text: documents; prompt_completion: instruction records whose loss covers only the "
        "completion; chat: conversations whose loss covers the assistant's messages (data.chat_loss); "
        "preference: prompt/chosen/rejected pairs (DPO, ORPO, SimPO, reward); unpaired: prompt/completion "
        "records labelled desirable or not (KTO); prompt: prompts alone (data.prompt_field text or a "
        "data.messages_field list ending with a user turn) for GRPO, the other fields passed to the rewards.",
    )
    prompt_field: str = Field("prompt", description="prompt_completion: field holding the prompt.")
    completion_field: str = Field(
        "completion", description="prompt_completion: field holding the completion (the target)."
    )
    chosen_field: str = Field(
        "chosen", description="preference: field holding the preferred reply (text, or a message list)."
    )
    rejected_field: str = Field(
        "rejected", description="preference: field holding the dispreferred reply (text, or a message list)."
    )
    margin_field: str = Field(
        "margin",
        description="preference: an optional field with each pair's margin (reward models subtract it from the "
        "reward difference, as TRL does); absent = 0.",
    )
    messages_field: str = Field("messages", description="chat: field holding the [{role, content}] list.")
    chat_loss: Literal["all", "last"] = Field(
        "all",
        description="chat: which assistant messages are targets: all (each with its end-of-turn token), or the "
        "last only; system, user and tool messages never are.",
    )
    train_field: str = Field(
        "train",
        description="chat: a message with this field false is not a target (e.g. a bad earlier reply).",
    )
    label_field: str = Field(
        "label",
        description="finetune.task=classification: field holding each document's class; data.format=unpaired: "
        "field saying whether the completion is desirable (true/false).",
    )
    sources: list[SourceConfig] = Field(
        [], description="Several sources mixed by weight ([{path, weight}]), instead of data.path."
    )
    eval_path: str | None = Field(None, description="Held-out data; unset = a data.eval_fraction split.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for data paths given as URLs (s3://, gs://, az://), e.g. {endpoint_url: ...}; credentials come from the environment.",
    )
    eval_fraction: float = Field(0.02, gt=0, lt=0.5, description="Share of documents held out (fixed split).")
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="A malformed jsonl line: stop with its line number, or skip it and count it."
    )
    clean: bool = Field(True, description="Clean documents (the steps below) before tokenizing.")
    strip_html: bool = Field(
        True, description="Remove HTML tags, comments, scripts and styles; unescape entities."
    )
    nfkc: bool = Field(True, description="Unicode NFKC normalisation.")
    normalize_whitespace: bool = Field(
        True, description="CRLF to LF, no trailing spaces, at most two blank lines (indentation is kept)."
    )
    min_chars: int = Field(20, ge=0, description="Drop documents shorter than this after cleaning.")
    dedup: bool = Field(True, description="Drop exact duplicate documents (by content hash).")
    near_dedup: bool = Field(False, description="Drop near-duplicate documents (MinHash LSH).")
    near_dedup_threshold: float = Field(
        0.85, gt=0, lt=1, description="Estimated Jaccard similarity that counts as a near duplicate."
    )
    max_seq_len: int = Field(
        256, ge=8, description="Longest training sequence in tokens; longer documents are split."
    )
    vocab_size: int = Field(
        8192, ge=256, description="Vocabulary size of the byte-level BPE trained on the corpus."
    )
    tokenizer: str | None = Field(
        None, description="Local HF tokenizer directory; unset = train one on the corpus."
    )
    num_proc: int = Field(
        1, ge=1, description="Processes for cleaning and tokenization (datasets.map num_proc)."
    )
    cache_dir: str = Field(
        "~/.cache/lmscale", description="Where tokenizers and tokenized datasets are cached."
    )
    num_workers: int = Field(1, ge=0, description="DataLoader worker processes per rank.")
    batching: Literal["bucket", "pack", "pad"] = Field(
        "bucket",
        description="bucket: length-grouped batches under a token budget; pack: documents concatenated into "
        "max_seq_len rows; pad: train.micro_batch_size rows padded to max_seq_len.",
    )
    max_tokens_per_batch: int | Literal["auto"] = Field(
        4096,
        description="bucket/pack: padded tokens (rows x longest row) per micro-batch per rank; auto = the "
        "largest that fits (measured on a GPU, planned on CPU).",
    )
    seq_len_warmup_steps: int = Field(
        0,
        ge=0,
        description="Steps over which the sequence-length cap grows from seq_len_start to max_seq_len.",
    )
    seq_len_start: int = Field(64, ge=8, description="Sequence-length cap at step 0 of the warm-up.")
    streaming: bool = Field(
        False,
        description="Stream the corpus (larger than memory): tokenize on the fly, bucket inside a shuffle buffer.",
    )
    shuffle_buffer: int = Field(
        10000, ge=1, description="streaming: sequences per shuffle/bucketing buffer per rank."
    )
    streaming_eval_docs: int = Field(
        500, ge=1, description="streaming: held-out documents kept for evaluation."
    )
    tokenizer_docs: int = Field(20000, ge=1, description="streaming: documents the BPE is trained on.")

    def source_paths(self) -> list[tuple[str, str]]:
        """(key, path) of every data path set: data.path, each data.sources[].path, data.eval_path."""
        paths = [("data.path", self.path), *(("data.sources", s.path) for s in self.sources)]
        return [(key, path) for key, path in [*paths, ("data.eval_path", self.eval_path)] if path]

    @model_validator(mode="after")
    def _check_data(self) -> DataConfig:
        problems = []
        if isinstance(self.max_tokens_per_batch, int) and self.max_tokens_per_batch < 1:
            problems.append(
                f"data.max_tokens_per_batch={self.max_tokens_per_batch} must be positive, or auto"
            )
        elif (
            self.batching != "pad"
            and self.max_tokens_per_batch != "auto"
            and self.max_tokens_per_batch < self.max_seq_len
        ):
            problems.append(
                f"data.max_tokens_per_batch={self.max_tokens_per_batch} is below data.max_seq_len={self.max_seq_len}: "
                "raise the budget or lower max_seq_len so the longest sequence fits"
            )
        if self.sources and self.path:
            problems.append(
                "data.path and data.sources are both set: use data.sources alone to mix several sources"
            )
        if self.seq_len_warmup_steps and self.batching == "pack":
            problems.append(
                "data.seq_len_warmup_steps does not apply to data.batching=pack: use bucket or pad"
            )
        if self.seq_len_warmup_steps and self.seq_len_start > self.max_seq_len:
            problems.append(
                f"data.seq_len_start={self.seq_len_start} exceeds data.max_seq_len={self.max_seq_len}"
            )
        if self.streaming and self.near_dedup:
            problems.append(
                "data.near_dedup needs the whole corpus and does not stream: set data.near_dedup=false"
            )
        if self.format != "text":
            problems += whole_record_problems(self, f"data.format={self.format}")
        if self.streaming and self.batching == "pack":
            problems.append(
                "data.batching=pack does not stream yet: use data.batching=bucket with data.streaming"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def whole_record_problems(data: DataConfig, reason: str) -> list[str]:
    """Fine-tuning records (instructions, labelled documents) are bucketed whole: no packing, streaming
    or length warm-up may cut or merge them."""
    problems = []
    if data.batching == "pack":
        problems.append(f"data.batching=pack does not apply to {reason}: use bucket or pad")
    if data.streaming:
        problems.append(f"data.streaming=True does not apply to {reason}: use false")
    if data.seq_len_warmup_steps:
        problems.append(
            f"data.seq_len_warmup_steps={data.seq_len_warmup_steps} does not apply to {reason}: use 0"
        )
    return problems
