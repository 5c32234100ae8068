"""`lmscale eval`: a trained model's held-out scores (or lm-evaluation-harness tasks), printed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmscale.evaluation.harness import print_table
from lmscale.evaluation.held_out import evaluate_target, harness_scores


def eval_command(
    target: Path, data: str | None, tasks: Path | None, batches: int | None, as_json: bool
) -> None:
    scores = evaluate_target(target, data, tasks, batches)
    if as_json:
        print(json.dumps(scores))
        return
    for key, value in scores.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


def harness_command(
    target: Path, tasks: list[str], include_path: str | None, limit, num_fewshot: int | None, as_json: bool
) -> None:
    table, saved = harness_scores(target, tasks, include_path, limit, num_fewshot)
    if as_json:
        print(json.dumps({"harness": table}))
    else:
        print_table(table)
    if saved is not None:
        print(f"lmscale: harness results saved to {saved}", file=sys.stderr)
