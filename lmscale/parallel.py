"""How a job's ranks divide: data-parallel replicas of tensor-parallel groups (DeepSpeed AutoTP) or of
sequence-parallel groups (DeepSpeed Ulysses).

DeepSpeed lays both out over consecutive ranks: a tensor group (or a sequence group) is `tensor`
(`sequence`) consecutive ranks, so on one node it never crosses the network. Every rank of a tensor
group computes on the same batch with its own slice of the weights; the ranks of a sequence group
share one batch, each holding a contiguous slice of every row. Either way the batches are planned for
the data-parallel ranks only, and a batch counted on every rank is counted `copies` times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Layout:
    world_size: int = 1
    tensor: int = 1
    sequence: int = 1

    @property
    def group(self) -> int:
        """Ranks that compute one batch together (a tensor or a sequence group)."""
        return self.tensor * self.sequence

    @property
    def data(self) -> int:
        """Data-parallel ranks: the replicas that see different batches."""
        return self.world_size // self.group

    def data_rank(self, rank: int) -> int:
        return rank // self.group

    def tensor_rank(self, rank: int) -> int:
        return rank % self.tensor

    def sequence_rank(self, rank: int) -> int:
        return rank % self.sequence

    @property
    def copies(self) -> int:
        """Ranks holding each batch: a sum of whole-batch counts over all ranks is this many times too big."""
        return self.group

    def describe(self) -> str:
        if self.tensor > 1:
            return f"{self.data} data-parallel x {self.tensor} tensor-parallel rank(s)"
        if self.sequence > 1:
            return f"{self.data} data-parallel x {self.sequence} sequence-parallel rank(s)"
        return f"{self.world_size} data-parallel rank(s)"


def layout_problems(tensor: int, sequence: int, world_size: int) -> list[str]:
    if tensor > 1 and sequence > 1:
        return [
            f"parallel.tensor={tensor} with parallel.sequence={sequence}: DeepSpeed's AutoTP replaces the "
            "sequence-parallel groups with its own, so the two do not combine; use one of them (tensor for "
            "large models, sequence for long contexts)"
        ]
    degree, key = (tensor, "parallel.tensor") if tensor > 1 else (sequence, "parallel.sequence")
    if world_size % degree:
        return [
            f"{key}={degree} does not divide the job's {world_size} rank(s): launch a multiple of "
            f"{degree} ranks, or set {key} to a divisor of {world_size}"
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


def model_split_problems(model: Any, layout: Layout) -> list[str]:
    """Everything about the built model that rules out the layout's split, before DeepSpeed tries it."""
    if layout.group > 1 and getattr(model.config, "num_experts_per_tok", None):
        return [
            f"{model.config.model_type} is a mixture-of-experts model: lmscale trains those with data parallelism "
            "(ZeRO partitions the experts like any weight), not with parallel.tensor or parallel.sequence yet; "
            "set both to 1"
        ]
    if layout.tensor > 1:
        if not autotp_splits(model):
            return [
                f"parallel.tensor={layout.tensor}: DeepSpeed AutoTP cannot split {model.config.model_type} models: "
                "use a family with a tensor-parallel plan (e.g. model.preset=tiny-llama or a Llama/Mistral/Qwen "
                "model.path), or parallel.tensor=1"
            ]
        return split_problems(model.config, layout.tensor)
    if layout.sequence > 1:
        if model.config.model_type in ULYSSES_UNFIT:
            return [
                f"parallel.sequence={layout.sequence}: {model.config.model_type} attention does not fit DeepSpeed "
                "Ulysses (its output is reshaped for the local heads only): use a Llama-style family (e.g. "
                "model.preset=tiny-llama), or parallel.sequence=1"
            ]
        return head_split_problems(model.config, layout.sequence)
    return []


# Families whose attention was seen to break under Ulysses here (GPT-2 folds the heads back with its own
# shapes); Llama and Mistral are tested (tests/test_parallel_runs.py).
ULYSSES_UNFIT = ("gpt2",)


def head_split_problems(model_config: Any, sequence: int) -> list[str]:
    """Ulysses gives each rank of a sequence group whole attention heads: it must divide the head count,
    and the key-value heads must divide among the ranks or be replicated to them."""
    heads = next(
        getattr(model_config, a) for a in ("num_attention_heads", "n_head") if hasattr(model_config, a)
    )
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    problems = []
    if heads % sequence:
        problems.append(
            f"parallel.sequence={sequence} does not divide the model's {heads} attention heads: choose a "
            f"parallel.sequence that divides {heads}"
        )
    if kv_heads % sequence and sequence % kv_heads:
        problems.append(
            f"parallel.sequence={sequence} and the model's {kv_heads} key-value heads: one must divide the other; "
            "choose another parallel.sequence"
        )
    return problems
