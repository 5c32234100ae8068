"""lmscale.checkpointing.folded_universal's own parts on files laid out as DeepSpeed 0.19.8 writes them: which
ZeRO files hold an expert rank's partitions (from their `folding` metadata), and one expert rank's tensor joined
from them in partition order. Real folded runs converted and resumed: tests/parallel/
test_expert_parallel_runs.py."""

import pytest
import torch

from lmscale.checkpointing.folded_universal import expert_rank_tensor, fragment_owners

EXPERT = "model.layers.0.mlp.experts.w1"


def write_optimizer_files(checkpoint, prefix=""):
    """2 data x 2 tensor ranks, experts split 2 ways: rank r = data * 2 + tensor holds expert rank r % 2, and
    the 2 ranks holding the same experts partition their states by data rank."""
    for data in (0, 1):
        for tensor in (0, 1):
            families = {
                "model.embed_tokens.weight": {"family": "dense", "zero_partition_rank": data},
                EXPERT: {"family": "routed_expert", "zero_partition_rank": data},
            }
            folding = {"ep_rank": (data * 2 + tensor) % 2, "param_families": families}
            name = f"{prefix}zero_pp_rank_{data}_mp_rank_{tensor:02d}_optim_states.pt"
            torch.save({"optimizer_state_dict": {}, "folding": folding}, checkpoint / name)


@pytest.mark.parametrize("prefix", ["", "bf16_"])  # bf16 runs write BF16_Optimizer's files
def test_each_expert_rank_is_found_in_its_zero_files_in_partition_order(tmp_path, prefix):
    write_optimizer_files(tmp_path, prefix)
    assert fragment_owners(tmp_path) == {EXPERT: {0: [(0, 0), (0, 1)], 1: [(1, 0), (1, 1)]}}


def test_an_expert_rank_tensor_joins_its_partitions_in_order(tmp_path):
    whole = torch.arange(24.0).reshape(2, 3, 4)  # the rank's 2 experts
    for tensor, data, part in ((1, 0, whole.flatten()[:10]), (1, 1, whole.flatten()[10:])):
        (tmp_path / EXPERT / str(tensor)).mkdir(parents=True, exist_ok=True)
        torch.save(part.clone(), tmp_path / EXPERT / str(tensor) / f"exp_avg.{data:02d}")
    files = [(1, 0), (1, 1)]
    assert torch.equal(expert_rank_tensor(str(tmp_path), EXPERT, "exp_avg", files, (2, 3, 4)), whole)
    # a partition that holds none of the parameter wrote no fragment; a missing piece is an error
    (tmp_path / EXPERT / "1" / "exp_avg.01").unlink()
    with pytest.raises(RuntimeError, match="exp_avg has 10 elements, \\(2, 3, 4\\) expected"):
        expert_rank_tensor(str(tmp_path), EXPERT, "exp_avg", files, (2, 3, 4))
