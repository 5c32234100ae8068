"""The output layer fused into the loss: same loss and gradients as the plain loss over whole logits."""

import copy

import pytest
import torch
from helpers import tiny_gpt2_config
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

from lmscale.data.batches import IGNORE_INDEX, Batch, collate, sequence_slice
from lmscale.objectives.fused_head import fused_head_problem, has_fused_head, install_fused_head
from lmscale.objectives.loss import cross_entropy_objective

VOCAB = 97


class ModelEngine:
    """What the objective reads of a DeepSpeed engine (module, device, forward), for one process."""

    def __init__(self, model: torch.nn.Module):
        self.module, self.device = model, torch.device("cpu")

    def __call__(self, **inputs):
        return self.module(**inputs)


def tiny_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=2)
    if family == "gpt2":
        config = tiny_gpt2_config(VOCAB)
    else:
        config = LlamaConfig(hidden_size=32, intermediate_size=64, tie_word_embeddings=False, **shape)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()


def a_batch(sequence_parallel: bool = False):
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (30, 17, 24)]
    tensors = collate(rows, pad_id=0)
    tensors["labels"][2, :6] = IGNORE_INDEX  # a masked prompt
    if sequence_parallel:  # the second of two slices: its labels are each position's next token
        tensors = sequence_slice(tensors, 0, 1, 2)
    counts = dict(real_tokens=71, padded_tokens=90, sequences=3, sum_sq_len=0, local_targets=1)
    return Batch(tensors, **counts, labels_aligned=sequence_parallel)


def loss_and_grads(model: torch.nn.Module, batch, chunked: bool):
    model.zero_grad()
    parts = cross_entropy_objective(chunked=chunked)(ModelEngine(model), batch)
    parts.summed.backward()
    return parts.summed.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_fused_loss_and_gradients_equal_the_plain_ones(family, sequence_parallel):
    plain_model = tiny_model(family)
    fused_model = copy.deepcopy(plain_model)
    assert fused_head_problem(fused_model) is None
    install_fused_head(fused_model)
    assert has_fused_head(fused_model) and not has_fused_head(plain_model)
    batch = a_batch(sequence_parallel)
    plain_loss, plain_grads = loss_and_grads(plain_model, batch, chunked=False)
    fused_loss, fused_grads = loss_and_grads(fused_model, batch, chunked=True)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-5)
    for name, grad in plain_grads.items():
        # The loss is a sum over ~70 targets, so fp32's summation-order noise scales with the gradient's size
        # (transformers 5.25's GPT-2: 1.9e-6 on a bias gradient of 7.8, computed in another order).
        scale = max(1.0, grad.abs().max().item())
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_fused_head_still_gives_logits_without_targets():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (2, 9))
    expected = model(input_ids=ids).logits
    install_fused_head(model)
    torch.testing.assert_close(model(input_ids=ids).logits, expected)  # generation, DPO, export


def test_families_that_transform_their_logits_are_not_fused():
    config = Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    problem = fused_head_problem(AutoModelForCausalLM.from_config(config))
    assert problem is not None and "gemma2" in problem
