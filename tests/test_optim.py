import math

import pytest
import torch

from lmscale.config import TrainConfig
from lmscale.optim import build_scheduler, parameter_groups, warmup_cosine_lr


def test_warmup_is_linear_to_peak():
    values = [warmup_cosine_lr(s, lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100) for s in range(10)]
    assert values == pytest.approx([(s + 1) / 10 for s in range(10)])


def test_cosine_reaches_min_lr_and_its_midpoint():
    assert warmup_cosine_lr(10, 1.0, 0.1, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine_lr(60, 1.0, 0.1, 10, 110) == pytest.approx(0.55)
    assert warmup_cosine_lr(110, 1.0, 0.1, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine_lr(500, 1.0, 0.1, 10, 110) == pytest.approx(0.1)


def test_scheduler_follows_the_pure_function():
    train = TrainConfig(lr=0.5, min_lr=0.05, warmup_steps=3, max_steps=20)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    scheduler = build_scheduler(optimizer, train)
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [warmup_cosine_lr(s, 0.5, 0.05, 3, 20) for s in range(20)]
    assert seen == pytest.approx(expected)
    assert not any(math.isnan(v) for v in seen)


def test_no_decay_on_biases_norms_and_embeddings():
    model = torch.nn.ModuleDict(
        {
            "wte": torch.nn.Embedding(10, 4),
            "proj": torch.nn.Linear(4, 4),
            "ln": torch.nn.LayerNorm(4),
        }
    )
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4  # embedding, linear bias, norm weight and bias
