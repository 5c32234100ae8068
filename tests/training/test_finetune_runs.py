"""Real fine-tuning runs of a saved tiny model: LoRA under ZeRO 2/3 on 2 ranks with export and merge,
gradual unfreezing under ZeRO-2, chat data with prompt masking, and a classification head."""

import json

import pytest
import torch
from finetune_data import (
    chat_records,
    instruction_records,
    labelled_records,
    save_pretrained_model,
    write_jsonl,
)
from helpers import run_lmscale

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("finetune")
    save_pretrained_model(base / "pretrained")
    write_jsonl(base / "sft.jsonl", instruction_records(600))
    write_jsonl(base / "chat.jsonl", chat_records(300))
    write_jsonl(base / "cls.jsonl", labelled_records(600))
    return base


def common(base, out, data="sft.jsonl", steps=24):
    return [
        f"model.path={base / 'pretrained'}",
        f"data.path={base / data}",
        f"data.cache_dir={base / 'cache'}",
        f"output_dir={out}",
        "data.max_seq_len=128",
        "data.max_tokens_per_batch=1024",
        f"train.max_steps={steps}",
        "schedule.warmup_steps=2",
        f"train.eval_every={steps}",
        "train.eval_batches=1000",
        "wandb.mode=disabled",
    ]


def eval_losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_loss" in r]


# ZeRO-3, where the adapters are partitioned with the frozen base; LoRA under ZeRO 0 and 2 is the DPO LoRA
# runs' (tests/methods/test_dpo_runs.py), CI time.
@pytest.mark.parametrize("stage", [3])
def test_lora_fine_tune_lowers_eval_loss_exports_merges_and_resumes(workspace, tmp_path, stage):
    run = tmp_path / "run"
    args = common(workspace, run) + [
        f"zero.stage={stage}",
        "precision=fp32",  # exact comparisons with the exported model below
        "data.format=prompt_completion",
        "finetune.lora.r=8",
        "finetune.lora.dropout=0",
        "optim.lr=5e-3",
        "checkpoint.save_every=12",
    ]
    result = run_lmscale("launch", "--gpus-per-node", "2", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable of" in result.stderr and "(2.6" in result.stderr  # about 2.6% of parameters train
    evals = eval_losses(run)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.05

    # checkpoints hold the adapters (and DeepSpeed's copy of GPT-2's tied head), not the frozen base
    from lmscale.checkpointing.export import consolidated_weights

    weights = consolidated_weights(run / "checkpoints" / "step_00000024", stage)
    assert any("lora_A" in name for name in weights)
    assert not any(
        name.endswith("c_fc.base_layer.weight") or name.endswith("mlp.c_fc.weight") for name in weights
    )

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert run_lmscale("export", str(run), "--out", str(adapter)).returncode == 0
    assert run_lmscale("export", str(run), "--out", str(merged), "--merge").returncode == 0
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    with_adapter = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
    whole = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    tokens = torch.randint(0, 500, (2, 40))
    with torch.no_grad():
        assert torch.allclose(
            with_adapter(input_ids=tokens).logits, whole(input_ids=tokens).logits, atol=1e-4
        )
    scores = json.loads(run_lmscale("eval", str(merged), "--json").stdout.strip().splitlines()[-1])
    assert scores["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], abs=1e-4)

    # an adapters-only checkpoint resumes: the base comes from model.path again (one stage is enough:
    # the resume path does not depend on it, and each 2-rank run costs CI time)
    if stage == 3:
        return
    more = run_lmscale("launch", "--gpus-per-node", "2", *args, "train.max_steps=28", "train.eval_every=28")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "continuing from" in more.stderr and "step 24" in more.stderr


def test_gradual_unfreezing_trains_only_the_joined_layers_under_zero2(workspace, tmp_path):
    run = tmp_path / "run"
    args = common(workspace, run, steps=5) + [
        "zero.stage=2",
        "data.format=prompt_completion",
        "finetune.unfreeze.every_steps=3",  # 2 blocks: head + block 1 from step 1, block 0 from step 4
        "checkpoint.save_every=3",
        "checkpoint.keep_last=3",
    ]
    result = run_lmscale("launch", "--gpus-per-node", "2", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "layer depth 1 joins training" in result.stderr
    from safetensors.torch import load_file

    from lmscale.checkpointing.export import consolidated_weights

    # bf16 training: the fp32 masters start from the bf16-rounded pretrained weights
    start = {
        k: v.bfloat16().float()
        for k, v in load_file(str(workspace / "pretrained" / "model.safetensors")).items()
    }
    at_3 = consolidated_weights(run / "checkpoints" / "step_00000003", 2)
    at_5 = consolidated_weights(run / "checkpoints" / "step_00000005", 2)
    block0, block1 = "transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight"
    assert torch.equal(at_3[block0], start[block0]) and not torch.equal(at_3[block1], start[block1])
    assert not torch.equal(at_5[block0], start[block0])
    for name in ("transformer.wte.weight", "transformer.wpe.weight"):  # embeddings join at step 7
        assert torch.equal(at_5[name], start[name])


def test_chat_fine_tune_masks_the_prompt_and_lowers_eval_loss(workspace, tmp_path):
    run = tmp_path / "run"
    result = run_lmscale(
        "train", *common(workspace, run, "chat.jsonl", steps=30), "data.format=chat", "optim.lr=3e-3"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evals = eval_losses(run)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert "assistant: " in (run / "tokenizer" / "tokenizer_config.json").read_text() or any(
        "assistant: " in p.read_text() for p in (run / "tokenizer").glob("*.jinja")
    )
    scores = json.loads(run_lmscale("eval", str(run), "--json").stdout.strip().splitlines()[-1])
    held_out = [json.loads(line) for line in (workspace / "chat.jsonl").read_text().splitlines()]
    # only completion tokens are scored: far fewer than the whole conversations hold
    words = sum(len(r["messages"][-1]["content"]) for r in held_out)
    assert 0 < scores["eval_tokens"] < words


def test_classification_head_learns_and_exports(workspace, tmp_path):
    run = tmp_path / "run"
    args = common(workspace, run, "cls.jsonl", steps=40) + [
        "finetune.task=classification",
        "data.eval_fraction=0.1",
        "optim.lr=1e-3",
        "train.eval_every=20",
    ]
    result = run_lmscale("train", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = eval_losses(run)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["eval_accuracy"] > 0.6
    assert f"held-out accuracy: {evals[-1]['eval_accuracy']:.3f} (untrained: " in result.stdout
    assert "perplexity" not in result.stdout.splitlines()[-1]
    exported = tmp_path / "hf"
    assert run_lmscale("export", str(run), "--out", str(exported)).returncode == 0
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(exported))
    assert model.config.id2label == {0: "loop", 1: "straight"}
    scores = json.loads(run_lmscale("eval", str(exported), "--json").stdout.strip().splitlines()[-1])
    assert scores["eval_accuracy"] == pytest.approx(evals[-1]["eval_accuracy"], abs=0.02)
