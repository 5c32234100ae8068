"""The typed config tree: YAML recipe + dotted `key=value` overrides, validated once at start-up.

Every key has a default (the defaults are the embedded CPU recipe, `configs/tiny-cpu.yaml`) and a
one-line description; an unknown key, a wrong type or an out-of-range value is a `ConfigError` that
names every offending key at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmscale.errors import ConfigError
from lmscale.resources import find_file


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    preset: str = Field(
        "tiny-gpt2", description="Model shape from lmscale.model.PRESETS, used when `path` is unset."
    )
    path: str | None = Field(None, description="Local HF model directory to start from (pretrained weights).")
    trust_remote_code: bool = Field(
        False,
        description="Run Python code shipped in model.path / its tokenizer (custom architectures); "
        "off, so a model directory can never execute code unless you say so.",
    )
    embedding_dropout: float | None = Field(
        None, ge=0, lt=1, description="Dropout on embeddings; unset = the family's default."
    )
    attention_dropout: float | None = Field(
        None, ge=0, lt=1, description="Dropout on attention probabilities; unset = the family's default."
    )
    residual_dropout: float | None = Field(
        None, ge=0, lt=1, description="Dropout on residual branches; unset = the family's default."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each block's activations in backward: less memory, ~1/3 more compute."
    )
    fused_kernels: bool = Field(
        True,
        description="Swap HF's Python-composed tanh-GELU (GPT-2 family) for torch's fused kernel of the same "
        "function; false keeps HF's modules (bitwise as HF computes).",
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel: eager, sdpa (torch), or flash_attention_2 (GPU, flash-attn)."
    )
    sliding_window: int | None = Field(
        None, ge=1, description="Local attention window in tokens, for families that support it (mistral)."
    )


class SourceConfig(Section):
    path: str = Field(..., description="A data source, in any form data.path accepts.")
    weight: float = Field(1.0, gt=0, description="Relative share of this source in the training mixture.")


class DataConfig(Section):
    path: str | None = Field(
        None,
        description="Text file, directory, .jsonl/.json, .parquet, .csv, a save_to_disk directory, or a Hub "
        "dataset hf://datasets/org/name; unset = the embedded stdlib corpus.",
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
    format: Literal["text", "prompt_completion", "chat", "preference"] = Field(
        "text",
        description="text: documents; prompt_completion / chat: instruction records whose loss covers "
        "only the completion (the prompt is masked); preference: prompt/chosen/rejected pairs (DPO).",
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
    messages_field: str = Field(
        "messages", description="chat: field holding the [{role, content}] list; the last one is the target."
    )
    label_field: str = Field(
        "label", description="finetune.task=classification: field holding each document's class."
    )
    sources: list[SourceConfig] = Field(
        [], description="Several sources mixed by weight ([{path, weight}]), instead of data.path."
    )
    eval_path: str | None = Field(None, description="Held-out data; unset = a data.eval_fraction split.")
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


class EarlyStoppingConfig(Section):
    patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without improvement; unset = never."
    )
    min_delta: float = Field(
        0.0, ge=0, description="An evaluation improves only if eval loss drops by more than this."
    )


class TrainConfig(Section):
    max_steps: int | None = Field(
        250,
        ge=1,
        description="Optimizer steps to train for (or set max_tokens or epochs instead, and this null).",
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Train on about this many real tokens (made into steps from the epoch's plan).",
    )
    epochs: float | None = Field(
        None, gt=0, description="Train for this many passes over the data (may be 0.5)."
    )
    optimizer: Literal["adamw", "adafactor", "lion", "lamb", "sgd"] = Field(
        "adamw", description="adamw, adafactor, lion, lamb or sgd (with momentum)."
    )
    lr: float = Field(2e-3, gt=0, description="Peak learning rate.")
    scheduler: Literal[
        "constant", "linear", "cosine", "cosine_restarts", "step", "exponential", "piecewise", "cyclic", "wsd"
    ] = Field("cosine", description="LR shape after the warm-up (see the LR schedules section).")
    min_lr: float = Field(
        2e-4, ge=0, description="Floor of linear/cosine/exponential/wsd decays and of cyclic's low point."
    )
    warmup_steps: int = Field(25, ge=0, description="Steps of linear warm-up from 0 to `lr`.")
    restart_period: int = Field(100, ge=1, description="cosine_restarts: steps of the first cycle.")
    restart_mult: float = Field(
        1.0, ge=1, description="cosine_restarts: each cycle is this many times longer."
    )
    decay_every: int = Field(100, ge=1, description="step: multiply the LR by decay_gamma every N steps.")
    decay_gamma: float = Field(
        0.5, gt=0, le=1, description="step: the factor applied every decay_every steps."
    )
    lr_points: list[tuple[int, float]] = Field(
        [], description="piecewise: [[step, lr], ...] in ascending steps, linear in between."
    )
    cycle_steps: int = Field(
        50, ge=1, description="cyclic: steps from the low LR to the peak (half a cycle)."
    )
    cycle_mode: Literal["triangular", "triangular2"] = Field(
        "triangular", description="cyclic: triangular, or triangular2 (the peak halves every cycle)."
    )
    decay_fraction: float = Field(
        0.2, gt=0, le=1, description="wsd: fraction of the post-warm-up steps spent decaying to min_lr."
    )
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay.")
    no_weight_decay: list[Literal["bias", "norm", "embedding"]] = Field(
        ["bias", "norm", "embedding"], description="Parameter kinds exempt from weight decay."
    )
    layer_lr_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Layer-wise LR decay: each layer below the top gets this times the LR of the one above.",
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="beta1, beta2 of adamw, lion and lamb.")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd: momentum.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the training loss.")
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    grad_clip: float = Field(
        1.0, ge=0, description="Clip the global gradient norm to this; 0 disables clipping."
    )
    micro_batch_size: int = Field(
        16,
        ge=1,
        description="pad mode: sequences per rank per forward/backward (bucket mode: nominal, for DeepSpeed).",
    )
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    global_batch_size: int | None = Field(
        None, ge=1, description="Optional check: must equal micro_batch_size x grad_accum_steps x ranks."
    )
    eval_every: int = Field(
        50, ge=1, description="Evaluate held-out loss/perplexity every N steps (and at the end)."
    )
    eval_batches: int = Field(20, ge=1, description="Micro-batches per rank in one evaluation.")
    log_every: int = Field(10, ge=1, description="Write metrics every N steps.")
    max_nonfinite_steps: int = Field(
        10,
        ge=1,
        description="Stop with an error after this many steps in a row skipped for a non-finite loss/gradient.",
    )
    save_every: int = Field(
        100, ge=1, description="Save a checkpoint every N steps (and at the end, and on a stop signal)."
    )
    keep_last: int = Field(
        2, ge=2, description="Complete checkpoints kept (at least 2, so one survives a crash mid-save)."
    )
    hang_timeout_s: float | None = Field(
        None,
        gt=0,
        description="A rank that completes no step for this long dumps its stacks and exits non-zero; "
        "unset = 50 x the median step time, at least 900 s.",
    )
    resume: str = Field(
        "auto",
        description="auto: continue from the newest complete checkpoint in output_dir; none; or a checkpoint path.",
    )

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainConfig:
        problems = []
        if self.min_lr > self.lr:
            problems.append(f"train.min_lr={self.min_lr} exceeds train.lr={self.lr}: set min_lr <= lr")
        lengths = {"max_steps": self.max_steps, "max_tokens": self.max_tokens, "epochs": self.epochs}
        chosen = [f"train.{key}={value}" for key, value in lengths.items() if value is not None]
        if len(chosen) != 1:
            problems.append(
                f"set exactly one of train.max_steps, train.max_tokens, train.epochs (got "
                f"{', '.join(chosen) or 'none'}): e.g. train.max_steps=null train.max_tokens=100000000"
            )
        elif self.max_steps is not None and self.warmup_steps >= self.max_steps:
            problems.append(
                f"train.warmup_steps={self.warmup_steps} is not below train.max_steps={self.max_steps}: shorten the warm-up"
            )
        problems += _schedule_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _schedule_problems(train: TrainConfig) -> list[str]:
    if train.scheduler != "piecewise":
        return []
    points = train.lr_points
    if not points:
        return ["train.scheduler=piecewise needs train.lr_points: give [[step, lr], ...]"]
    steps = [step for step, _ in points]
    if steps != sorted(set(steps)) or any(lr < 0 for _, lr in points):
        return [f"train.lr_points={[list(p) for p in points]}: steps must ascend and LRs be >= 0"]
    return []


class ZeroConfig(Section):
    stage: int = Field(
        0, ge=0, le=3, description="ZeRO stage: 0 off, 1 optimizer states, 2 +gradients, 3 +parameters."
    )
    offload: Literal["none", "cpu"] = Field(
        "none", description="Offload optimizer states (and stage-3 params) to CPU."
    )

    @model_validator(mode="after")
    def _check_offload(self) -> ZeroConfig:
        if self.offload == "cpu" and self.stage < 2:
            raise ValueError(f"zero.offload=cpu needs zero.stage 2 or 3 (got {self.stage}): set zero.stage=2")
        return self


class LoraConfig(Section):
    r: int = Field(8, ge=1, description="Rank of the low-rank update matrices.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | None = Field(
        None,
        description="Module names to adapt (e.g. [q_proj, v_proj]); unset = peft's default for the family.",
    )


class UnfreezeConfig(Section):
    every_steps: int = Field(..., ge=1, description="Steps between one layer joining training and the next.")
    start_from: Literal["top", "bottom"] = Field(
        "top",
        description="top: the head and top block train first and lower layers join; bottom: the reverse.",
    )


class DpoConfig(Section):
    beta: float = Field(
        0.1, gt=0, description="Strength of the pull towards the reference model (DPO's beta; IPO's tau)."
    )
    loss: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid",
        description="sigmoid: DPO's logistic loss; ipo: squared, on per-token log-ratios; hinge: SLiC's hinge.",
    )


class FinetuneConfig(Section):
    method: Literal["sft", "dpo"] = Field(
        "sft",
        description="sft: the cross-entropy of the targets; dpo: direct preference optimisation on "
        "data.format=preference pairs, against the starting model as reference.",
    )
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    task: Literal["causal_lm", "classification"] = Field(
        "causal_lm",
        description="causal_lm: next-token loss; classification: a sequence-classification head on data.label_field.",
    )
    num_labels: int | None = Field(
        None, ge=2, description="classification: number of classes; unset = the distinct labels in the data."
    )
    lora: LoraConfig | None = Field(
        None,
        description="LoRA adapters via peft ({r, alpha, dropout, target_modules}); unset = full fine-tuning.",
    )
    unfreeze: UnfreezeConfig | None = Field(
        None,
        description="Gradual unfreezing ({every_steps, start_from}); unset = every layer trains from step 0.",
    )


class WandbConfig(Section):
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="W&B mode; offline needs no account."
    )
    project: str = Field("lmscale", description="W&B project name.")
    name: str | None = Field(None, description="W&B run name; unset = the output_dir's name.")
    group: str | None = Field(
        None, description="W&B group, to see related runs (a sweep, a seed study) together."
    )


class MetricsConfig(Section):
    peak_tflops: float | None = Field(
        None, gt=0, description="Per-device peak TFLOP/s for MFU/HFU; unset = looked up from the GPU's name."
    )


class LoggingConfig(Section):
    tensorboard: bool = Field(
        False, description="Also write TensorBoard event files to <output_dir>/tensorboard."
    )


class EvalConfig(Section):
    harness_tasks: list[str] = Field(
        [],
        description="lm-evaluation-harness tasks scored during training (at step 0, every harness_every, and the end).",
    )
    harness_every: int | None = Field(
        None, ge=1, description="Steps between harness evaluations; unset = at step 0 and the end only."
    )
    harness_limit: int | None = Field(
        None,
        ge=1,
        description="Documents per harness task (unset = all): the harness's time counts against the step.",
    )
    harness_include_path: str | None = Field(
        None, description="A directory of your own lm-eval task YAMLs for eval.harness_tasks."
    )


class Config(Section):
    output_dir: str = Field(
        "runs/tiny-cpu", description="Run directory: config.yaml, metrics.jsonl, checkpoints/."
    )
    seed: int = Field(1234, description="Seed for model init, data order and dropout.")
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="bf16, fp16 (GPU only) or fp32.")
    deepspeed_config: str | None = Field(
        None,
        description="DeepSpeed JSON to start from (e.g. ds_configs/zero2_bf16.json); lmscale keys fill its 'auto's.",
    )
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    zero: ZeroConfig = ZeroConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    wandb: WandbConfig = WandbConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check_task(self) -> Config:
        if self.finetune.method == "dpo" or self.data.format == "preference":
            problems = dpo_problems(self)
            if problems:
                raise ValueError("; ".join(problems))
        if self.finetune.task != "classification":
            return self
        if self.data.format != "text":
            raise ValueError(
                f"finetune.task=classification reads data.text_field and data.label_field, so data.format must "
                f"be text (got {self.data.format})"
            )
        problems = whole_record_problems(self.data, "finetune.task=classification")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def dpo_problems(config: Config) -> list[str]:
    """DPO trains on whole preference pairs, both replies of a pair side by side in one micro-batch."""
    data, method = config.data, config.finetune.method
    if method == "dpo" and data.format != "preference":
        return [
            f"finetune.method=dpo trains on preference pairs: set data.format=preference (got {data.format})"
        ]
    if method != "dpo":
        return ["data.format=preference is for DPO: set finetune.method=dpo"]
    problems = []  # packing, streaming and length warm-up are refused by DataConfig for any record format
    if config.finetune.task != "causal_lm":
        problems.append("finetune.method=dpo needs finetune.task=causal_lm")
    if data.batching == "pad":
        problems.append("data.batching=pad does not apply to preference pairs: use bucket")
    budget = data.max_tokens_per_batch
    if isinstance(budget, int) and budget < 2 * data.max_seq_len:
        problems.append(
            f"data.max_tokens_per_batch={budget} cannot hold a pair of data.max_seq_len={data.max_seq_len} "
            f"replies: raise it to at least {2 * data.max_seq_len}"
        )
    if config.train.label_smoothing:
        problems.append("train.label_smoothing applies to cross-entropy, not DPO: set it to 0")
    return problems


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into (['a', 'b'], value), parsing the value as YAML (so 3 is an int)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not key=value: write it as e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted override into the nested dict `raw` (in place) and return it."""
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section; check the key name")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe into a dict (safe_load: a recipe cannot run code); a shipped recipe's name
    (configs/gpt2-124m.yaml) works from any directory."""
    path = find_file(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist: pass an existing YAML, e.g. configs/tiny-cpu.yaml"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where} is not valid YAML: fix the syntax there") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(raw).__name__}")
    return raw


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted leaf key: value}; an empty section counts as a leaf."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def dotted_keys(raw: dict[str, Any]) -> set[str]:
    """All leaf keys of a nested dict, dotted: the keys a user set explicitly."""
    return set(flatten(raw))


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "config"
    if error["type"] == "extra_forbidden":
        from lmscale.config_reference import closest_key

        guess = closest_key(key)
        hint = f"did you mean {guess}?" if guess else "remove it"
        return f"{key}: unknown key; {hint} (lmscale config keys lists them all)"
    if error["type"] == "value_error":
        return error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    return f"{key}={got!r}: {error['msg'][0].lower()}{error['msg'][1:]}"


def build_config(raw: dict[str, Any]) -> Config:
    """Validate a nested dict into a Config, collecting every problem into one ConfigError."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"invalid config: {problems}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> tuple[Config, set[str]]:
    """Load a recipe (or the defaults) with overrides; return the config and the keys set explicitly."""
    raw = read_yaml(path) if path else {}
    apply_overrides(raw, list(overrides))
    return build_config(raw), dotted_keys(raw)


def config_to_yaml(config: Config) -> str:
    """The resolved config as YAML, in the order the fields are declared."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
