import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, PreTrainedTokenizerFast

from lmscale.errors import ConfigError
from lmscale.model import PRESETS, build_model, count_parameters, preset_config


@pytest.fixture
def tokenizer():
    vocab = {f"t{i}": i for i in range(300)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), eos_token="t1", pad_token="t2"
    )


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_tiny_presets_follow_the_tokenizer(preset, tokenizer):
    model = build_model(preset, None, tokenizer, max_seq_len=32, seed=0)
    assert model.get_input_embeddings().num_embeddings == 300
    assert model.config.eos_token_id == 1 and model.config.pad_token_id == 2
    out = model(input_ids=torch.randint(0, 300, (2, 16)), labels=torch.randint(0, 300, (2, 16)))
    assert out.logits.shape == (2, 16, 300) and torch.isfinite(out.loss)


@pytest.mark.parametrize(
    ("preset", "low", "high"),
    [("gpt2-124m", 120e6, 130e6), ("gpt2-350m", 340e6, 360e6), ("llama-1b", 1.0e9, 1.2e9)],
)
def test_gpu_shapes_have_their_sizes(preset, low, high):
    config = preset_config(
        preset, vocab_size=50257 if "gpt2" in preset else 32000, max_seq_len=1024, eos_id=0, pad_id=0
    )
    with torch.device("meta"):  # shapes only: no memory for a billion weights
        model = AutoModelForCausalLM.from_config(config)
    assert low < count_parameters(model) < high


def test_same_seed_same_weights(tokenizer):
    a = build_model("tiny-gpt2", None, tokenizer, 32, seed=3)
    b = build_model("tiny-gpt2", None, tokenizer, 32, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_unknown_preset_lists_choices(tokenizer):
    with pytest.raises(
        ConfigError, match="model.preset='gpt5' is unknown: choose one of " + ", ".join(PRESETS)
    ):
        build_model("gpt5", None, tokenizer, 32, seed=0)


def test_local_pretrained_directory(tmp_path, tokenizer):
    trained = build_model("tiny-gpt2", None, tokenizer, 32, seed=1)
    trained.save_pretrained(tmp_path)
    loaded = build_model("tiny-gpt2", str(tmp_path), tokenizer, 32, seed=2)
    assert isinstance(loaded, GPT2LMHeadModel)
    assert all(torch.equal(x, y) for x, y in zip(trained.parameters(), loaded.parameters(), strict=True))
    with pytest.raises(ConfigError, match="has no config.json"):
        build_model("tiny-gpt2", str(tmp_path / "missing"), tokenizer, 32, seed=0)
