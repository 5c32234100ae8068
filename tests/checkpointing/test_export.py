"""Export a 2-rank ZeRO-3 run to an HF model; it scores the held-out set exactly as the trained engine did."""

import json
import sys

import pytest
import torch
from helpers import run_lmscale

pytestmark = pytest.mark.slow


def paragraphs(limit):
    """Real text: paragraphs of the standard library's own sources."""
    import textwrap
    from pathlib import Path

    root = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    found = []
    for path in sorted(root.glob("*.py")):
        for block in path.read_text(encoding="utf-8", errors="ignore").split("\n\n"):
            if len(block) > 80:
                found.append(textwrap.dedent(block))
            if len(found) == limit:
                return found
    return found


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    texts = paragraphs(1400)
    (base / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:1300]))
    (base / "eval.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[1300:]))
    out = base / "run"
    result = run_lmscale(
        "launch",
        "--gpus-per-node",
        "2",
        "zero.stage=3",
        "precision=fp32",
        f"data.path={base / 'train.jsonl'}",
        f"data.eval_path={base / 'eval.jsonl'}",
        f"data.cache_dir={base / 'cache'}",
        f"output_dir={out}",
        "data.vocab_size=512",
        "data.max_seq_len=64",
        "data.max_tokens_per_batch=1024",
        "train.max_steps=20",
        "schedule.warmup_steps=2",
        "train.eval_every=20",
        "train.eval_batches=1000",  # more than the held-out set has: all of it is scored
        "wandb.mode=disabled",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return base, out


def test_export_round_trip_scores_like_the_trained_model(trained_run, tmp_path):
    base, run = trained_run
    model_dir = tmp_path / "hf"
    result = run_lmscale("export", str(run), "--out", str(model_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert model.config.model_type == "gpt2"
    # fp32 training: fp32 weights; every file readable like the user's others; the tokenizer knows the length
    assert model.dtype == torch.float32
    assert all(path.stat().st_mode & 0o044 == 0o044 for path in model_dir.iterdir())
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["model_max_length"] == 64

    trained = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    engine_eval = [r["eval_loss"] for r in trained if r.get("step") == 20 and "eval_loss" in r][0]
    result = run_lmscale("eval", str(model_dir), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    # the same held-out tokens through the exported weights: equal up to fp32 summation order
    assert scores["eval_loss"] == pytest.approx(engine_eval, abs=1e-4)
    assert 0 < scores["mean_entropy"] < 7


def test_eval_scores_generation_tasks_and_generate_samples(trained_run, tmp_path):
    base, run = trained_run
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        "\n".join(
            json.dumps({"prompt": "def __init__(self", "reference": "):\n        self"}) for _ in range(3)
        )
    )
    result = run_lmscale("eval", str(run), "--tasks", str(tasks), "--batches", "2", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"bleu", "rouge1", "rougeL", "eval_loss"} <= set(scores) and scores["tasks"] == 3
    result = run_lmscale("generate", str(run), "--prompt", "import ", "--max-new-tokens", "12", "--seed", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("import ") and len(result.stdout.strip()) > len("import ")


def test_export_dtype_and_generation_within_the_context(trained_run, tmp_path):
    _, run = trained_run
    result = run_lmscale("export", str(run), "--out", str(tmp_path / "bf16"), "--dtype", "bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).dtype == torch.bfloat16
    too_long = run_lmscale(
        "generate", str(tmp_path / "bf16"), "--prompt", "import ", "--max-new-tokens", "300"
    )
    assert too_long.returncode == 1 and "Traceback" not in too_long.stderr
    assert "exceeds the model's 64 positions: use --max-new-tokens" in too_long.stderr


def test_export_refuses_to_overwrite(trained_run, tmp_path):
    _, run = trained_run
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    result = run_lmscale("export", str(run), "--out", str(tmp_path / "taken"))
    assert result.returncode != 0 and "already exists and is not empty" in result.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
