"""The universal form of a checkpoint written with AutoEP folded into AutoTP (parallel.expert with
parallel.tensor, ZeRO 1-2), so that it can resume on another layout.

DeepSpeed 0.19.8's ds_to_universal refuses these in three places, all about the routed experts: it lists them
among AutoTP's replicated parameters and then leaves them out of the tensor merge (its strict check stops on
the patterns nothing matched); it looks for each expert-parallel rank's ZeRO fragments among the data-parallel
ranks of tensor rank 0 (with folding, each tensor rank holds other experts: "ZeRO DP degree 1 is not
divisible by AutoEP size 2"); and it raises NotImplementedError for any tensor degree above 1. Everything else
it does is right for a folded checkpoint: the dense weights' tensor slices, their moments, the optimizer's
common state, the model-state files.

So this runs DeepSpeed's own conversion with those three steps replaced, and nothing else: the tensor merge
without the experts' patterns, and the experts' fp32 weights and Adam moments gathered by the owner each
ZeRO file names (DeepSpeed writes `folding` metadata into every optimizer file: its expert-parallel rank, and
for each routed expert its partition rank within the ranks that hold the same experts). The experts are
written as DeepSpeed writes them without folding (`zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`, all the
layer's experts stacked), which its universal loader splits for any expert degree. The `folding` entries are
dropped from the universal model-state files: they describe the writer's layout, which DeepSpeed's loader
would hold any folded runtime to (a universal state without them loads into one through
lmscale.parallel.autoep.universal_form_loads_into_folding). Checked in tests/parallel/
test_expert_parallel_runs.py: folded runs moved to one process, to another expert degree and to fewer folded
ranks repeat the steps of the runs they must equal.

Written against DeepSpeed 0.19.8 (the three functions it replaces: ds_to_universal's `_merge_tp_slice_files`,
autoep_universal's `consolidate_autoep_zero12_expert_states` and `get_autoep_zero12_fp32_fallback_param_names`);
a release that converts folded checkpoints itself makes it unnecessary.

    python -m lmscale.checkpointing.folded_universal --input_folder CKPT --output_folder CKPT/universal
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

# DeepSpeed's ZeRO-1/2 optimizer files: one per (data-parallel, tensor-parallel) rank ("bf16_" under bf16).
OPTIMIZER_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
STATES = ("fp32", "exp_avg", "exp_avg_sq")


def fragment_owners(checkpoint: Path) -> dict[str, dict[int, list[tuple[int, int]]]]:
    """For each routed expert parameter, its expert-parallel ranks' (tensor rank, data rank) files in
    partition order, from the `folding` metadata of each ZeRO file."""
    owners: dict[str, dict[int, dict[int, tuple[int, int]]]] = {}
    for path in checkpoint.iterdir():
        match = OPTIMIZER_FILE.fullmatch(path.name)
        if not match:
            continue
        dp_rank, tp_rank = int(match.group(1)), int(match.group(2))
        folding = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["folding"]
        for name, family in folding["param_families"].items():
            if family["family"] == "routed_expert":
                by_rank = owners.setdefault(name, {}).setdefault(folding["ep_rank"], {})
                by_rank[family["zero_partition_rank"]] = (tp_rank, dp_rank)
    return {
        name: {ep: [files[p] for p in sorted(files)] for ep, files in by_ep.items()}
        for name, by_ep in owners.items()
    }


def expert_rank_tensor(
    temp_dir: str, name: str, state: str, files: list[tuple[int, int]], shape
) -> torch.Tensor:
    """One expert-parallel rank's local experts of `name` for `state`, joined from its ZeRO partitions."""
    parts = []
    for tp_rank, dp_rank in files:
        path = os.path.join(temp_dir, name, str(tp_rank), f"{state}.{dp_rank:02d}")
        if os.path.isfile(path):  # a partition may hold none of this parameter
            parts.append(torch.load(path, map_location="cpu", weights_only=False).flatten())
    joined = torch.cat(parts) if parts else torch.empty(0)
    if joined.numel() != torch.Size(shape).numel():
        raise RuntimeError(
            f"folded expert {name}: {state} has {joined.numel()} elements, {tuple(shape)} expected"
        )
    return joined.reshape(shape)


def consolidate_folded_expert_states(checkpoint: Path) -> Callable:
    """Stands in for DeepSpeed's consolidate_autoep_zero12_expert_states (same arguments)."""
    from deepspeed.checkpoint.autoep_affine import autoep_metadata_to_affine_map
    from deepspeed.checkpoint.constants import CAT_DIM, EP_IS_EXPERT_PARAM, EP_NUM_EXPERTS, PARAM

    owners = fragment_owners(checkpoint)

    def consolidate(temp_dir, output_dir, expert_param_info, slice_shapes, *_args, **_kwargs) -> None:
        for name, metadata in expert_param_info.items():
            local_shape = tuple(slice_shapes[name])
            logical_shape = (metadata["num_experts"], *local_shape[1:])
            affine = None
            if metadata.get("expert_placement") is not None:
                affine = autoep_metadata_to_affine_map(metadata, logical_shape)
            by_rank = owners[name]
            if sorted(by_rank) != list(range(metadata["ep_size"])):
                raise RuntimeError(
                    f"folded expert {name}: ZeRO files for expert ranks {sorted(by_rank)} only"
                )
            out = os.path.join(output_dir, "zero", name)
            os.makedirs(out, exist_ok=True)
            for state in STATES:
                ranks = {}
                for ep_rank, files in by_rank.items():
                    shape = affine.shard_shapes[ep_rank] if affine is not None else local_shape
                    ranks[ep_rank] = expert_rank_tensor(temp_dir, name, state, files, shape)
                whole = (
                    affine.rebuild(ranks)
                    if affine is not None
                    else torch.cat([ranks[r] for r in sorted(ranks)])
                )
                torch.save(
                    {
                        PARAM: whole,
                        CAT_DIM: 0,
                        EP_IS_EXPERT_PARAM: True,
                        EP_NUM_EXPERTS: metadata["num_experts"],
                    },
                    os.path.join(out, f"{state}.pt"),
                )
            torch.save(adam_step(temp_dir, name, by_rank), os.path.join(out, "step.pt"))

    return consolidate


def adam_step(temp_dir: str, name: str, by_rank: dict[int, list[tuple[int, int]]]):
    """The Adam step count of `name`, from any partition holding part of it (all hold the same)."""
    for files in by_rank.values():
        for tp_rank, dp_rank in files:
            path = os.path.join(temp_dir, name, str(tp_rank), f"step.{dp_rank:02d}")
            if os.path.isfile(path):
                return torch.load(path, map_location="cpu", weights_only=False)
    raise RuntimeError(f"folded expert {name}: no optimizer step in any of its ZeRO partitions")


def merge_without_experts(merge: Callable) -> Callable:
    """DeepSpeed's tensor-slice merge, with the experts' names dropped from the patterns too (AutoTP lists them
    as replicated, and the strict check would stop on patterns that match nothing left to merge)."""

    def merged(args, uc_info, tp_degree, slice_shapes, temp_dir, exclude_param_names=None):
        excluded = exclude_param_names or set()

        def kept(patterns):
            return [p for p in patterns if not any(re.match(p, name) for name in excluded)]

        info = {key: kept(value) if _is_pattern_list(value) else value for key, value in uc_info.items()}
        return merge(args, info, tp_degree, slice_shapes, temp_dir, exclude_param_names)

    return merged


def _is_pattern_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def drop_folding_metadata(output: Path) -> None:
    """The universal model-state files without the writer's `folding` entry (see the module's doc)."""
    for path in output.glob("mp_rank_*_model_states.pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.pop("folding", None) is not None:
            torch.save(state, path)


def main() -> None:
    from deepspeed.checkpoint import autoep_universal
    from deepspeed.checkpoint import ds_to_universal as conversion

    args = conversion.parse_arguments()
    checkpoint = Path(args.input_folder)
    conversion._merge_tp_slice_files = merge_without_experts(conversion._merge_tp_slice_files)
    autoep_universal.consolidate_autoep_zero12_expert_states = consolidate_folded_expert_states(checkpoint)
    # Every expert's fp32 weights come from its ZeRO fragments above, never from the per-expert files.
    autoep_universal.get_autoep_zero12_fp32_fallback_param_names = lambda *_args, **_kwargs: set()
    conversion.main(args)
    drop_folding_metadata(Path(args.output_folder))


if __name__ == "__main__":
    main()
