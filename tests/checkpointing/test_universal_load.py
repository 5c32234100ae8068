"""What lmscale puts right after DeepSpeed loads a universal checkpoint (lmscale.checkpointing.checkpoint):
the module's buffers, and ZeRO-3's optimizer groups. The real loads are in tests/parallel/
test_expert_parallel_runs.py; here the state DeepSpeed 0.19.8 leaves, made by hand."""

import pytest
import torch

from lmscale.checkpointing.checkpoint import mend_zero3_universal_optimizer, restore_buffers
from lmscale.errors import LmscaleError


def three_groups():
    """lmscale's groups: no decay, decay, and an expert group named by its split."""
    params = [torch.nn.Parameter(torch.ones(2)) for _ in range(3)]
    optimizer = torch.optim.AdamW(
        [
            {"params": [params[0]], "weight_decay": 0.0},
            {"params": [params[1]], "weight_decay": 0.1},
            {"params": [params[2]], "weight_decay": 0.1, "name": "ep_size_1"},
        ],
        lr=0.1,
    )
    return params, optimizer


def test_each_zero_3_group_gets_its_own_step_counter_and_hyperparameters_back(tmp_path):
    params, optimizer = three_groups()
    saved_groups = [{**group, "params": [i]} for i, group in enumerate(optimizer.param_groups)]
    saved_groups[2]["name"] = "ep_size_2"  # the split it was saved with
    (tmp_path / "zero").mkdir()
    torch.save(
        {"optimizer_state_dict": {"state": {}, "param_groups": saved_groups}},
        tmp_path / "zero" / "optimizer_state.pt",
    )
    # As DeepSpeed's ZeRO-3 universal load leaves them: one step tensor in every state, the first group's
    # hyperparameters in every group.
    shared_step = torch.tensor(5.0)
    for param in params:
        optimizer.state[param] = {
            "step": shared_step,
            "exp_avg": torch.zeros(2),
            "exp_avg_sq": torch.zeros(2),
        }
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0

    mend_zero3_universal_optimizer(optimizer, tmp_path)
    for param in params:
        param.grad = torch.ones(2)
    optimizer.step()
    assert [optimizer.state[param]["step"].item() for param in params] == [6.0, 6.0, 6.0]
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.0, 0.1, 0.1]
    assert optimizer.param_groups[2]["name"] == "ep_size_1"  # the new layout's split
    # the same update, and the decay group's weight decayed by lr x 0.1 = 0.01, as saved
    assert torch.allclose(params[0].data - params[1].data, torch.full((2,), 0.01))


def test_buffers_come_back_from_the_model_states(tmp_path):
    model = torch.nn.BatchNorm1d(2)
    torch.save(
        {
            "module": {"running_mean": torch.tensor([1.0, 2.0]), "weight": torch.zeros(2)},
            "buffer_names": ["running_mean", "running_var"],  # running_var not saved: left as it is
        },
        tmp_path / "mp_rank_00_model_states.pt",
    )
    restore_buffers(model, tmp_path)
    assert model.running_mean.tolist() == [1.0, 2.0]
    assert model.running_var.tolist() == [1.0, 1.0]
    assert model.weight.tolist() == [1.0, 1.0]  # parameters are DeepSpeed's to load


def test_a_config_that_groups_the_parameters_another_way_is_refused(tmp_path):
    _, optimizer = three_groups()
    saved_groups = [{**group, "params": [i]} for i, group in enumerate(optimizer.param_groups[:2])]
    (tmp_path / "universal" / "zero").mkdir(parents=True)
    torch.save(
        {"optimizer_state_dict": {"state": {}, "param_groups": saved_groups}},
        tmp_path / "universal" / "zero" / "optimizer_state.pt",
    )
    with pytest.raises(LmscaleError, match="saved with 2 optimizer parameter groups and this config makes 3"):
        mend_zero3_universal_optimizer(optimizer, tmp_path / "universal")
