"""How a job's ranks divide: data-parallel replicas of tensor-parallel groups (DeepSpeed AutoTP).

DeepSpeed lays AutoTP out as a (data, tensor) mesh over the ranks in order, so a tensor group is
`tensor` consecutive ranks. Every rank of a tensor group computes on the same batch with its own
slice of the weights: the batches are planned for the data-parallel ranks only, and a sum over all
ranks counts every batch `tensor` times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Layout:
    world_size: int = 1
    tensor: int = 1

    @property
    def data(self) -> int:
        """Data-parallel ranks: the replicas that see different batches (ZeRO partitions over these)."""
        return self.world_size // self.tensor

    def data_rank(self, rank: int) -> int:
        return rank // self.tensor

    def tensor_rank(self, rank: int) -> int:
        return rank % self.tensor

    @property
    def copies(self) -> int:
        """Ranks holding each batch: a sum of batch counts over all ranks is this many times too big."""
        return self.tensor

    def describe(self) -> str:
        if self.tensor == 1:
            return f"{self.world_size} data-parallel rank(s)"
        return f"{self.data} data-parallel x {self.tensor} tensor-parallel rank(s)"


def layout_problems(tensor: int, world_size: int) -> list[str]:
    if world_size % tensor:
        return [
            f"parallel.tensor={tensor} does not divide the job's {world_size} rank(s): launch a multiple of "
            f"{tensor} ranks, or set parallel.tensor to a divisor of {world_size}"
        ]
    return []


# Model config attributes whose values the tensor-parallel split divides, by what they count.
SPLIT_SIZES = {
    "attention heads": ("num_attention_heads", "n_head"),
    "key-value heads": ("num_key_value_heads",),
    "MLP width": ("intermediate_size", "n_inner"),
}


def autotp_splits(model: Any) -> bool:
    """Whether DeepSpeed's AutoTP training can split this model: it follows the model's HF tensor-parallel
    plan (`base_model_tp_plan`: Llama, Mistral, Qwen and most recent families), or else its own layer
    heuristics, which refuse some families (GPT-2's fused q/k/v among them)."""
    if getattr(model.config, "base_model_tp_plan", None):
        return True
    from deepspeed.module_inject.auto_tp import AutoTP

    try:
        return bool(AutoTP.supported(model))
    except AssertionError:  # "Not able to determine model policy automatically"
        return False


def split_problems(model_config: Any, tensor: int) -> list[str]:
    """Sizes the tensor split must divide evenly (AutoTP would otherwise shard attention unevenly or fail)."""
    if tensor == 1:
        return []
    problems = []
    for what, attributes in SPLIT_SIZES.items():
        value = next((getattr(model_config, a) for a in attributes if getattr(model_config, a, None)), None)
        if value is not None and value % tensor:
            problems.append(
                f"parallel.tensor={tensor} does not divide the model's {value} {what}: choose a parallel.tensor "
                f"that divides {value}"
            )
    return problems


def model_split_problems(model: Any, tensor: int) -> list[str]:
    """Everything about the built model that rules out a `tensor`-way split, before DeepSpeed tries it."""
    if tensor == 1:
        return []
    if not autotp_splits(model):
        return [
            f"parallel.tensor={tensor}: DeepSpeed AutoTP cannot split {model.config.model_type} models: use a "
            "family with a tensor-parallel plan (e.g. model.preset=tiny-llama or a Llama/Mistral/Qwen model.path), "
            "or parallel.tensor=1"
        ]
    return split_problems(model.config, tensor)
