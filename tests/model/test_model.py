import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, PreTrainedTokenizerFast

from lmscale.config import ModelConfig
from lmscale.errors import ConfigError
from lmscale.model.build import PRESETS, build_model, count_parameters, preset_config


@pytest.fixture
def tokenizer():
    vocab = {f"t{i}": i for i in range(300)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), eos_token="t1", pad_token="t2"
    )


@pytest.mark.parametrize(
    "preset", ["tiny-gpt2", "tiny-llama", "tiny-mixtral", "tiny-qwen3-moe", "tiny-deepseek-v3"]
)
def test_tiny_presets_follow_the_tokenizer(preset, tokenizer):
    model = build_model(ModelConfig(preset=preset), tokenizer, max_seq_len=32, seed=0)
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
    a = build_model(ModelConfig(), tokenizer, 32, seed=3)
    b = build_model(ModelConfig(), tokenizer, 32, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_unknown_preset_lists_choices(tokenizer):
    with pytest.raises(
        ConfigError, match="model.preset='gpt5' is unknown: choose one of " + ", ".join(PRESETS)
    ):
        build_model(ModelConfig(preset="gpt5"), tokenizer, 32, seed=0)


def test_local_pretrained_directory(tmp_path, tokenizer):
    trained = build_model(ModelConfig(), tokenizer, 32, seed=1)
    trained.save_pretrained(tmp_path)
    loaded = build_model(ModelConfig(path=str(tmp_path)), tokenizer, 32, seed=2)
    assert isinstance(loaded, GPT2LMHeadModel)
    assert all(torch.equal(x, y) for x, y in zip(trained.parameters(), loaded.parameters(), strict=True))
    with pytest.raises(ConfigError, match="has no config.json"):
        build_model(ModelConfig(path=str(tmp_path / "missing")), tokenizer, 32, seed=0)


def test_dropout_knobs_reach_the_model_config(tokenizer):
    options = ModelConfig(embedding_dropout=0.05, attention_dropout=0.1, residual_dropout=0.2)
    model = build_model(options, tokenizer, 32, seed=0)
    assert (model.config.embd_pdrop, model.config.attn_pdrop, model.config.resid_pdrop) == (0.05, 0.1, 0.2)
    llama = build_model(ModelConfig(preset="tiny-llama", attention_dropout=0.1), tokenizer, 32, seed=0)
    assert llama.config.attention_dropout == 0.1
    with pytest.raises(ConfigError, match="model.residual_dropout=0.1: llama models have no such dropout"):
        build_model(ModelConfig(preset="tiny-llama", residual_dropout=0.1), tokenizer, 32, seed=0)


def test_sliding_window_attention_only_where_the_family_has_it(tokenizer):
    model = build_model(ModelConfig(preset="tiny-mistral", sliding_window=8), tokenizer, 32, seed=0)
    assert model.config.sliding_window == 8
    with pytest.raises(ConfigError, match="gpt2 models have no local attention.*tiny-mistral"):
        build_model(ModelConfig(sliding_window=8), tokenizer, 32, seed=0)


def test_sliding_window_limits_what_a_token_sees(tokenizer):
    """With a window of 4, the last token's logits ignore a change to the first token; with none they don't."""
    ids = torch.randint(5, len(tokenizer), (1, 16))
    changed = ids.clone()
    changed[0, 0] = 4
    for window, same in ((4, True), (None, False)):
        options = ModelConfig(preset="tiny-mistral", sliding_window=window, attn_implementation="eager")
        model = build_model(options, tokenizer, 32, seed=0).eval()
        with torch.no_grad():
            a, b = model(ids).logits[0, -1], model(changed).logits[0, -1]
        assert torch.equal(a, b) == same


def test_attention_implementations(tokenizer):
    eager = build_model(ModelConfig(attn_implementation="eager"), tokenizer, 32, seed=0)
    assert eager.config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="flash_attention_2 is not available here.*use sdpa"):
        build_model(ModelConfig(attn_implementation="flash_attention_2"), tokenizer, 32, seed=0)


def test_activation_checkpointing_gives_the_same_gradients(tokenizer):
    ids = torch.randint(0, len(tokenizer), (2, 16))
    grads = []
    for checkpointing in (False, True):
        options = ModelConfig(
            activation_checkpointing=checkpointing,
            residual_dropout=0.0,
            embedding_dropout=0.0,
            attention_dropout=0.0,
        )
        model = build_model(options, tokenizer, 32, seed=0).train()
        assert model.is_activation_checkpointing == checkpointing
        model(ids, labels=ids).loss.backward()
        grads.append(model.transformer.h[0].mlp.c_fc.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize(("preset", "experts"), [("tiny-mixtral", 4), ("tiny-qwen3-moe", 4)])
def test_mixture_of_experts_presets_route_each_token_to_two_of_their_experts(preset, experts, tokenizer):
    model = build_model(ModelConfig(preset=preset), tokenizer, max_seq_len=32, seed=0)
    config = model.config
    assert (getattr(config, "num_local_experts", None) or config.num_experts) == experts
    assert config.num_experts_per_tok == 2 and config.output_router_logits
    out = model(input_ids=torch.randint(0, 300, (2, 16)))
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
    # the experts of a layer are one fused parameter each (ZeRO-3 gathers them like any weight)
    assert any(p.dim() == 3 and p.shape[0] == experts for p in model.parameters())
