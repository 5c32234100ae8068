"""Model facts from the config alone (what a first `lmscale plan` uses) against the facts of the built model."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lmscale.config import Config
from lmscale.model.presets import PRESETS
from lmscale.planning.config_count import ALIASES, FAMILY_DEFAULTS, PEFT_DEFAULT_TARGETS, facts_from_config
from lmscale.planning.plan import count_model_facts, facts_of

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96}
VARIANTS = [
    ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4}),
    ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 80, "tie_word_embeddings": False}),
    ("llama", SMALL),
    ("llama", {**SMALL, "num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True, "head_dim": 32}),
    ("llama", {**SMALL, "tie_word_embeddings": True}),
    ("mistral", {**SMALL, "num_key_value_heads": 2}),
    ("mistral", {**SMALL, "num_key_value_heads": 4, "head_dim": 8, "tie_word_embeddings": True}),
    ("mixtral", {**SMALL, "num_key_value_heads": 2, "num_local_experts": 4}),
    ("qwen2", {**SMALL, "num_key_value_heads": 2}),
    ("qwen3_moe", {**SMALL, "num_key_value_heads": 2, "num_experts": 4, "moe_intermediate_size": 32}),
    (
        "qwen3_moe",
        {
            **SMALL,
            "num_hidden_layers": 4,
            "num_experts": 4,
            "decoder_sparse_step": 2,
            "mlp_only_layers": [3],
            "moe_intermediate_size": 32,
            "attention_bias": True,
        },
    ),
    ("qwen3", {**SMALL, "num_key_value_heads": 2, "head_dim": 16}),
    ("qwen3", {**SMALL, "num_key_value_heads": 4, "head_dim": 16, "attention_bias": True}),
]


@pytest.mark.parametrize(("family", "keys"), VARIANTS)
def test_a_saved_models_facts_match_the_built_model(tmp_path, family, keys):
    hf_config = AutoConfig.for_model(family, vocab_size=300, **keys)
    hf_config.save_pretrained(tmp_path)  # keeps only the keys that differ from the family's defaults
    with torch.device("meta"):
        built = facts_of(AutoModelForCausalLM.from_config(hf_config))
    assert facts_from_config(Config(model={"path": str(tmp_path)}), vocab=300) == built


@pytest.mark.parametrize(
    "preset", [name for name, shape in PRESETS.items() if shape["family"] in FAMILY_DEFAULTS]
)
def test_a_presets_facts_match_the_built_model(preset):
    config = Config(model={"preset": preset}, data={"max_seq_len": 512})
    assert facts_from_config(config, vocab=1000) == count_model_facts(config, 1000)


@pytest.mark.parametrize("family", FAMILY_DEFAULTS)
def test_the_defaults_and_aliases_are_the_config_classes(family):
    hf_config = AutoConfig.for_model(family)
    assert ALIASES.get(family, {}) == hf_config.attribute_map
    for key, value in FAMILY_DEFAULTS[family].items():
        if value is not None:  # None: derived from other keys, as the class derives it
            assert getattr(hf_config, key) == value, key


@pytest.mark.parametrize(
    ("preset", "targets"),
    [
        ("tiny-gpt2", None),
        ("tiny-gpt2", ["c_proj", "c_fc"]),  # c_proj: the attention's and the MLP's
        ("tiny-llama", None),
        ("tiny-llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        ("tiny-mixtral", ["o_proj"]),
        ("tiny-qwen3-moe", ["q_proj", "k_proj"]),
    ],
)
def test_lora_facts_match_the_built_model(preset, targets):
    config = Config(model={"preset": preset}, finetune={"lora": {"r": 4, "target_modules": targets}})
    assert facts_from_config(config, vocab=1000) == count_model_facts(config, 1000)


def test_the_default_lora_targets_are_peft_s():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    assert PEFT_DEFAULT_TARGETS == {family: PEFT[family] for family in FAMILY_DEFAULTS if family in PEFT}
    assert set(FAMILY_DEFAULTS) - set(PEFT) == {"qwen3_moe"}


def test_what_must_be_built_to_be_counted_is_left_to_the_meta_model(tmp_path):
    AutoConfig.for_model("gpt_neox", hidden_size=64, num_attention_heads=4).save_pretrained(tmp_path)
    assert facts_from_config(Config(model={"path": str(tmp_path)}), vocab=1000) is None  # another family
    qwen3_moe_lora = {"r": 4}  # peft has no default targets for it: building the model says so
    assert (
        facts_from_config(Config(model={"preset": "tiny-qwen3-moe"}, finetune={"lora": qwen3_moe_lora}), 1000)
        is None
    )
    lora = {"r": 4, "target_modules": ["self_attn.q_proj"]}  # what peft matches is for peft to say
    assert facts_from_config(Config(model={"preset": "tiny-llama"}, finetune={"lora": lora}), 1000) is None
    assert facts_from_config(Config(model={"preset": "tiny-gpt2", "residual_dropout": 0.1}), 1000) is None
    (tmp_path / "config.json").write_text('{"model_type": "llama", "auto_map": {"AutoModel": "x.Model"}}')
    assert facts_from_config(Config(model={"path": str(tmp_path)}), 1000) is None
    (tmp_path / "config.json").write_text("{not json")
    assert facts_from_config(Config(model={"path": str(tmp_path)}), 1000) is None
