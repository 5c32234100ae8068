"""Expert parallelism (`parallel.expert`) through DeepSpeed's AutoEP: the DeepSpeed config section, which
parameters are experts, and a narrow adapter for a transformers change AutoEP does not know yet.

AutoEP replaces each mixture-of-experts block with its own layer (a router, and grouped experts of which a
rank holds `experts / degree`); tokens go to their experts' rank and back by all-to-all. The ranks of an
expert group are data-parallel ranks: each computes its own batches.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

# Config attributes that hold a mixture-of-experts model's expert count, by family.
EXPERT_COUNT_ATTRIBUTES = ("num_local_experts", "num_experts", "n_routed_experts")


def expert_count(model_config: Any) -> int | None:
    """How many experts each MoE layer of the model has (None for a dense model)."""
    if not getattr(model_config, "num_experts_per_tok", None):
        return None
    return next(
        (getattr(model_config, a) for a in EXPERT_COUNT_ATTRIBUTES if getattr(model_config, a, None)), None
    )


def autoep_model_types() -> set[str]:
    """The HF model types DeepSpeed's AutoEP has a preset for (Mixtral, Qwen3-MoE, DeepSeek V2/V3, ...)."""
    from deepspeed.module_inject.auto_ep_presets.registry import PRESET_MODELS

    return {model_type for preset in PRESET_MODELS.values() for model_type in preset.hf_model_types}


def expert_parallel_section(degree: int, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """DeepSpeed's `expert_parallel` section for `degree` (a JSON's other AutoEP keys kept). The preset is
    left for AutoEP to choose from the model's type; lmscale checks that it has one before DeepSpeed starts."""
    return {**(base or {}), "enabled": True, "autoep_size": degree}


def is_expert_parameter(param: Any) -> bool:
    """An expert's weight under AutoEP: held by one rank of each expert group, not replicated on all."""
    from deepspeed.moe.utils import is_moe_param

    return is_moe_param(param)


def autoep_degree(ds_config: dict[str, Any]) -> int | None:
    """The experts' split under AutoEP (1: AutoEP's layers with every expert on every rank, as a run resumed
    from an expert-parallel checkpoint without expert parallelism has them), or None with AutoEP off."""
    section = ds_config.get("expert_parallel", {})
    return int(section.get("autoep_size", 1)) if section.get("enabled") else None


@contextlib.contextmanager
def transformers_registry_accepts_names() -> Iterator[None]:
    """While AutoEP converts a model: transformers' output-capture registry also looks entries up by name.

    Why: transformers 5 keeps each model class's `_can_record_outputs` in `utils.output_capturing.
    _CAN_RECORD_REGISTRY`, a dict subclass whose `get(model)` and `__setitem__(model, ...)` take a *model* and
    key by `str(model.__class__)`. DeepSpeed 0.19.8's AutoEP (`module_inject/auto_ep_presets/base.py`, when it
    retargets the router-logit recorders) uses it as the plain dict of class names it was in transformers 4:
    `registry.get(name, default)` (TypeError: takes 2 positional arguments but 3 were given), and
    `registry[name] = entry` when it restores an entry (which would be filed under "<class 'str'>").

    Covers: transformers 5.23-5.25 with DeepSpeed 0.19.8 (checked in both sources; no DeepSpeed release
    fixes it yet). Only a registry of that shape is touched, only for the duration of the block, and only
    string keys behave differently: a model key does what transformers does.
    """
    try:
        from transformers.utils import output_capturing
    except ImportError:  # transformers 4: a plain dict, nothing to adapt
        yield
        return
    registry = getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)
    if registry is None or not _keys_by_model(type(registry)):
        yield
        return
    original = type(registry)
    registry.__class__ = _accepting_names(original)
    try:
        yield
    finally:
        registry.__class__ = original


@contextlib.contextmanager
def universal_form_loads_into_folding() -> Iterator[None]:
    """While a universal checkpoint loads: DeepSpeed's check of AutoEP+AutoTP folding metadata passes a state
    that carries none.

    Why: DeepSpeed 0.19.8 (`engine._load_checkpoint`) holds a folded runtime's checkpoint to the folding
    metadata its writer recorded (tensor and expert degree and ranks, and the data-parallel partition count),
    universal checkpoints too, and raises "Missing AutoEP+AutoTP folding metadata in folded checkpoint" when
    there is none. That is right for a checkpoint whose ZeRO partitions load as they were written, and wrong for
    the universal form, which holds every weight and moment whole (lmscale.checkpointing.folded_universal
    writes it without the metadata) and which the optimizer re-partitions for the ranks there are. A state
    that carries folding metadata is still checked as DeepSpeed checks it.
    """
    from deepspeed.checkpoint.constants import FOLDING_METADATA_KEY
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine.__dict__["_validate_autoep_folding_checkpoint_metadata"]

    def validate(state, **kwargs):
        if isinstance(state, dict) and FOLDING_METADATA_KEY not in state:
            return None
        return original.__func__(state, **kwargs)

    DeepSpeedEngine._validate_autoep_folding_checkpoint_metadata = staticmethod(validate)
    try:
        yield
    finally:
        DeepSpeedEngine._validate_autoep_folding_checkpoint_metadata = original


@contextlib.contextmanager
def without_route_scale_echo() -> Iterator[None]:
    """While AutoEP converts a model: its warning that the model's `routed_scaling_factor` "overrides
    route_scale" is dropped when both are the same number.

    Why: DeepSpeed 0.19.8's AutoEP copies the HF config's `routed_scaling_factor` into its own `route_scale`
    (`auto_ep_config.py`), then warns that the one overrides the other (`auto_ep.py`, `_resolve_route_scale`):
    once per MoE layer and rank of every DeepSeek-V3 run, about a value nobody set. A DeepSpeed JSON that sets
    both `routed_scaling_factor` and another `route_scale` is still warned about.
    """
    from deepspeed.utils import logger

    echo = _RouteScaleEcho()
    logger.addFilter(echo)
    try:
        yield
    finally:
        logger.removeFilter(echo)


class _RouteScaleEcho(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if "overrides route_scale" not in str(record.msg) or len(record.args or ()) != 2:
            return True
        given, route_scale = record.args  # type: ignore[misc]
        try:
            return float(given) != float(route_scale)
        except (TypeError, ValueError):
            return True


def _keys_by_model(registry_class: type) -> bool:
    """Whether the registry's `get` is transformers 5's one-argument, model-keyed form."""
    get = registry_class.__dict__.get("get")
    return get is not None and len(inspect.signature(get).parameters) == 2


def _accepting_names(registry_class: type) -> type:
    class RegistryAcceptingNames(registry_class):
        def get(self, key: Any, *default: Any) -> Any:
            if isinstance(key, str):
                return dict.get(self, key, *default)
            return super().get(key)

        def __setitem__(self, key: Any, value: Any) -> None:
            if isinstance(key, str):
                dict.__setitem__(self, key, value)
            else:
                super().__setitem__(key, value)

    return RegistryAcceptingNames


def count_folded_experts_on_every_rank(optimizer: Any) -> None:
    """ZeRO 1-2's gradient norm counts each rank's own experts when AutoEP is folded into AutoTP.

    Why: DeepSpeed 0.19.8's `DeepSpeedZeroOptimizer.get_grad_norm_direct` adds a parameter that is not
    tensor-parallel only on tensor-parallel rank 0, as the copy every tensor-parallel rank holds. Folded experts
    are not such copies: the tensor-parallel ranks hold different experts (the expert group spans them), so
    the experts of ranks 1.. are left out of the norm, and clipping scales every gradient by a wrong factor
    (2 ranks, tiny-mixtral: norm 2.020 for 2.038; the losses of SGD then differ from one process's from step 2).
    ZeRO-3 counts them (`_grad_norm_counts_every_rank`); this does the same for ZeRO 1-2's expert groups
    only, whose partitions the norm's all-reduces (data-parallel, then tensor-parallel group) then add once
    each. Covers DeepSpeed 0.19.8 (no release fixes it yet); a group of other parameters is left as it is.
    """
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        return  # ZeRO-3 and DeepSpeed's bf16 optimizer count experts on every rank already
    direct = optimizer.get_grad_norm_direct

    def norm_counting_experts(gradients: list, params: list, norm_type: float = 2) -> Any:
        if not params or not all(is_moe_param(p) for p in params):
            return direct(gradients, params, norm_type)
        rank, optimizer.model_parallel_rank = optimizer.model_parallel_rank, 0
        try:
            return direct(gradients, params, norm_type)
        finally:
            optimizer.model_parallel_rank = rank

    optimizer.get_grad_norm_direct = norm_counting_experts
