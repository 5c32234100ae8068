"""Benchmark scores with EleutherAI's lm-evaluation-harness (`lm-eval`): `lmscale eval --harness` and the
in-training hook. lmscale hands the harness the model it loaded (a run's checkpoint, an export, an
adapter) through lm-eval's own Hugging Face wrapper, so the scores are the harness's, computed as a
hand-run `lm_eval` on the exported model computes them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any

from lmscale.errors import ConfigError, LmscaleError

log = logging.getLogger(__name__)


def task_manager(include_path: str | None):
    """lm-eval's task registry, with the user's task YAMLs from `include_path`."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(
            "harness evaluation needs lm-eval: pip install lm-eval (or pip install 'lmscale[eval]')"
        ) from None
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path} is not a directory of lm-eval task YAMLs")
    return TaskManager(include_path=include_path, verbosity="ERROR")


def check_tasks(tasks: list[str], include_path: str | None) -> None:
    """Unknown task names are one line, before any model is loaded (or any step trained)."""
    manager = task_manager(include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path else ""
        raise ConfigError(
            f"unknown harness task(s) {', '.join(unknown)}: not among lm-eval's tasks{where}; "
            "lm-eval --tasks list shows them, --include-path adds a directory of your own task YAMLs"
        )


@contextlib.contextmanager
def silenced():
    """The harness's progress bars, tables and a `git describe` child's complaints stay out of the log
    (they are \r redraws and noise in a file); its errors still come back as exceptions."""
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for descriptor in saved:
            os.close(descriptor)


def metric_table(results: dict[str, Any] | None, tasks: list[str]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} with lm-eval's metric names (`acc,none` -> `acc`); {} where lm-eval returned
    nothing (it returns results only where LOCAL_RANK is 0, though every rank computed them)."""
    if results is None:
        return {}
    table = {}
    for task in tasks:
        scores = results["results"].get(task, {})
        table[task] = {
            key.split(",")[0]: float(value)
            for key, value in scores.items()
            if "," in key and isinstance(value, int | float)
        }
    return table


def run_harness(
    model,
    tokenizer,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Score `model` on the harness `tasks`; {task: {metric: value}}."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(include_path)
    device = "cuda" if next(model.parameters()).is_cuda else "cpu"
    was_training = model.training
    model.eval()
    try:
        with silenced(), torch.no_grad():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=manager,
                limit=limit,
                num_fewshot=num_fewshot,
                log_samples=False,
                verbosity="ERROR",
            )
    except Exception as exc:  # datasets, templates, the model: the harness raises many kinds
        raise LmscaleError(
            f"the harness could not run {', '.join(tasks)}: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        model.train(was_training)
    return metric_table(results, tasks)


def flat_metrics(table: dict[str, dict[str, float]]) -> dict[str, float]:
    """`harness/TASK/METRIC` keys, as metrics.jsonl and W&B log them."""
    return {
        f"harness/{task}/{metric}": value
        for task, scores in table.items()
        for metric, value in scores.items()
    }


def print_table(table: dict[str, dict[str, float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    view = Table(title="lm-evaluation-harness")
    for column in ("task", "metric", "value"):
        view.add_column(column, justify="left" if column != "value" else "right")
    for task, scores in table.items():
        for metric, value in scores.items():
            view.add_row(task, metric, f"{value:.4f}")
    Console(stderr=True).print(view)
