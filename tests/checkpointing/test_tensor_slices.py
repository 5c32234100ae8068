"""A tensor-parallel checkpoint's weights joined without DeepSpeed's universal conversion (which reads Adam's
moments only): by the affine maps AutoTP writes, here made with DeepSpeed's own map builders."""

import json

import pytest
import torch

from lmscale.checkpointing.export import consolidated_weights
from lmscale.checkpointing.rundir import RunDir
from lmscale.errors import LmscaleError


def tensor_parallel_checkpoint(path, whole, split_dims, replicated_on_rank_1=None):
    """Two ranks' model files as AutoTP writes them: each split weight's half, and its map."""
    from deepspeed.checkpoint.affine import contiguous_split_map

    path.mkdir()
    maps, modules = {}, [{}, {}]
    for name, weight in whole.items():
        dim = split_dims.get(name)
        if dim is None:
            modules[0][name] = weight.clone()
            modules[1][name] = weight.clone() if replicated_on_rank_1 is None else replicated_on_rank_1
            continue
        halves = weight.chunk(2, dim=dim)
        sizes = [half.shape[dim] for half in halves]
        maps["^" + name.replace(".", r"\.") + "$"] = contiguous_split_map(weight.shape, sizes, dim).to_dict()
        for rank, half in enumerate(halves):
            modules[rank][name] = half.clone()
    for rank, module in enumerate(modules):
        info = {"affine_map": {"version": 1, "params": maps}}
        torch.save(
            {"module": module, "universal_checkpoint_info": info},
            path / f"mp_rank_{rank:02d}_model_states.pt",
        )
    manifest = {"step": 1, "world_size": 2, "tensor": 2, "files": {}}
    RunDir.complete_marker(path).write_text(json.dumps(manifest))
    return path


def test_an_sgd_run_under_tensor_parallelism_exports_from_its_slices(tmp_path):
    generator = torch.Generator().manual_seed(0)
    whole = {
        "layers.0.q_proj.weight": torch.randn(8, 4, generator=generator),  # column-parallel: rows split
        "layers.0.o_proj.weight": torch.randn(4, 8, generator=generator),  # row-parallel: columns split
        "layers.0.norm.weight": torch.randn(4, generator=generator),  # replicated
    }
    split = {"layers.0.q_proj.weight": 0, "layers.0.o_proj.weight": 1}
    checkpoint = tensor_parallel_checkpoint(tmp_path / "step_00000001", whole, split)
    joined = consolidated_weights(checkpoint, zero_stage=1, optimizer="sgd")
    assert joined.keys() == whole.keys()
    assert all(torch.equal(joined[name], whole[name]) for name in whole)

    # A weight the ranks hold differently without a map of its split is not guessed at.
    bad = tensor_parallel_checkpoint(tmp_path / "bad", whole, split, replicated_on_rank_1=torch.zeros(4))
    with pytest.raises(LmscaleError, match="layers.0.norm.weight differs between the tensor-parallel ranks"):
        consolidated_weights(bad, zero_stage=1, optimizer="lion")
