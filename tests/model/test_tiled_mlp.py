"""model.tiled_mlp: the blocks' MLPs computed a slice at a time (DeepSpeed's TiledMLP) give the untiled
gradients, and the slice count is one every rank's rows split into exactly (so ZeRO-3 cannot deadlock)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmscale.config import ModelConfig
from lmscale.errors import ConfigError
from lmscale.model.build import prepare_for_training, preset_config
from lmscale.model.tiled_mlp import agreed_slices, block_mlps, exact_slices


def trained_gradients(tiled: bool, checkpointing: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = preset_config("tiny-llama", vocab_size=128, max_seq_len=600, eos_id=0, pad_id=0)
    model = AutoModelForCausalLM.from_config(config)
    options = ModelConfig(tiled_mlp=tiled, activation_checkpointing=checkpointing, fused_kernels=False)
    prepare_for_training(model, options)
    tokens = torch.randint(0, 128, (2, 600), generator=torch.Generator().manual_seed(1))
    loss = model.train()(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlps_give_the_untiled_loss_and_gradients(checkpointing, monkeypatch):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    # 600 tokens of hidden size 256: 3 slices per MLP
    assert agreed_slices([(2, 600)], 256) == 3
    slices = []
    apply = TiledMLP.apply
    monkeypatch.setattr(TiledMLP, "apply", lambda *a: slices.append(a[3]) or apply(*a))
    loss, grads = trained_gradients(tiled=True, checkpointing=checkpointing)
    # DeepSpeed's TiledMLP ran for each of the 4 blocks (again in checkpointing's recompute), in 3 slices
    assert slices == [3] * (8 if checkpointing else 4)
    plain_loss, plain = trained_gradients(tiled=False, checkpointing=checkpointing)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_the_slice_count_splits_every_ranks_rows_exactly():
    assert exact_slices(12, 6) and not exact_slices(10, 6)  # torch.chunk gives 10 rows 5 slices of 2
    assert [len(torch.chunk(torch.zeros(10), 6))] == [5]
    # one rank has 1,500 tokens (6 wanted at hidden 256), another 10: 6 would be 5 slices there, so 5 for all
    assert agreed_slices([(1, 1500), (1, 10)], 256) == 5
    assert all(exact_slices(rows, 5) for rows in (1500, 10))
    assert agreed_slices([(4, 3)], 256) == 1  # short rows: one slice, the untiled computation


def test_what_cannot_be_tiled_is_refused():
    config = preset_config("tiny-gpt2", vocab_size=128, max_seq_len=32, eos_id=0, pad_id=0)
    gpt2 = AutoModelForCausalLM.from_config(config)  # GPT-2's MLP ends in dropout (0.1 by default)
    assert block_mlps(gpt2)
    with pytest.raises(ConfigError, match="set model.residual_dropout=0"):
        prepare_for_training(gpt2, ModelConfig(tiled_mlp=True))
    with pytest.raises(ValueError, match="model.tiled_mlp is not tested with model.compile"):
        ModelConfig(tiled_mlp=True, compile=True)


def test_the_launcher_refuses_what_cannot_be_tiled_before_any_rank_starts():
    from lmscale.config import Config
    from lmscale.runs.preflight import tiled_mlp_problems

    def problems(**model):
        return tiled_mlp_problems(Config(model={"tiled_mlp": True, **model}))

    (dropout,) = problems(preset="tiny-gpt2")
    assert "dropout (p=0.1) would draw another mask: set model.residual_dropout=0" in dropout
    assert problems(preset="tiny-gpt2", residual_dropout=0.0) == []
    (experts,) = problems(preset="tiny-qwen3-moe")
    assert "tiles dense MLPs, not mixture-of-experts layers" in experts
    assert problems(preset="tiny-llama") == []
    assert tiled_mlp_problems(Config(model={"preset": "tiny-gpt2"})) == []  # not asked for: not built
