"""`lmscale export RUN_DIR --out DIR`: a checkpoint of any ZeRO stage as an HF `save_pretrained` model.

ZeRO 1-3 shards are consolidated by DeepSpeed's own `zero_to_fp32` machinery (fp32 master weights,
whatever the number of ranks); a ZeRO-0 checkpoint holds the whole module and is read directly with
`torch.load(weights_only=True)`. The model is rebuilt from the run's `config.yaml`, so the exported
directory loads with `AutoModelForCausalLM.from_pretrained` (or the sequence-classification class)
and carries the run's tokenizer. A LoRA run exports its adapter (peft's `save_pretrained`, which
`AutoPeftModelForCausalLM.from_pretrained` loads onto the base in model.path), or with `merge` the
base with the adapter folded in (`merge_and_unload`), a plain HF model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from lmscale.checkpointing.autoep_weights import folded_weights, to_hf_names, zero0_weights
from lmscale.checkpointing.checkpoint import (
    CHECKPOINT_CONFIG,
    UNIVERSAL_OPTIMIZERS,
    complete_checkpoints,
    ensure_universal,
    universal_model_states,
)
from lmscale.checkpointing.manifest import verify_checkpoint, written_tensor_degree, written_with_autoep
from lmscale.checkpointing.rundir import RunDir, read_labels
from lmscale.checkpointing.tensor_slices import joined_tensor_slices
from lmscale.config import Config, saved_config
from lmscale.data.tokenizer import local_tokenizer
from lmscale.errors import LmscaleError
from lmscale.model.build import build_model, context_length

log = logging.getLogger(__name__)

RUN_CONFIG = "lmscale.yaml"  # the run's config, kept beside an exported model for `lmscale eval`


def config_file(run_dir: Path, checkpoint: Path | None = None) -> Path:
    """The config.yaml `checkpoint` was written with (its own copy), else the run's (older checkpoints)."""
    own = checkpoint / CHECKPOINT_CONFIG if checkpoint is not None else None
    return own if own is not None and own.is_file() else RunDir(run_dir).config


def run_config(run_dir: Path, checkpoint: Path | None = None) -> Config:
    path = config_file(run_dir, checkpoint)
    if not path.is_file():
        raise LmscaleError(f"{run_dir} has no config.yaml: pass the output_dir of an lmscale run")
    return saved_config(yaml.safe_load(path.read_text(encoding="utf-8")))


def pick_checkpoint(run_dir: Path, checkpoint: str | None) -> Path:
    """The named checkpoint (a tag, `best`, or a path), else the newest complete one."""
    directory = RunDir(run_dir).checkpoints
    if checkpoint == "best":
        checkpoint = RunDir(run_dir).best_tag()
        if checkpoint is None:
            raise LmscaleError(f"{run_dir} has no best checkpoint marked: export the latest one instead")
    if checkpoint:
        path = Path(checkpoint) if Path(checkpoint).is_dir() else directory / checkpoint
        if not RunDir.complete_marker(path).is_file():
            raise LmscaleError(
                f"checkpoint {checkpoint} is not a complete checkpoint of {run_dir}: pick another"
            )
        return verify_checkpoint(path)
    found = complete_checkpoints(directory)
    if not found:
        raise LmscaleError(f"{run_dir} has no complete checkpoint: train it first (lmscale train)")
    return verify_checkpoint(found[-1])


def consolidated_weights(
    checkpoint: Path, zero_stage: int, optimizer: str = "adamw"
) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a checkpoint written by any number of ranks (and tensor-parallel
    slices: DeepSpeed's universal conversion merges those, by how AutoTP split each weight, when it can read
    the `optimizer`'s states, else lmscale.checkpointing.tensor_slices; and AutoEP's experts, which
    lmscale.checkpointing.autoep_weights names as HF's after)."""
    tensor = written_tensor_degree(checkpoint)
    if written_with_autoep(checkpoint):
        if tensor > 1 and (zero_stage == 0 or optimizer not in UNIVERSAL_OPTIMIZERS):
            # no universal form to read: the weights the ranks computed with
            return folded_weights(checkpoint, tensor)
        if zero_stage == 0:
            return zero0_weights(checkpoint)
        return universal_weights(ensure_universal(checkpoint, world_size=1))
    if tensor > 1:
        if optimizer not in UNIVERSAL_OPTIMIZERS:
            return joined_tensor_slices(checkpoint, tensor)
        return universal_weights(ensure_universal(checkpoint, world_size=1))
    if zero_stage == 0:
        states = torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=True, map_location="cpu")
        return {name: tensor.float() for name, tensor in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # It prints a line per step of its work, and draws a "Loading checkpoint shards" bar whose carriage
    # returns garble a log file (tqdm reads TQDM_DISABLE when a bar is made).
    quiet_bar = {} if sys.stderr.isatty() else {"TQDM_DISABLE": "1"}
    with contextlib.redirect_stdout(io.StringIO()), environment(quiet_bar):
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


@contextlib.contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """`variables` set in os.environ for the block, then restored."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def universal_weights(universal: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of a universal checkpoint: one directory per parameter, holding `fp32.pt`, in the
    shapes the model states record, and the persistent buffers (DeepSeek's routing bias).

    Why both: DeepSpeed 0.19.8's conversion of a ZeRO-3 checkpoint keeps each weight flat (its loader reshapes
    them) and writes no buffer files (its ZeRO 1-2 conversion writes both whole)."""
    states = universal_model_states(universal)
    shapes = {
        name: torch.Size(shape) for group in states.get("param_shapes") or [] for name, shape in group.items()
    }
    weights = {}
    for parameter in sorted((universal / "zero").iterdir()):
        if (parameter / "fp32.pt").is_file():
            saved = torch.load(parameter / "fp32.pt", weights_only=False, map_location="cpu")
            tensor = (saved["param"] if isinstance(saved, dict) else saved).float()
            shape = shapes.get(parameter.name)
            # An expert's recorded shape is a rank's share (another size): its merged tensor stays as it is.
            if shape is not None and tensor.shape != shape and tensor.numel() == shape.numel():
                tensor = tensor.reshape(shape)
            weights[parameter.name] = tensor
    module = states.get("module") or {}
    for name in states.get("buffer_names") or []:
        if name not in weights and name in module:
            weights[name] = module[name].float()
    return weights


def load_trained_model(run_dir: Path, checkpoint: Path, config: Config):
    """The run's model with the checkpoint's weights, and the run's tokenizer."""
    tokenizer = local_tokenizer(str(RunDir(run_dir).tokenizer), "the run's tokenizer")
    options = config.model.model_copy(update={"activation_checkpointing": False})
    labels = read_labels(run_dir)
    model = build_model(options, tokenizer, config.data.max_seq_len, config.seed, config.finetune, labels)
    weights = consolidated_weights(checkpoint, config.zero.stage, config.optim.name)
    if written_with_autoep(checkpoint):
        weights = to_hf_names(weights, {name: t.shape for name, t in model.state_dict().items()})
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied_keys = getattr(model, "_tied_weights_keys", None) or {}
    tied = {name for name in missing if name in tied_keys or name.endswith("lm_head.weight")}
    # A LoRA checkpoint holds only what trained; the frozen base weights came from model.path.
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = trainable if config.finetune.lora is not None else set(missing)
    if unexpected or (set(missing) & expected) - tied:
        raise LmscaleError(
            f"{checkpoint} does not fit the model in {run_dir}/config.yaml (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}): export it with the config it was trained with"
        )
    model.tie_weights()
    model.config.use_cache = True  # the exported model is for inference
    return model.eval(), tokenizer


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_readable(directory: Path) -> None:
    """Files as readable as the others the user writes (some writers create 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def export(
    run_dir: Path,
    out: Path,
    checkpoint: str | None = None,
    force: bool = False,
    merge: bool = False,
    dtype: str | None = None,
) -> Path:
    """Write the checkpoint as an HF model directory (atomically: `out` appears only when complete);
    a LoRA run's adapter alone, or with `merge` the base model with the adapter folded in. Weights are
    written in `dtype` (bf16, fp16, fp32; default: the run's training precision)."""
    if out.exists() and any(out.iterdir()) and not force:
        raise LmscaleError(f"{out} already exists and is not empty: choose another --out, or pass --force")
    if dtype is not None and dtype not in DTYPES:
        raise LmscaleError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    saved = run_config(run_dir)
    if merge and saved.finetune.lora is None:
        raise LmscaleError(f"{run_dir} is not a LoRA run (finetune.lora unset): export it without --merge")
    if not merge and saved.finetune.lora is not None and saved.model.path is None:
        # An adapter names its base by path; a preset's fresh weights are saved nowhere but in the checkpoint.
        raise LmscaleError(
            f"{run_dir} trained LoRA adapters on model.preset={saved.model.preset}, whose base weights exist only "
            "in the run: export it with --merge (base and adapter as one model)"
        )
    chosen = pick_checkpoint(run_dir, checkpoint)
    config = run_config(run_dir, chosen)
    model, tokenizer = load_trained_model(run_dir, chosen, config)
    if merge:
        model = model.merge_and_unload()
    model = model.to(DTYPES[dtype or config.precision])
    # The run's tokenizer was never told the model's length (transformers then says 1e30).
    positions = context_length(model.config)
    if positions is not None:
        tokenizer.model_max_length = positions
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    shutil.copyfile(config_file(run_dir, chosen), partial / RUN_CONFIG)
    if RunDir(run_dir).reference_logps.is_file():  # DPO: `lmscale eval` of the export scores like the run
        shutil.copyfile(RunDir(run_dir).reference_logps, RunDir(partial).reference_logps)
    make_readable(partial)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    log.info("export: %s -> %s", chosen, out)
    return chosen
