"""Hugging Face Hub ids, offline: model.path=org/name and data.path=hf://datasets/org/name read from a Hub
cache laid out by the test (HF_HOME, HF_HUB_OFFLINE=1), exactly as the Hub client leaves it."""

import json
from pathlib import Path

import pytest
import yaml
from helpers import run_lmscale

REVISION = "0123456789abcdef0123456789abcdef01234567"


def snapshot_dir(hf_home: Path, kind: str, repo: str) -> Path:
    """models--org--name/snapshots/<rev>/ with refs/main naming it: the cache's layout."""
    root = hf_home / "hub" / f"{kind}--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REVISION)
    snapshot = root / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    return snapshot


def documents(count: int) -> list[str]:
    import inspect
    import json as json_module

    source = inspect.getsource(json_module.decoder) + inspect.getsource(json_module.encoder)
    blocks = [b for b in source.split("\n\n") if len(b) > 60]
    return [blocks[i % len(blocks)] + f"\n# {i}" for i in range(count)]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, GPT2Config

    from lmscale.data.tokenizer import trained_tokenizer

    hf_home = tmp_path_factory.mktemp("hf")
    data = snapshot_dir(hf_home, "datasets", "acme/tiny-text") / "data"
    data.mkdir()
    texts = documents(240)
    (data / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:200]))
    (data / "validation.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[200:]))
    model_dir = snapshot_dir(hf_home, "models", "acme/tiny-gpt2")
    tokenizer = trained_tokenizer(Dataset.from_dict({"text": texts}), 400, str(hf_home / "tok"))
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_layer=2,
        n_embd=64,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    return hf_home, model_dir


def offline(hf_home):
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.mark.slow
def test_hub_model_and_dataset_train_offline_from_the_cache(hub_cache, tmp_path):
    hf_home, model_dir = hub_cache
    out = tmp_path / "run"
    result = run_lmscale(
        "train",
        "model.path=acme/tiny-gpt2",
        "data.path=hf://datasets/acme/tiny-text",
        "data.eval_path=hf://datasets/acme/tiny-text",
        f"output_dir={out}",
        f"data.cache_dir={tmp_path / 'c'}",
        "data.max_seq_len=64",
        "data.max_tokens_per_batch=512",
        "train.max_steps=4",
        "schedule.warmup_steps=1",
        "train.eval_every=4",
        "wandb.mode=disabled",
        "precision=fp32",
        env=offline(hf_home),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert Path(saved["model"]["path"]) == model_dir  # the snapshot that ran, recorded
    # every document of the train split, and the validation split as the held-out set
    assert "data/train: 200 documents normalised" in result.stderr, result.stderr[-3000:]
    assert "data/eval: 40 documents normalised" in result.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 4


def test_hub_model_is_planned_and_an_uncached_dataset_is_one_line(hub_cache, tmp_path):
    hf_home, _ = hub_cache
    plan = run_lmscale(
        "plan", "model.path=acme/tiny-gpt2", "--gpus-per-node", "1", "--json", env=offline(hf_home)
    )
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert json.loads(plan.stdout)["rows"][0]["model_state_bytes"] > 0
    missing = run_lmscale(
        "train",
        "data.path=hf://datasets/acme/no-such-set",
        f"output_dir={tmp_path / 'fresh'}",
        f"data.cache_dir={tmp_path / 'c'}",
        env=offline(hf_home),
    )
    errors = [line for line in missing.stderr.splitlines() if line.startswith("lmscale: error:")]
    assert missing.returncode == 2 and len(errors) == 1, missing.stderr[-2000:]
    assert (
        "hf://datasets/acme/no-such-set is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
        in errors[0]
    )
    assert not (tmp_path / "fresh").exists()
