"""How a job's ranks divide: data-parallel replicas of groups that compute one batch together, each
group `sequence` x `tensor` ranks (DeepSpeed Ulysses and AutoTP; either, or both).

Ranks are laid out data-major, then sequence, then tensor: rank = (d x sequence + s) x tensor + t. A tensor
group is `tensor` consecutive ranks, as DeepSpeed's AutoTP mesh makes it, so on one node it never crosses
the network; a sequence group is the ranks `tensor` apart within one data-parallel group. Every rank of a
tensor group computes on the same batch (or slice) with its own slice of the weights; the ranks of a
sequence group share one batch, each holding a contiguous slice of every row. The batches are planned for
the data-parallel ranks only, and a batch counted on every rank is counted `copies` times.

Expert parallelism (`expert`, DeepSpeed AutoEP) divides no batch: it splits each mixture-of-experts layer's
experts among `expert` consecutive data-parallel ranks (DeepSpeed's expert groups), so an expert's weights
are replicated only across the ranks holding the same share (`expert_rank`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmscale.parallel.autoep import expert_count


@dataclass(frozen=True)
class Layout:
    world_size: int = 1
    tensor: int = 1
    sequence: int = 1
    expert: int = 1

    @property
    def group(self) -> int:
        """Ranks that compute one batch together (tensor x sequence)."""
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
        return (rank // self.tensor) % self.sequence

    def expert_rank(self, rank: int) -> int:
        """Which share of the experts the rank holds (its place in DeepSpeed's consecutive expert group)."""
        return rank % self.expert

    @property
    def expert_copies(self) -> int:
        """Ranks holding each share of the experts: an expert group is `expert` consecutive ranks (across the
        tensor-parallel lanes too, as DeepSpeed folds AutoEP into AutoTP)."""
        return self.world_size // self.expert

    def sequence_groups(self) -> list[list[int]]:
        """Every sequence group's ranks, in the same order on every rank (for `new_group`)."""
        return [
            [(d * self.sequence + s) * self.tensor + t for s in range(self.sequence)]
            for d in range(self.data)
            for t in range(self.tensor)
        ]

    @property
    def copies(self) -> int:
        """Ranks holding each batch: a sum of whole-batch counts over all ranks is this many times too big."""
        return self.group

    def describe(self) -> str:
        parts = [f"{self.data} data-parallel"]
        parts += [f"{self.sequence} sequence-parallel"] if self.sequence > 1 else []
        parts += [f"{self.tensor} tensor-parallel"] if self.tensor > 1 else []
        experts = f", experts split {self.expert} ways" if self.expert > 1 else ""
        return " x ".join(parts) + " rank(s)" + experts


def layout_problems(tensor: int, sequence: int, world_size: int, expert: int = 1) -> list[str]:
    if world_size % (tensor * sequence) == 0:
        # AutoEP's expert groups are consecutive ranks; with tensor parallelism DeepSpeed folds them across
        # the tensor groups' lanes (auto_ep_folding), so the degree divides all ranks, not the replicas.
        ranks, what = (world_size, "") if tensor > 1 else (world_size // sequence, " data-parallel")
        if ranks % expert:
            return [
                f"parallel.expert={expert} does not divide the job's {ranks}{what} rank(s): launch a "
                f"multiple of {expert} ranks, or set parallel.expert to a divisor of {ranks}"
            ]
        return []
    if tensor > 1 and sequence > 1:
        return [
            f"parallel.tensor={tensor} x parallel.sequence={sequence} = {tensor * sequence} ranks per group does "
            f"not divide the job's {world_size} rank(s): launch a multiple of {tensor * sequence} ranks"
        ]
    degree, key = (tensor, "parallel.tensor") if tensor > 1 else (sequence, "parallel.sequence")
    return [
        f"{key}={degree} does not divide the job's {world_size} rank(s): launch a multiple of "
        f"{degree} ranks, or set {key} to a divisor of {world_size}"
    ]


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
    if (
        layout.tensor > 1
        and not autotp_splits(model)
        and not getattr(model.config, "num_experts_per_tok", None)
    ):
        return [
            f"parallel.tensor={layout.tensor}: DeepSpeed AutoTP cannot split {model.config.model_type} models: "
            "use a family with a tensor-parallel plan (e.g. model.preset=tiny-llama or a Llama/Mistral/Qwen "
            "model.path), or parallel.tensor=1"
        ]
    return config_split_problems(model.config, layout) or autoep_problems(model.config, layout.expert)


def moe_group_problems(model_config: Any, layout: Layout) -> list[str]:
    """A mixture-of-experts model splits its attention with AutoTP only while AutoEP splits its experts
    (DeepSpeed's AutoEP+AutoTP folding: each rank runs the same routed tokens' share of experts; AutoTP alone
    would leave every expert whole on every rank of a tensor group). Ulysses splits the rows of one with every
    expert on every rank; it is not folded into AutoEP's groups."""
    if layout.sequence > 1 and layout.expert > 1:
        return [
            f"parallel.sequence={layout.sequence} with parallel.expert={layout.expert}: lmscale splits a "
            "mixture-of-experts model's rows or its experts, not both yet; set parallel.expert=1 or "
            "parallel.sequence=1"
        ]
    if layout.tensor > 1 and layout.expert == 1:
        return [
            f"parallel.tensor={layout.tensor} splits a mixture-of-experts model's attention only together with "
            "its experts (DeepSpeed's AutoEP+AutoTP folding): set parallel.expert to a divisor of its experts "
            "and of the job's ranks, or parallel.tensor=1"
        ]
    return []


def config_split_problems(model_config: Any, layout: Layout) -> list[str]:
    """What the model's HF config alone rules out of the layout's split (checked by the launcher before any
    rank starts, and by every rank on the built model)."""
    if layout.expert > 1:
        problems = expert_split_problems(model_config, layout.expert)
        if problems:
            return problems
    if getattr(model_config, "num_experts_per_tok", None):
        problems = moe_group_problems(model_config, layout)
        if problems:
            return problems
    problems = split_problems(model_config, layout.tensor)
    if layout.sequence > 1:
        if model_config.model_type in ULYSSES_UNFIT:
            return [
                f"parallel.sequence={layout.sequence}: {model_config.model_type} attention does not fit DeepSpeed "
                "Ulysses (its output is reshaped for the local heads only): use a Llama-style family (e.g. "
                "model.preset=tiny-llama), or parallel.sequence=1"
            ]
        if not problems:  # the heads a tensor slice holds are what Ulysses deals out
            problems += head_split_problems(model_config, layout.sequence, layout.tensor)
    return problems


def expert_split_problems(model_config: Any, expert: int) -> list[str]:
    """`parallel.expert` needs a mixture-of-experts model whose expert count it divides."""
    experts = expert_count(model_config)
    if experts is None:
        return [
            f"parallel.expert={expert}: {model_config.model_type} is not a mixture-of-experts model: use one "
            "(e.g. model.preset=tiny-mixtral or tiny-qwen3-moe), or parallel.expert=1"
        ]
    if experts % expert:
        return [
            f"parallel.expert={expert} does not divide the model's {experts} experts per layer: choose a "
            f"parallel.expert that divides {experts}"
        ]
    return []


def autoep_problems(model_config: Any, expert: int) -> list[str]:
    """DeepSpeed's AutoEP converts the families it has a preset for; say so before it fails on another."""
    from lmscale.parallel.autoep import autoep_model_types

    if expert == 1:
        return []
    try:
        supported = autoep_model_types()
    except ImportError:  # AutoEP came with DeepSpeed 0.19
        return [
            f"parallel.expert={expert} needs DeepSpeed's AutoEP (0.19 or newer): pip install -U deepspeed"
        ]
    if model_config.model_type in supported:
        return []
    return [
        f"parallel.expert={expert}: DeepSpeed's AutoEP has no preset for {model_config.model_type} models "
        f"(it has {', '.join(sorted(supported))}): use one of those families, or parallel.expert=1"
    ]


# Families whose attention was seen to break under Ulysses here (GPT-2 folds the heads back with its own
# shapes); Llama and Mistral are tested (tests/parallel/test_parallel_runs.py).
ULYSSES_UNFIT = ("gpt2",)


def attention_heads(model_config: Any) -> tuple[int, int]:
    """(attention heads, key-value heads) of a model config."""
    heads = next(
        getattr(model_config, a) for a in ("num_attention_heads", "n_head") if hasattr(model_config, a)
    )
    return heads, getattr(model_config, "num_key_value_heads", None) or heads


def head_split_problems(model_config: Any, sequence: int, tensor: int = 1) -> list[str]:
    """`ulysses_split_problems` of a model config's heads (a tensor slice's share of them)."""
    heads, kv_heads = (count // tensor for count in attention_heads(model_config))
    whose = "the model's" if tensor == 1 else "each tensor slice's"
    return ulysses_split_problems(heads, kv_heads, sequence, whose)


def ulysses_split_problems(heads: int, kv_heads: int, sequence: int, whose: str = "the model's") -> list[str]:
    """Ulysses gives each rank of a sequence group whole attention heads: `sequence` must divide the head
    count, and the key-value heads must divide among the ranks or be replicated to them."""
    problems = []
    if heads % sequence:
        problems.append(
            f"parallel.sequence={sequence} does not divide {whose} {heads} attention heads: choose a "
            f"parallel.sequence that divides {heads}"
        )
    if kv_heads % sequence and sequence % kv_heads:
        problems.append(
            f"parallel.sequence={sequence} and {whose} {kv_heads} key-value heads: one must divide the other; "
            "choose another parallel.sequence"
        )
    return problems
