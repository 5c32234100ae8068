"""The DeepSpeed config: generated from the lmscale config, or a DeepSpeed JSON reconciled with it.

One source of truth: a value in a `deepspeed_config` JSON that the lmscale config also sets must agree
with it (or be "auto"); lmscale keys the user did not set take the JSON's values.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from lmscale.config import Config, build_config
from lmscale.errors import ConfigError
from lmscale.methods import method_for
from lmscale.parallel.autoep import expert_parallel_section
from lmscale.parallel.layout import layout_problems
from lmscale.resources import find_file


def _json_precision(ds: dict) -> str | None:
    if ds.get("fp16", {}).get("enabled") in (True, "auto") and ds.get("bf16", {}).get("enabled") in (
        True,
        "auto",
    ):
        raise ConfigError("the deepspeed_config enables both fp16 and bf16: enable one of them")
    for name in ("fp16", "bf16"):
        enabled = ds.get(name, {}).get("enabled")
        if enabled == "auto":
            return "auto"
        if enabled:
            return name
    if "fp16" in ds or "bf16" in ds:
        return "fp32"
    return None


def _json_offload(ds: dict) -> str | None:
    zero = ds.get("zero_optimization", {})
    device = zero.get("offload_optimizer", {}).get("device")
    if device is None:
        return None
    return "none" if device == "none" else device


# lmscale key -> how to read it from a DeepSpeed JSON (None = the JSON does not set it)
JSON_KEYS = {
    "train.micro_batch_size": lambda ds: ds.get("train_micro_batch_size_per_gpu"),
    "train.grad_accum_steps": lambda ds: ds.get("gradient_accumulation_steps"),
    "train.global_batch_size": lambda ds: ds.get("train_batch_size"),
    "train.grad_clip": lambda ds: ds.get("gradient_clipping"),
    "zero.stage": lambda ds: ds.get("zero_optimization", {}).get("stage"),
    "zero.offload": _json_offload,
    "precision": _json_precision,
    "parallel.tensor": lambda ds: ds.get("tensor_parallel", {}).get("autotp_size"),
    "parallel.sequence": lambda ds: ds.get("sequence_parallel_size"),
    "parallel.expert": lambda ds: (
        ds.get("expert_parallel", {}).get("autoep_size")
        if ds.get("expert_parallel", {}).get("enabled")
        else None
    ),
}
# Sections lmscale builds itself; a JSON that sets them would silently fight the lmscale config.
LMSCALE_OWNED_SECTIONS = ("optimizer", "scheduler")


def read_deepspeed_json(path: str) -> dict[str, Any]:
    """Read a DeepSpeed JSON, looked up as given and then among the ones lmscale ships."""
    found = find_file(path)
    if not found.is_file():
        raise ConfigError(
            f"deepspeed_config={path} does not exist: use a file from ds_configs/, e.g. ds_configs/zero2_bf16.json"
        )
    try:
        ds = json.loads(found.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"deepspeed_config={path} line {exc.lineno} is not valid JSON: fix the syntax there"
        ) from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed_config={path} must hold a JSON object")
    owned = [s for s in LMSCALE_OWNED_SECTIONS if s in ds]
    if owned:
        raise ConfigError(
            f"deepspeed_config={path} sets {', '.join(owned)}: remove it; lmscale builds the optimizer and LR schedule from optim.* and schedule.*"
        )
    return ds


def _get(config: Config, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def reconcile(config: Config, explicit: set[str], ds: dict[str, Any], source: str) -> Config:
    """Adopt the JSON's values for keys the user left unset; a disagreement with a set key is an error."""
    raw = config.model_dump()
    conflicts = []
    for key, read in JSON_KEYS.items():
        json_value = read(ds)
        if json_value is None or json_value == "auto":
            continue
        ours = _get(config, key)
        if key in explicit and ours is not None and json_value != ours:
            conflicts.append(f"{key}={ours!r} but {source} says {json_value!r}")
        elif key not in explicit:
            section, _, leaf = key.rpartition(".")
            (raw[section] if section else raw)[leaf] = json_value
    if conflicts:
        raise ConfigError(
            "config and deepspeed_config disagree: "
            + "; ".join(conflicts)
            + ': make them agree or set the JSON value to "auto"'
        )
    return build_config(raw)


def settle_accumulation(
    config: Config, explicit: set[str], base: dict[str, Any] | None, data_ranks: int
) -> Config:
    """`train.global_batch_size` fixes the sequences an optimizer step holds: with it set and the
    accumulation not, the accumulation is what makes up that batch on these ranks, so a job resumed (or
    restarted by torchrun) on fewer or more ranks keeps its batch and its learning-rate schedule's meaning."""
    train = config.train
    json_accumulation = (base or {}).get("gradient_accumulation_steps") not in (None, "auto")
    if train.global_batch_size is None or "train.grad_accum_steps" in explicit or json_accumulation:
        check_batch_sizes(config, data_ranks)
        return config
    per_pass = train.micro_batch_size * data_ranks
    if train.global_batch_size % per_pass:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of micro_batch_size "
            f"{train.micro_batch_size} x {data_ranks} rank(s) = {per_pass}: change one of them or unset "
            "global_batch_size"
        )
    accumulation = train.global_batch_size // per_pass
    return config.model_copy(update={"train": train.model_copy(update={"grad_accum_steps": accumulation})})


def settle_muon_clipping(config: Config, explicit: set[str]) -> Config:
    """Muon under ZeRO 1-3 trains without gradient clipping unless the config asks for it, and then is refused.

    DeepSpeed 0.19.8's ZeRO orthogonalizes the Muon matrices' gradients before it measures the global norm, so
    the norm it clips by counts Muon's updates (each of norm ~sqrt(rows)), not the gradients: with clipping at
    1.0 every step shrank ~30x on a tiny GPT-2, and ZeRO-2 no longer matched ZeRO-0 (checked side by side;
    without clipping they agree step for step). Muon's own updates do not grow with the gradient, so clipping
    is not what keeps them in bounds."""
    if config.optim.name != "muon" or config.zero.stage == 0 or config.train.grad_clip == 0:
        return config
    if "train.grad_clip" in explicit:
        raise ConfigError(
            f"optim.name=muon under zero.stage={config.zero.stage} clips by a norm that counts Muon's "
            "orthogonalized updates (DeepSpeed 0.19.8), which shrinks its steps: set train.grad_clip=0 (Muon's "
            "default), or zero.stage=0"
        )
    return config.model_copy(update={"train": config.train.model_copy(update={"grad_clip": 0.0})})


def check_batch_sizes(config: Config, world_size: int) -> None:
    """train_batch_size = micro x accumulation x data-parallel ranks (`world_size`), as DeepSpeed requires."""
    train = config.train
    product = train.micro_batch_size * train.grad_accum_steps * world_size
    if train.global_batch_size is not None and train.global_batch_size != product:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} but micro_batch_size {train.micro_batch_size} x "
            f"grad_accum_steps {train.grad_accum_steps} x {world_size} rank(s) = {product}: "
            "change one of them or unset global_batch_size"
        )


def check_precision(precision: str, has_gpu: bool) -> None:
    # DeepSpeed's CPU accelerator has no fp16 kernels (it fails deep in initialize with
    # "Type fp16 is not supported on your device"), so refuse it up front with the fix.
    if precision == "fp16" and not has_gpu:
        raise ConfigError(
            "precision=fp16 needs a GPU and none was found: use precision=bf16 (or fp32) on CPU"
        )


def deepspeed_config(config: Config, world_size: int, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed config for this run on `world_size` ranks: `base` (a JSON) with every
    lmscale-controlled value filled in."""
    ds = copy.deepcopy(base or {})
    train = config.train
    ds["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    ds["gradient_accumulation_steps"] = train.grad_accum_steps
    # DeepSpeed checks this against every rank, tensor-parallel ones included (AutoTP's groups are made
    # after the config is read), but not sequence-parallel ones (it divides those out), unless AutoTP is on
    # too (then it is told nothing of the sequence groups: see lmscale.parallel.ulysses); lmscale's own
    # batches are planned for the data-parallel ranks.
    sequence_told = config.parallel.sequence if config.parallel.tensor == 1 else 1
    counted_ranks = world_size // sequence_told
    ds["train_batch_size"] = train.micro_batch_size * train.grad_accum_steps * counted_ranks
    ds["gradient_clipping"] = train.grad_clip
    ds.setdefault("steps_per_print", 10**9)  # lmscale does its own logging
    ds.setdefault("wall_clock_breakdown", False)
    ds["fp16"] = _fp16_section(ds.get("fp16", {})) if config.precision == "fp16" else {"enabled": False}
    # check_grad_overflow: DeepSpeed skips (and counts) a step whose gradients are not finite, as it does for fp16.
    ds["bf16"] = {"enabled": config.precision == "bf16", "check_grad_overflow": True}
    if config.optim.state_dtype == "bf16":
        ds["bf16"].update(bf16_master_weights_and_grads=True, bf16_optimizer_states=True)
    ds["zero_optimization"] = _zero_section(config, ds.get("zero_optimization", {}))
    if config.parallel.tensor > 1:
        # Full-vocabulary logits on every rank of the group: lmscale's losses (cross-entropy, DPO's
        # log-probabilities, the chunked loss) read whole rows; a vocabulary-split head would hand each
        # rank a slice of every row.
        autotp = {"autotp_size": config.parallel.tensor, "vocab_parallel_lm_head": False}
        ds["tensor_parallel"] = {**ds.get("tensor_parallel", {}), **autotp}
    else:
        ds.pop("tensor_parallel", None)
    if config.parallel.expert > 1:
        ds["expert_parallel"] = expert_parallel_section(config.parallel.expert, ds.get("expert_parallel"))
    else:
        ds.pop("expert_parallel", None)
    if sequence_told > 1:
        ds["sequence_parallel_size"] = sequence_told
    else:
        ds.pop("sequence_parallel_size", None)
    if config.optim.name != "adamw":
        # ZeRO partitions any torch optimizer; DeepSpeed only asks to be told it is not one of its own.
        ds["zero_allow_untested_optimizer"] = True
        if config.zero.offload == "cpu":  # it steps on the CPU copy like DeepSpeedCPUAdam would
            ds["zero_force_ds_cpu_optimizer"] = False
    leftover = [key for key, value in ds.items() if value == "auto"]
    if leftover:
        raise ConfigError(
            f'deepspeed_config sets {", ".join(leftover)} to "auto", which lmscale cannot fill: give a value'
        )
    return ds


# Dynamic loss scaling: loss_scale 0 means dynamic; start at 2^16, halve on overflow (after
# `hysteresis` overflows in a row), double after `loss_scale_window` clean steps.
FP16_DEFAULTS = {
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}


def _fp16_section(base: dict[str, Any]) -> dict[str, Any]:
    section = {k: v for k, v in base.items() if v != "auto"}
    return {**FP16_DEFAULTS, **section, "enabled": True}


def _zero_section(config: Config, base: dict[str, Any]) -> dict[str, Any]:
    zero = {k: v for k, v in base.items() if v != "auto"}
    zero["stage"] = config.zero.stage
    if config.optim.name == "muon" and config.zero.stage == 3:
        # ZeRO-3 orthogonalizes each whole gradient matrix before partitioning it, which its reduce-scatter
        # would skip (DeepSpeed refuses the two together).
        zero["reduce_scatter"] = False
    if config.zero.offload == "cpu":
        zero["offload_optimizer"] = {**zero.get("offload_optimizer", {}), "device": "cpu"}
        if config.zero.stage == 3:
            zero["offload_param"] = {**zero.get("offload_param", {}), "device": "cpu"}
    else:
        zero.pop("offload_optimizer", None)
        zero.pop("offload_param", None)
    return zero


def resolve(
    config: Config, explicit: set[str], world_size: int, has_gpu: bool
) -> tuple[Config, dict[str, Any]]:
    """Validate everything that depends on the DeepSpeed JSON and the world size; return config + DS config."""
    base = None
    if config.deepspeed_config:
        base = read_deepspeed_json(config.deepspeed_config)
        config = reconcile(config, explicit, base, config.deepspeed_config)
    parallel = config.parallel
    problems = layout_problems(parallel.tensor, parallel.sequence, world_size, parallel.expert)
    if problems:
        raise ConfigError("; ".join(problems))
    data_ranks = world_size // (parallel.tensor * parallel.sequence)
    config = settle_accumulation(config, explicit, base, data_ranks)
    config = settle_muon_clipping(config, explicit)
    problems = method_for(config.finetune).rank_rules(config, data_ranks)
    if problems:
        raise ConfigError("; ".join(problems))
    check_precision(config.precision, has_gpu)
    return config, deepspeed_config(config, world_size, base)
