"""The chunked next-token loss against the plain one: same sum, same gradients, fewer fp32 copies."""

import pytest
import torch

from lmscale.config import TrainConfig
from lmscale.data.batches import IGNORE_INDEX
from lmscale.errors import ConfigError
from lmscale.objectives.loss import chunked_token_loss, summed_loss, summed_token_loss


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


def test_a_mixture_of_experts_router_loss_is_reported_and_trained_as_hf_adds_it():
    from transformers import AutoModelForCausalLM, MixtralConfig

    from lmscale.data.batches import Batch, collate, target_count
    from lmscale.evaluation.held_out import ModelForward
    from lmscale.objectives.loss import cross_entropy_objective

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.02,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    tensors = collate([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]], pad_id=0)
    targets = target_count(tensors["labels"])
    batch = Batch(
        tensors, real_tokens=12, padded_tokens=12, sequences=2, sum_sq_len=72, local_targets=targets
    )
    engine = ModelForward(model)
    trained = cross_entropy_objective(router_loss=True)(engine, batch)
    reported = cross_entropy_objective()(engine, batch)
    hf = model(**{k: tensors[k] for k in ("input_ids", "attention_mask")}, labels=tensors["labels"])
    # HF's loss is the mean cross-entropy plus 0.02 x aux_loss; lmscale's, summed over the targets.
    torch.testing.assert_close(trained.summed / targets, hf.loss)
    torch.testing.assert_close(reported.summed / targets, hf.loss - 0.02 * hf.aux_loss)
    torch.testing.assert_close(reported.sums["router_aux_loss"] / targets, hf.aux_loss.detach())
