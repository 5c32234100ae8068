import math

import pytest
import torch

from lmscale.config import Config, build_config
from lmscale.errors import ConfigError
from lmscale.training.schedules import SCHEDULES, build_scheduler, lr_at, lr_curve


def lr_config(lr: float = 1.0, max_steps: int = 110, **schedule) -> Config:
    schedule = {"min_lr": 0.1, "warmup_steps": 10, **schedule}
    return build_config({"optim": {"lr": lr}, "schedule": schedule, "train": {"max_steps": max_steps}})


def curve(**schedule):
    return lr_curve(lr_config(**schedule))


def test_every_schedule_warms_up_linearly_to_the_peak():
    for name in SCHEDULES:
        options = {"lr_points": [[10, 1.0], [110, 0.0]]} if name == "piecewise" else {}
        values = curve(name=name, **options)
        assert values[:10] == pytest.approx([(s + 1) / 10 for s in range(10)]), name
        assert values[10] == pytest.approx(1.0), name


def test_constant_linear_and_cosine():
    assert curve(name="constant")[10:] == pytest.approx([1.0] * 100)
    linear = curve(name="linear")
    assert linear[60] == pytest.approx(0.55) and linear[109] == pytest.approx(1.0 - 0.9 * 0.99)
    cosine = curve(name="cosine")
    assert cosine[60] == pytest.approx(0.55) and lr_at(110, lr_config()) == pytest.approx(0.1)


def test_min_lr_ratio_and_warmup_fraction_scale_with_the_run():
    """A fine-tune of a recipe: the floor follows the LR and the warm-up the run's length."""
    values = lr_curve(lr_config(lr=3e-4, max_steps=20, min_lr=2e-4, warmup_steps=25, min_lr_ratio=0.1,
                                warmup_fraction=0.1))  # fmt: skip
    assert values[:2] == pytest.approx([1.5e-4, 3e-4])  # 2 warm-up steps, not the recipe's 25
    assert lr_at(
        20, lr_config(lr=3e-4, max_steps=20, min_lr_ratio=0.1, warmup_fraction=0.1)
    ) == pytest.approx(3e-5)
    assert min(values) > 3e-5 and values[-1] < 0.2 * 3e-4
    # without them the recipe's floor is most of the peak, and its warm-up refuses a 20-step run
    assert lr_at(20, lr_config(lr=3e-4, max_steps=20, min_lr=2e-4, warmup_steps=2)) == pytest.approx(2e-4)
    with pytest.raises(ConfigError, match="schedule.warmup_fraction"):
        lr_config(lr=3e-4, max_steps=20, warmup_steps=25)


def test_cosine_restarts_jump_back_to_the_peak_with_growing_cycles():
    values = curve(name="cosine_restarts", restart_period=20, restart_mult=2.0)
    assert values[10] == values[30] == values[70] == pytest.approx(1.0)  # cycles of 20, then 40
    assert values[20] == pytest.approx(0.55)  # halfway through the first cycle
    assert values[50] == pytest.approx(0.55)  # halfway through the second
    assert values[29] < 0.11


def test_step_and_exponential_decay():
    step = curve(name="step", decay_every=30, decay_gamma=0.5)
    assert step[39] == 1.0 and step[40] == 0.5 and step[70] == 0.25 and step[100] == 0.125
    exponential = curve(name="exponential")
    assert exponential[60] == pytest.approx(0.1**0.5)  # geometric: halfway in log space
    assert exponential[20] / exponential[10] == pytest.approx(exponential[30] / exponential[20])


def test_piecewise_interpolates_linearly_between_points():
    values = curve(name="piecewise", lr_points=[[10, 1.0], [60, 0.5], [80, 0.5], [100, 0.0]])
    assert values[35] == pytest.approx(0.75)
    assert values[70] == pytest.approx(0.5)
    assert values[90] == pytest.approx(0.25)
    assert values[105] == 0.0  # held after the last point


def test_cyclic_triangular_and_triangular2():
    tri = curve(name="cyclic", cycle_steps=10, warmup_steps=0)
    assert tri[0] == pytest.approx(0.1) and tri[5] == pytest.approx(0.55) and tri[10] == pytest.approx(1.0)
    assert tri[20] == pytest.approx(0.1) and tri[30] == pytest.approx(1.0)
    tri2 = curve(name="cyclic", cycle_steps=10, cycle_mode="triangular2", warmup_steps=0)
    assert (
        tri2[10] == pytest.approx(1.0)
        and tri2[30] == pytest.approx(0.55)
        and tri2[50] == pytest.approx(0.325)
    )


def test_wsd_is_stable_then_decays_linearly_at_the_end():
    values = curve(name="wsd", decay_fraction=0.2)
    assert values[10:90] == pytest.approx([1.0] * 80)
    assert values[100] == pytest.approx(0.55)
    assert values[90] == pytest.approx(1.0)


def test_the_torch_scheduler_follows_the_pure_function_for_every_group():
    train = lr_config(lr=0.5, max_steps=20, min_lr=0.05, warmup_steps=3, name="wsd")
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": params[:1], "lr": 0.5}, {"params": params[1:], "lr": 0.25}])
    scheduler = build_scheduler(optimizer, train)
    seen = []
    for _ in range(20):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert [s[0] for s in seen] == pytest.approx(lr_curve(train))
    assert [s[1] for s in seen] == pytest.approx([v / 2 for v in lr_curve(train)])  # layer ratios kept
    assert not any(math.isnan(v) for s in seen for v in s)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"schedule": {"name": "piecewise"}}, "needs schedule.lr_points"),
        ({"schedule": {"name": "piecewise", "lr_points": [[50, 1.0], [10, 0.5]]}}, "steps must ascend"),
        ({"schedule": {"name": "triangle"}}, "schedule.name"),
        ({"optim": {"name": "adam8bit"}}, "optim.name"),
        ({"optim": {"lr": -1.0}}, "optim.lr"),
        ({"schedule": {"warmup_steps": 300}}, "shorten the warm-up"),
        ({"optim": {"lr": 1e-4}, "schedule": {"min_lr": 1e-3}}, "schedule.min_lr=0.001 exceeds optim.lr"),
        ({"optim": {"layer_lr_decay": 1.5}}, "optim.layer_lr_decay"),
    ],
)
def test_bad_schedule_and_optimizer_settings_are_named(raw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_config(raw)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("lr", "optim.lr"),
        ("optimizer", "optim.name"),
        ("scheduler", "schedule.name"),
        ("warmup_steps", "schedule.warmup_steps"),
        ("save_every", "checkpoint.save_every"),
        ("resume", "checkpoint.resume"),
    ],
)
def test_a_key_from_before_the_sections_names_its_new_home(old, new):
    with pytest.raises(ConfigError, match=f"train.{old} is now {new}: rename it"):
        build_config({"train": {old: 1}})


def test_every_schedule_and_optimizer_name_is_a_config_choice():
    from typing import get_args

    from lmscale.training.optimizers import OPTIMIZERS

    assert get_args(Config.model_fields["schedule"].annotation.model_fields["name"].annotation) == tuple(
        SCHEDULES
    )  # the config names them without importing the registries (config/training.py)
    assert get_args(Config.model_fields["optim"].annotation.model_fields["name"].annotation) == tuple(
        OPTIMIZERS
    )
