"""A tensor-parallel checkpoint's weights joined from the slices each tensor-parallel rank wrote.

DeepSpeed's universal conversion is lmscale's usual way to join them (it re-splits the optimizer states too),
but it reads Adam's moments of every parameter (`exp_avg`, `exp_avg_sq`: a KeyError for SGD, Lion,
Adafactor) and cannot read AutoEP folded into AutoTP (lmscale.checkpointing.folded_universal converts those for
a resume). For an export of those, the weights alone are joined here, by the
affine maps AutoTP records with each checkpoint (`universal_checkpoint_info["affine_map"]`: where each rank's
slice sits in the whole weight), with DeepSpeed's own `ParamAffineMap.rebuild`. The slices are the weights
the ranks computed with (a bf16 run's are bf16, widened here), not the fp32 master copies.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lmscale.errors import LmscaleError


def joined_tensor_slices(checkpoint: Path, tensor: int) -> dict[str, torch.Tensor]:
    """Every weight of the model files `mp_rank_00..` whole: split ones rebuilt by their affine map,
    replicated ones taken once after checking that the ranks agree."""
    try:
        from deepspeed.checkpoint.affine import ParamAffineMap
    except ImportError:  # setup.py allows DeepSpeed >= 0.15; 0.19.8 has the maps, older releases may not
        raise LmscaleError(
            f"{checkpoint}: joining its tensor-parallel slices needs DeepSpeed's affine maps (DeepSpeed 0.19.8 has "
            "them): pip install -U deepspeed"
        ) from None

    shards = [
        torch.load(checkpoint / f"mp_rank_{t:02d}_model_states.pt", weights_only=False, map_location="cpu")
        for t in range(tensor)
    ]
    maps = (shards[0].get("universal_checkpoint_info") or {}).get("affine_map", {}).get("params", {})
    weights = {}
    for name in shards[0]["module"]:
        pieces = {t: shard["module"][name] for t, shard in enumerate(shards)}
        pattern = next((p for p in maps if re.fullmatch(p, name)), None)
        if pattern is not None:
            weights[name] = ParamAffineMap.from_dict(maps[pattern]).rebuild(pieces).float()
        elif all(torch.equal(piece, pieces[0]) for piece in pieces.values()):
            weights[name] = pieces[0].float()  # replicated on every tensor-parallel rank
        else:
            raise LmscaleError(
                f"{checkpoint}: {name} differs between the tensor-parallel ranks and DeepSpeed recorded no map "
                "of its split: this checkpoint cannot be exported; resume it on the layout that wrote it"
            )
    return weights
