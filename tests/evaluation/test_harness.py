"""lm-evaluation-harness offline, on a task YAML the test writes: the in-training hook logs the scores at the
configured steps (near chance untrained, above it trained), `lmscale eval --harness` gives the same scores
for the run and saves them, and on an export it equals lm-eval run by hand."""

import json
import random
import sys
from pathlib import Path

import pytest
from helpers import run_lmscale

pytestmark = pytest.mark.slow

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
KEYWORDS = ("for", "if", "def", "return", "while", "elif", "with", "from", "import", "raise", "class")


def write_task(directory: Path, count: int = 300) -> Path:
    """Multiple choice on held-out stdlib lines: the rest of a line in its order, or its words reversed.

    Both choices are the same words, so they are the same tokens: a model without knowledge of Python is
    at chance, one that learned the word order of code is above it.
    """
    rng = random.Random(0)
    root = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    lines = [
        line.split()
        for path in sorted(root.glob("*.py"))[39::40]  # files the embedded corpus holds out
        for line in path.read_text(encoding="utf-8", errors="ignore").splitlines()
        if 4 <= len(line.split()) <= 10 and line.split()[0] in KEYWORDS
    ]
    rng.shuffle(lines)
    docs = []
    for words in lines:
        real, reversed_ = " ".join(words[2:]), " ".join(words[:1:-1])
        if real == reversed_:
            continue
        label = rng.randrange(2)
        choices = [real, reversed_] if label == 0 else [reversed_, real]
        docs.append({"context": " ".join(words[:2]), "choices": choices, "label": label})
        if len(docs) == count:
            break
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "code_lines.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / "code_lines.yaml").write_text(
        f"""task: code_lines
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / "code_lines.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
    )
    return directory


def harness_cli(target: Path, tasks: Path) -> dict[str, float]:
    """`lmscale eval TARGET --harness code_lines --json`: the task's scores."""
    result = run_lmscale(
        "eval", str(target), "--harness", "code_lines", "--include-path", str(tasks), "--json", env=OFFLINE
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["harness"]["code_lines"]


def test_harness_during_training_from_the_cli_and_by_hand(tmp_path, cache_dir, monkeypatch):
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    tasks = write_task(tmp_path / "tasks")
    run = tmp_path / "run"
    result = run_lmscale(
        "train",
        f"output_dir={run}",
        f"data.cache_dir={cache_dir}",
        "model.preset=tiny-gpt2",
        "data.max_seq_len=64",
        "data.vocab_size=1024",
        "data.max_tokens_per_batch=1024",
        "train.max_steps=120",
        "schedule.warmup_steps=8",
        "optim.lr=3e-3",
        "train.eval_every=60",
        "train.log_every=20",
        "data.num_workers=0",
        "wandb.mode=disabled",
        "precision=fp32",
        "eval.harness_tasks=[code_lines]",
        "eval.harness_every=60",
        f"eval.harness_include_path={tasks}",
        env=OFFLINE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["harness/code_lines/acc"] for r in records if "harness/code_lines/acc" in r}
    assert sorted(logged) == [0, 60, 120]
    assert 0.38 <= logged[0] <= 0.62, logged  # untrained: chance
    assert logged[120] >= 0.6 and logged[120] >= logged[0] + 0.08, logged
    assert "\r" not in result.stderr  # the harness's progress bars stay out of the log

    # (the run directory's own `lmscale eval --harness` is checked by the ZeRO-3 test below)
    export = tmp_path / "export"
    assert run_lmscale("export", str(run), "--out", str(export)).returncode == 0
    scores = harness_cli(export, tasks)
    exported_acc = scores["acc"]
    assert exported_acc == pytest.approx(logged[120], abs=1e-9) and "acc_stderr" in scores
    import lm_eval
    from lm_eval.tasks import TaskManager

    by_hand = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(export), "dtype": "float32"},
        tasks=["code_lines"],
        task_manager=TaskManager(include_path=str(tasks)),
        device="cpu",
        batch_size=8,
        log_samples=False,
    )
    assert exported_acc == pytest.approx(by_hand["results"]["code_lines"]["acc,none"], abs=1e-9)


def test_harness_on_the_live_model_under_zero3_on_two_ranks(tmp_path, cache_dir, monkeypatch):
    """Every rank scores the same requests (ZeRO-3's layer gathers stay matched); the live sharded model
    scores as the consolidated checkpoint does."""
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    tasks = write_task(tmp_path / "tasks", count=100)
    run = tmp_path / "run"
    result = run_lmscale(
        "launch",
        "--gpus-per-node",
        "2",
        "zero.stage=3",
        "precision=fp32",
        f"output_dir={run}",
        f"data.cache_dir={cache_dir}",
        "data.max_seq_len=64",
        "data.vocab_size=1024",
        "data.max_tokens_per_batch=1024",
        "train.max_steps=10",
        "schedule.warmup_steps=2",
        "train.eval_every=10",
        "data.num_workers=0",
        "wandb.mode=disabled",
        "eval.harness_tasks=[code_lines]",
        f"eval.harness_include_path={tasks}",
        env=OFFLINE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["harness/code_lines/acc"] for r in records if "harness/code_lines/acc" in r}
    assert sorted(logged) == [0, 10]
    scores = harness_cli(run, tasks)  # a run directory: its newest checkpoint, consolidated, scored and saved
    assert scores["acc"] == logged[10]
    saved = json.loads((run / "eval" / "harness-step_00000010.json").read_text())
    assert saved["harness"]["code_lines"]["acc"] == scores["acc"]
