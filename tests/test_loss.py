"""The chunked next-token loss against the plain one: same sum, same gradients, fewer fp32 copies."""

import pytest
import torch

from lmscale.config import TrainConfig
from lmscale.data.batches import IGNORE_INDEX
from lmscale.errors import ConfigError
from lmscale.loss import chunked_token_loss, summed_loss, summed_token_loss


def logits_and_labels(dtype: torch.dtype, rows: int = 3, width: int = 37, vocab: int = 301):
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(rows, width, vocab, generator=generator)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (rows, width), generator=generator)
    labels[0, 20:] = IGNORE_INDEX  # padding
    labels[1, :5] = IGNORE_INDEX  # a masked prompt
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_and_gradients_equal_the_plain_ones(dtype):
    logits, labels = logits_and_labels(dtype)
    plain = summed_token_loss(logits, labels)
    (plain_grad,) = torch.autograd.grad(plain, logits)
    chunked = chunked_token_loss(logits, labels)
    (chunked_grad,) = torch.autograd.grad(chunked, logits)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-4)
    # The gradient is written in the logits' dtype either way (the plain path casts its fp32 one).
    assert chunked_grad.dtype == dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
    torch.testing.assert_close(chunked_grad, plain_grad, **tolerance)
    assert chunked_grad[0, 19:].abs().sum() == 0  # no gradient where there is no target


def test_chunked_loss_blocks_do_not_change_the_sum():
    from deepspeed.runtime.chunked_cross_entropy import chunked_cross_entropy

    logits, labels = logits_and_labels(torch.float32)
    rows, targets = logits.detach().reshape(-1, logits.size(-1)), labels.roll(-1, 1).reshape(-1)
    whole = chunked_cross_entropy(rows, targets, reduction="sum")
    torch.testing.assert_close(chunked_cross_entropy(rows, targets, reduction="sum", block_rows=7), whole)


def test_class_labels_ignore_the_chunked_switch():
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 2, IGNORE_INDEX, 1])
    torch.testing.assert_close(summed_loss(logits, labels, chunked=True), summed_loss(logits, labels))


def test_chunked_loss_refuses_label_smoothing():
    with pytest.raises(ValueError, match="train.chunked_loss has no label smoothing"):
        TrainConfig(chunked_loss=True, label_smoothing=0.1)


def test_chunked_loss_is_a_config_key():
    from lmscale.config import load_config

    assert load_config(None, ["train.chunked_loss=true"])[0].train.chunked_loss
    with pytest.raises(ConfigError, match="label smoothing"):
        load_config(None, ["train.chunked_loss=true", "train.label_smoothing=0.1"])
