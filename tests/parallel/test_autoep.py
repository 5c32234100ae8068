"""Expert parallelism's pieces without a job: the transformers adapter AutoEP needs (against DeepSpeed's own
failing call), the layouts and combinations refused with their fix, the DeepSpeed config, the experts'
optimizer groups, the HF names an export folds AutoEP's weights back into."""

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

from lmscale.checkpointing.autoep_weights import to_hf_names, zero0_weights
from lmscale.config import OptimConfig, load_config
from lmscale.errors import ConfigError, LmscaleError
from lmscale.parallel.autoep import (
    autoep_degree,
    transformers_registry_accepts_names,
    universal_form_loads_into_folding,
    without_route_scale_echo,
)
from lmscale.parallel.ds_config import resolve
from lmscale.parallel.layout import Layout, autoep_problems, config_split_problems
from lmscale.training.optim import parameter_groups


def tiny_mixtral(experts: int = 4):
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2, output_router_logits=True,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def retarget_router_logits(model):
    """DeepSpeed AutoEP's own call that fails under transformers 5: re-targeting the router-logit recorders."""
    from deepspeed.module_inject.auto_ep_presets.base import (
        _retarget_transformers_output_recorders_for_modules,
    )

    return _retarget_transformers_output_recorders_for_modules(
        model=model,
        display_name="mixtral",
        recorder_key="test",
        retargeted_keys=set(),
        remove_output_capture_hooks=lambda module: 0,
        module_matches=lambda module: (
            getattr(getattr(module, "config", None), "model_type", None) == "mixtral"
        ),
        make_output_recorder=lambda recorder: recorder(torch.nn.Linear, index=0),
    )


def test_autoep_works_under_transformers_5_inside_the_adapter_only():
    from transformers.utils import output_capturing

    registry = output_capturing._CAN_RECORD_REGISTRY
    with pytest.raises(TypeError, match="positional argument"):  # what AutoEP meets without lmscale
        retarget_router_logits(tiny_mixtral())
    model = tiny_mixtral()
    with transformers_registry_accepts_names():
        # The model's router-logit recorders now point at AutoEP's router, and its hooks are installed.
        assert retarget_router_logits(model) == 2  # MixtralForCausalLM and MixtralModel
        assert registry.get("no such class", "default") == "default"  # by name, with a default
        assert "router_logits" in registry.get(model)  # by model, as transformers looks it up
    # Only for the block: the registry is transformers' own again, and DeepSpeed's restored entries were
    # filed under their class names (not under "<class 'str'>", as transformers' __setitem__ would have).
    assert type(registry) is output_capturing._CanRecordRegistry
    assert "<class 'str'>" not in registry and str(model.__class__) in registry
    assert registry.get(model)["router_logits"].target_class.__name__ == "MixtralTopKRouter"
    with pytest.raises(TypeError):
        registry.get("name", None)


def route_scale_warnings(**json_keys) -> list[str]:
    """DeepSpeed's AutoEP resolving a DeepSeek-V3 model's routing scale (2.5): the warnings it logs."""
    from deepspeed.module_inject.auto_ep import _resolve_route_scale
    from deepspeed.module_inject.auto_ep_config import fill_autoep_config_from_hf, parse_autoep_config
    from deepspeed.utils import logger

    config = parse_autoep_config({"enabled": True, **json_keys})
    model_config = SimpleNamespace(routed_scaling_factor=2.5, n_group=2, topk_group=1)
    fill_autoep_config_from_hf(config, model_config)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        _resolve_route_scale(config, model_config)
    finally:
        logger.removeHandler(handler)
    return [record.getMessage() for record in records]


def test_autoeps_warning_about_the_route_scale_it_copied_itself_is_dropped():
    echo = "AutoEP: model.config.routed_scaling_factor=2.5 overrides route_scale=2.5."
    assert route_scale_warnings() == [echo]  # DeepSpeed 0.19.8 on its own: about a value nobody set
    with without_route_scale_echo():
        assert route_scale_warnings() == []
        # two numbers a JSON set that disagree are still said
        assert route_scale_warnings(routed_scaling_factor=2.0, route_scale=1.5) == [
            "AutoEP: routed_scaling_factor=2.0 overrides route_scale=1.5."
        ]
    assert route_scale_warnings() == [echo]  # the filter is gone after the block


def resolved(world_size, *overrides):
    config, explicit = load_config(None, list(overrides))
    return resolve(config, explicit, world_size, has_gpu=False)


def test_the_deepspeed_config_turns_autoep_on_for_the_expert_degree():
    config, ds = resolved(4, "model.preset=tiny-mixtral", "parallel.expert=2", "zero.stage=2")
    assert ds["expert_parallel"] == {"enabled": True, "autoep_size": 2}
    assert autoep_degree(ds) == 2 and ds["train_batch_size"] == 4 * config.train.micro_batch_size
    _, plain = resolved(4, "model.preset=tiny-mixtral", "zero.stage=2")
    assert "expert_parallel" not in plain and autoep_degree(plain) is None


def test_a_deepspeed_json_sets_the_expert_degree(tmp_path):
    json_path = tmp_path / "ep.json"
    json_path.write_text('{"expert_parallel": {"enabled": true, "autoep_size": 2, "comm_backend": "comm"}}')
    config, ds = resolved(2, "model.preset=tiny-mixtral", f"deepspeed_config={json_path}")
    assert config.parallel.expert == 2
    assert ds["expert_parallel"] == {"enabled": True, "autoep_size": 2, "comm_backend": "comm"}
    with pytest.raises(ConfigError, match="parallel.expert=1 but"):
        resolved(2, "model.preset=tiny-mixtral", f"deepspeed_config={json_path}", "parallel.expert=1")


@pytest.mark.parametrize(
    ("world_size", "overrides", "message"),
    [
        (3, [], "parallel.expert=2 does not divide the job's 3 data-parallel rank(s)"),
        (2, ["zero.offload=cpu"], "parallel.expert=2 is not tested with zero.offload"),
        (2, ["finetune.lora.r=8"], "does not put LoRA adapters on AutoEP's grouped experts"),
        (2, ["optim.name=muon"], "AutoEP stores each layer's experts as one 3-D tensor"),
        (2, ["model.compile=true"], "not tested with model.compile"),
    ],
)
def test_bad_expert_layouts_are_refused_with_the_fix(world_size, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolved(world_size, "model.preset=tiny-mixtral", "parallel.expert=2", "zero.stage=2", *overrides)


def test_the_expert_split_must_fit_the_model():
    dense = LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    (problem,) = config_split_problems(dense, Layout(2, expert=2))
    assert "llama is not a mixture-of-experts model" in problem
    (problem,) = config_split_problems(tiny_mixtral(experts=6).config, Layout(4, expert=4))
    assert "parallel.expert=4 does not divide the model's 6 experts per layer" in problem
    assert config_split_problems(tiny_mixtral().config, Layout(4, expert=4)) == []
    (problem,) = autoep_problems(SimpleNamespace(model_type="granitemoe"), 2)
    assert "DeepSpeed's AutoEP has no preset for granitemoe models" in problem and "mixtral" in problem
    assert Layout(4, expert=2).describe() == "4 data-parallel rank(s), experts split 2 ways"


def test_a_deepspeed_without_autoep_is_named(monkeypatch):
    import lmscale.parallel.autoep as autoep

    def no_autoep():
        raise ImportError("No module named 'deepspeed.module_inject.auto_ep_presets'")

    monkeypatch.setattr(autoep, "autoep_model_types", no_autoep)
    (problem,) = autoep_problems(tiny_mixtral().config, 2)
    assert "needs DeepSpeed's AutoEP (0.19 or newer)" in problem
    assert autoep_problems(tiny_mixtral().config, 1) == []


def test_expert_weights_get_optimizer_groups_of_their_own_under_autoep():
    model = tiny_mixtral()
    groups = parameter_groups(model, OptimConfig(weight_decay=0.1), expert=2)
    names = {id(p): n for n, p in model.named_parameters()}
    moe = [g for g in groups if g.get("moe")]
    assert moe and all(g["name"] == "ep_size_2" for g in moe)
    in_moe = {names[id(p)] for g in moe for p in g["params"]}
    assert in_moe == {n for n in names.values() if ".experts." in n}  # not the router (mlp.gate)
    assert not any(g.get("moe") for g in parameter_groups(model, OptimConfig(weight_decay=0.1)))


def autoep_weights(model) -> dict[str, torch.Tensor]:
    """The model's weights as AutoEP's layers name and shape them (router twice; w1, w3, w2 per layer)."""
    weights = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.gate.weight"):
            prefix = name[: -len("gate.weight")]
            weights[prefix + "router.gate.weight"] = weights[prefix + "gate.gate.weight"] = tensor
        elif name.endswith("experts.gate_up_proj"):
            gate, up = tensor.chunk(2, dim=1)
            weights[name[: -len("gate_up_proj")] + "w1"], weights[name[: -len("gate_up_proj")] + "w3"] = (
                gate,
                up,
            )
        elif name.endswith("experts.down_proj"):
            weights[name[: -len("down_proj")] + "w2"] = tensor
        else:
            weights[name] = tensor
    return weights


def test_an_export_folds_autoep_weights_back_into_the_hf_layout():
    model = tiny_mixtral()
    hf = model.state_dict()
    shapes = {name: t.shape for name, t in hf.items()}
    folded = to_hf_names(autoep_weights(model), shapes)
    assert folded.keys() == hf.keys() and all(torch.equal(folded[n], hf[n]) for n in hf)
    # transformers' other fused layout ([experts, in, out]) is met by transposing; anything else is named.
    transposed = {n: (s if len(s) < 3 else torch.Size((s[0], s[2], s[1]))) for n, s in shapes.items()}
    name = "model.layers.0.mlp.experts.down_proj"
    assert torch.equal(to_hf_names(autoep_weights(model), transposed)[name], hf[name].transpose(1, 2))
    with pytest.raises(LmscaleError, match="down_proj has shape"):
        to_hf_names(autoep_weights(model), {**shapes, name: torch.Size((1, 2, 3))})


def test_a_zero_0_checkpoint_gathers_each_experts_file(tmp_path):
    w1 = torch.arange(24.0).reshape(4, 3, 2)  # 4 experts, one file each, as DeepSpeed writes them
    torch.save({"module": {"model.norm.weight": torch.ones(2)}}, tmp_path / "mp_rank_00_model_states.pt")
    for expert in range(4):
        own = {f"model.layers.0.mlp.experts.w1.{expert}": w1[expert]}
        torch.save(own, tmp_path / f"layer_0_expert_{expert}_mp_rank_00_model_states.pt")
    weights = zero0_weights(tmp_path)
    assert torch.equal(weights["model.layers.0.mlp.experts.w1"], w1)
    assert torch.equal(weights["model.norm.weight"], torch.ones(2))


def test_a_zero0_checkpoint_with_split_experts_resumes_on_its_own_layout_only(tmp_path):
    import json

    from lmscale.checkpointing.rundir import RunDir
    from lmscale.training.resume import check_expert_layout

    split = tmp_path / "split"
    split.mkdir()
    record = {"step": 5, "world_size": 2, "tensor": 1, "expert": 2, "files": {}, "autoep": True}
    RunDir.complete_marker(split).write_text(json.dumps(record))
    check_expert_layout(split, 1, 2, 1)  # ZeRO 1-3 re-split through the universal form
    check_expert_layout(split, 2, 4, 2)
    check_expert_layout(split, 2, 2, 0)  # its own layout
    with pytest.raises(ConfigError, match="under zero.stage=0 it resumes on that layout only"):
        check_expert_layout(split, 1, 2, 0)


def test_a_universal_state_without_folding_metadata_loads_into_a_folded_runtime():
    """DeepSpeed 0.19.8 holds every checkpoint a folded runtime loads to its writer's folding metadata; the
    universal form (whole tensors, re-partitioned on load) carries none and passes while the adapter is on. A
    state that carries metadata is still checked, and the check is DeepSpeed's own again afterwards."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    spec = SimpleNamespace(tp_size=2, ep_size=2, etp_size=1)
    expected = {"family": "dense", "zero_partition_group": "dense_dp", "zero_partition_count": 1}

    def check(state):
        DeepSpeedEngine._validate_autoep_folding_checkpoint_metadata(state, folding_spec=spec, **expected)

    with pytest.raises(RuntimeError, match="Missing AutoEP\\+AutoTP folding metadata"):
        check({"module": {}})
    other_layout = {"folding": {"version": 1, "tp_size": 4, "ep_size": 2, "etp_size": 1}}
    with universal_form_loads_into_folding():
        check({"module": {}})
        with pytest.raises(RuntimeError, match="Folding metadata mismatch for tp_size"):
            check(other_layout)
    with pytest.raises(RuntimeError, match="Missing AutoEP\\+AutoTP folding metadata"):
        check({"module": {}})
