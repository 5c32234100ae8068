"""model.activation_offload: the checkpointed blocks keep their saved tensors in host memory (torch's
save_on_cpu around the checkpoint), and the gradients are those of plain activation checkpointing."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmscale.config import ModelConfig
from lmscale.model.build import offloaded_checkpoint, prepare_for_training, preset_config


def checkpointed_model(offload: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = preset_config("tiny-llama", vocab_size=128, max_seq_len=32, eos_id=0, pad_id=0)
    model = AutoModelForCausalLM.from_config(config)
    options = ModelConfig(activation_checkpointing=True, activation_offload=offload, fused_kernels=False)
    prepare_for_training(model, options)
    return model.train()


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    model(input_ids=tokens, labels=tokens).loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_offloaded_checkpointing_packs_to_host_and_gives_the_same_gradients(monkeypatch):
    offloaded = checkpointed_model(offload=True)
    layers = [m for m in offloaded.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers and all(m._gradient_checkpointing_func is offloaded_checkpoint for m in layers)
    packed = []
    save_on_cpu = torch.autograd.graph.save_on_cpu

    class CountingSaveOnCpu(save_on_cpu):  # torch's own hooks, counted on the way through
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pack = self.pack_hook
            self.pack_hook = lambda tensor: packed.append(tensor.shape) or pack(tensor)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    with_offload = gradients(offloaded)
    assert packed, "no tensor went through save_on_cpu"
    plain = gradients(checkpointed_model(offload=False))
    assert with_offload.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(with_offload[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_offload_without_checkpointing_is_refused():
    with pytest.raises(ValueError, match="set model.activation_checkpointing=true"):
        ModelConfig(activation_offload=True)
