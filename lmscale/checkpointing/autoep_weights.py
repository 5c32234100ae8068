"""The weights of a checkpoint with AutoEP's MoE layers (parallel.expert), in the HF model's names and shapes.

AutoEP (DeepSpeed 0.19) replaces each MoE block's router and experts with its own layer: `router.gate` (also
reachable as `gate.gate`) and grouped experts `experts.w1` (gate projection), `experts.w3` (up projection),
`experts.w2` (down projection), each [experts, out, in]. transformers 5's Mixtral and Qwen3-MoE keep the gate
and up projections fused, `experts.gate_up_proj` [experts, 2 x width, hidden] (gate rows first, as
DeepSpeed's own repacking reads them: deepspeed/moe/ep_repack.py), and `experts.down_proj`; DeepSeek-V3's
router keeps its routing bias beside its weight, `gate.e_score_correction_bias` (AutoEP copies it into
`router.e_score_correction_bias`), and its shared expert keeps its HF names. DeepSpeed writes
no HF export of its layers, so lmscale folds them back here; the HF model's own shapes are the check.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lmscale.checkpointing.tensor_slices import joined_tensor_slices
from lmscale.errors import LmscaleError

# One file per layer and expert, named by the tensor-parallel rank that wrote it (folded into AutoTP, each
# tensor-parallel rank writes its own experts).
EXPERT_FILE = re.compile(r"layer_\d+_expert_\d+_mp_rank_\d+_model_states\.pt")
EXPERT_SLICE = re.compile(r"(.*\.experts\.w[123])\.(\d+)$")


def zero0_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A ZeRO-0 checkpoint's weights: the shared ones from the model file, each expert's from its own file
    (DeepSpeed writes one per layer and expert, `<...>.experts.w1.<expert>`), stacked in expert order."""
    states = torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")
    weights = {name: tensor.float() for name, tensor in states["module"].items()}
    return {**weights, **expert_weights(checkpoint)}


def folded_weights(checkpoint: Path, tensor: int) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint written with AutoEP folded into AutoTP (parallel.expert with
    parallel.tensor): the tensor slices joined (lmscale.checkpointing.tensor_slices), the experts from their
    own files.

    For the checkpoints without a universal form: lmscale.checkpointing.folded_universal converts a folded
    checkpoint's Adam states (an export then reads the fp32 master weights from it), not other optimizers'.
    """
    return {**joined_tensor_slices(checkpoint, tensor), **expert_weights(checkpoint)}


def expert_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Each layer's grouped experts from their own files (`<...>.experts.w1.<expert>`), stacked in expert
    order."""
    weights = {}
    slices: dict[str, dict[int, torch.Tensor]] = {}
    for path in sorted(checkpoint.iterdir()):
        if not EXPERT_FILE.fullmatch(path.name):
            continue
        for name, tensor in torch.load(path, weights_only=True, map_location="cpu").items():
            match = EXPERT_SLICE.fullmatch(name)
            if match:
                slices.setdefault(match.group(1), {})[int(match.group(2))] = tensor.float()
    for name, by_expert in slices.items():
        weights[name] = torch.stack([by_expert[e] for e in sorted(by_expert)])
    return weights


def to_hf_names(
    weights: dict[str, torch.Tensor], hf_shapes: dict[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """AutoEP's layer weights as the HF model's: `hf_shapes` is the HF model's state dict shapes."""
    out = {}
    for name, tensor in weights.items():
        if name.endswith(".gate.gate.weight") and name.replace(".gate.gate.", ".router.gate.") in weights:
            continue  # the router's second name
        if name.endswith((".experts.w1", ".experts.w3")):
            continue  # folded with its partner below
        if name.endswith(".router.gate.weight"):
            out[name.replace(".router.gate.", ".gate.")] = tensor
        elif name.endswith(".router.e_score_correction_bias"):  # DeepSeek-V3's routing bias (a buffer)
            out[name.replace(".router.", ".gate.")] = tensor
        elif name.endswith(".experts.w2"):
            out[name[: -len("w2")] + "down_proj"] = tensor
        else:
            out[name] = tensor
        if name.endswith(".experts.w2"):
            prefix = name[: -len("w2")]
            out[prefix + "gate_up_proj"] = torch.cat([weights[prefix + "w1"], weights[prefix + "w3"]], dim=1)
    return {name: fit_shape(name, tensor, hf_shapes) for name, tensor in out.items()}


def fit_shape(name: str, tensor: torch.Tensor, hf_shapes: dict[str, torch.Size]) -> torch.Tensor:
    """The tensor in the HF model's layout: as it is, or with its last two dimensions swapped (transformers'
    other fused-experts layout, [experts, in, out])."""
    expected = hf_shapes.get(name)
    if expected is None or tensor.shape == expected:
        return tensor
    if tensor.dim() == 3 and tensor.transpose(1, 2).shape == expected:
        return tensor.transpose(1, 2).contiguous()
    raise LmscaleError(
        f"the checkpoint's {name} has shape {tuple(tensor.shape)} where the HF model has {tuple(expected)}: "
        "export it with the transformers version it was trained with"
    )
