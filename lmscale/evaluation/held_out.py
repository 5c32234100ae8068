"""`lmscale eval TARGET`: held-out loss, perplexity and prediction entropy of a trained model, and
BLEU / ROUGE on a jsonl of prompt/reference pairs.

Held-out data is the run's own split (from the exported `lmscale.yaml`, or the run's `config.yaml`)
unless `--data` names a file, which is then evaluated whole. Scoring uses `sacrebleu` and
`rouge-score`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from lmscale.atomic import write_atomically
from lmscale.checkpointing.rundir import RunDir, read_labels
from lmscale.config import Config, saved_config
from lmscale.data.batches import IGNORE_INDEX, BatchSettings, BatchStream
from lmscale.data.pipeline import prepare_held_out
from lmscale.errors import LmscaleError
from lmscale.evaluation.inference import Sampling, generate_text, load_for_inference
from lmscale.methods import method_for
from lmscale.objectives.loss import figure_means, objective_totals, summed_loss, summed_token_loss


def evaluation_config(target: Path, data: str | None) -> Config:
    """The data settings of the run that produced `target` (defaults when unknown), with `--data`."""
    from lmscale.checkpointing.export import RUN_CONFIG

    for path in (target / RUN_CONFIG, RunDir(target).config):  # an export's copy, or a run's own
        if path.is_file():
            import yaml

            config = saved_config(yaml.safe_load(path.read_text(encoding="utf-8")))
            break
    else:
        config = Config()
    if data:
        # the whole file is the held-out set
        config = config.model_copy(
            update={"data": config.data.model_copy(update={"path": data, "eval_path": data})}
        )
    return config


def scoring_stream(sequences, config: Config, pad_id: int) -> BatchStream:
    """The held-out sequences in fixed length buckets of the run's budget, in one process."""
    budget = config.data.max_tokens_per_batch
    budget = budget if isinstance(budget, int) else 8 * config.data.max_seq_len  # inference needs less
    settings = BatchSettings("bucket", budget, 1, config.data.max_seq_len, 0)
    return BatchStream(sequences, settings, 0, 1, config.seed, pad_id, shuffle=False)


@torch.no_grad()
def held_out_scores(
    model, sequences, config: Config, pad_id: int, max_batches: int | None
) -> dict[str, float]:
    """Loss per target token, perplexity, and mean entropy (nats) of the predicted distributions."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # right padding needs no attention mask for a causal LM; skip the hint
    stream = scoring_stream(sequences, config, pad_id)
    if "label" in sequences.column_names:
        return classification_scores(model, stream, max_batches)
    loss_sum = entropy_sum = targets = 0.0
    for batch in stream.loader(0, 0, max_batches):
        logits = model(input_ids=batch["input_ids"]).logits.float()
        loss_sum += summed_token_loss(logits, batch["labels"]).item()
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        entropy_sum += entropy[mask].sum().item()
        targets += mask.sum().item()
    if not targets:
        raise LmscaleError("the held-out data has no tokens to score: give --data a file with text")
    loss = loss_sum / targets
    return {
        "eval_loss": loss,
        "eval_ppl": math.exp(min(loss, 50.0)),
        "mean_entropy": entropy_sum / targets,
        "eval_tokens": int(targets),
    }


def classification_scores(model, stream: BatchStream, max_batches: int | None) -> dict[str, float]:
    """Mean cross-entropy and accuracy of a sequence classifier over the held-out documents."""
    loss_sum = correct = count = 0.0
    for batch in stream.loader(0, 0, max_batches):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        loss_sum += summed_loss(logits, batch["labels"]).item()
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        count += (batch["labels"] != IGNORE_INDEX).sum().item()
    if not count:
        raise LmscaleError("the held-out data has no labelled documents to score: check --data")
    return {"eval_loss": loss_sum / count, "eval_accuracy": correct / count, "eval_documents": int(count)}


class ModelForward:
    """The part of a DeepSpeed engine the training objectives use: a device and a forward pass."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.device = model, next(model.parameters()).device
        self.module = model  # as DeepSpeed names the wrapped model

    def __call__(self, **inputs):
        return self.model(**inputs)


@torch.no_grad()
def objective_scores(
    model, examples, config: Config, target: Path, pad_id: int, max_batches: int | None
) -> dict[str, float]:
    """The held-out figures of a method with its own objective (DPO), as training logs them: its loss and
    figures, against the reference log-probabilities the run computed where it needs them (kept in the
    run dir and in its exports)."""
    method = method_for(config.finetune)
    if method.needs_reference:
        from lmscale.objectives.dpo import load_reference, with_reference

        reference = load_reference(RunDir(target).reference_logps)["eval"]
        examples = with_reference(examples, reference, "held-out")
    batches = scoring_stream(examples, config, pad_id).loader(0, 0, max_batches)
    loss_sum, count, sums = objective_totals(ModelForward(model), batches, method.objective(config))
    scores = {"eval_loss": float(loss_sum) / count}
    scores |= {f"eval_{name}": value for name, value in figure_means(sums, count).items()}
    return scores | {f"eval_{method.target_unit}": count}


def online_scores(model, tokenizer, config: Config) -> dict[str, float]:
    """An online method's held-out figures as training logs them: the reward of greedy answers to the held-out
    prompts (finetune.grpo.eval_prompts of them), by the run's reward functions."""
    from lmscale.rollouts.evaluation import held_out_reward
    from lmscale.rollouts.generation import end_token_ids
    from lmscale.rollouts.scoring import reward_set
    from lmscale.rollouts.stream import Prompts, RolloutSettings

    grpo = config.finetune.grpo
    records = prepare_held_out(config.data, tokenizer, completion_room=grpo.max_new_tokens)
    settings = RolloutSettings(grpo, config.seed, grad_accum_steps=1, data_rank=0, data_ranks=1, synced=False)
    device = next(model.parameters()).device
    loss, means = held_out_reward(
        model,
        device,
        Prompts(records, tokenizer),
        settings,
        reward_set(grpo),
        end_token_ids(tokenizer, model),
    )
    return {"eval_loss": loss} | {f"eval_{name}": value for name, value in means.items()}


def read_tasks(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise LmscaleError(f"--tasks {path} does not exist: give a jsonl of prompt/reference pairs")
    tasks = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise LmscaleError(f"--tasks {path} line {number} is not JSON: fix or remove that line") from None
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("prompt"), str)
            or not isinstance(record.get("reference"), str)
        ):
            raise LmscaleError(f"--tasks {path} line {number} needs string fields 'prompt' and 'reference'")
        tasks.append(record)
    if not tasks:
        raise LmscaleError(f"--tasks {path} is empty: add prompt/reference lines")
    return tasks


def generation_scores(model, tokenizer, tasks: list[dict[str, str]]) -> dict[str, float]:
    """Greedy continuations scored against the references: corpus BLEU (sacrebleu) and mean ROUGE F1."""
    import sacrebleu
    from rouge_score import rouge_scorer

    hypotheses = []
    for task in tasks:
        length = max(1, len(tokenizer(task["reference"])["input_ids"]))
        sampling = Sampling(max_new_tokens=length, temperature=0.0)
        hypotheses.append(generate_text(model, tokenizer, task["prompt"], sampling).strip())
    references = [task["reference"] for task in tasks]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    rouge = [scorer.score(ref, hyp) for ref, hyp in zip(references, hypotheses, strict=True)]
    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "rouge1": sum(r["rouge1"].fmeasure for r in rouge) / len(rouge),
        "rougeL": sum(r["rougeL"].fmeasure for r in rouge) / len(rouge),
        "tasks": len(tasks),
    }


def read_labels_of(target: Path) -> list[str] | None:
    """Class names in id order: from a run directory, or from an exported classifier's config."""
    labels = read_labels(target)
    config_path = target / "config.json"
    if labels is None and config_path.is_file():
        import json

        id2label = json.loads(config_path.read_text(encoding="utf-8")).get("id2label") or {}
        labels = [id2label[k] for k in sorted(id2label, key=int)] or None
    return labels


def harness_scores(
    target: Path, tasks: list[str], include_path: str | None, limit: int | None, num_fewshot: int | None
) -> tuple[dict[str, dict[str, float]], Path | None]:
    """lm-evaluation-harness scores of a model directory, an adapter, or a run's newest checkpoint; a run's
    are also saved in its run dir (eval/harness-step_N.json). Returns (scores, where they were saved)."""
    from lmscale.evaluation.harness import check_tasks, run_harness

    if not target.is_dir():
        raise LmscaleError(f"{target} does not exist: pass an exported model directory or a run's output_dir")
    if not tasks:
        raise LmscaleError("--harness needs at least one task name, e.g. --harness hellaswag")
    check_tasks(tasks, include_path)
    model, tokenizer = load_for_inference(target)
    table = run_harness(model, tokenizer, tasks, include_path, limit, num_fewshot)
    if not RunDir(target).config.is_file():
        return table, None
    from lmscale.checkpointing.export import pick_checkpoint

    saved = RunDir(target).harness_results(pick_checkpoint(target, None).name)
    saved.parent.mkdir(parents=True, exist_ok=True)
    record = {"harness": table, "limit": limit, "num_fewshot": num_fewshot, "include_path": include_path}
    write_atomically(saved, json.dumps(record, indent=1) + "\n")
    return table, saved


def evaluate_target(
    target: Path, data: str | None = None, tasks: Path | None = None, max_batches: int | None = None
) -> dict[str, Any]:
    """Every score `lmscale eval` reports for a model directory or a run directory."""
    if not target.is_dir():
        raise LmscaleError(f"{target} does not exist: pass an exported model directory or a run's output_dir")
    config = evaluation_config(target, data)
    method = method_for(config.finetune)
    if method.needs_reference and data:
        raise LmscaleError(
            f"--data cannot be scored against a {method.key} run's reference (its log-probabilities cover the "
            "run's own held-out data): drop --data"
        )
    model, tokenizer = load_for_inference(target)
    if method.online:
        scores = online_scores(model, tokenizer, config)
        if tasks is not None:
            scores.update(generation_scores(model, tokenizer, read_tasks(tasks)))
        return scores
    sequences = prepare_held_out(config.data, tokenizer, config.finetune.task, read_labels_of(target))
    if method.objective is not None:
        scores = objective_scores(model, sequences, config, target, tokenizer.pad_token_id, max_batches)
    else:
        scores = held_out_scores(model, sequences, config, tokenizer.pad_token_id, max_batches)
    if tasks is not None:
        scores.update(generation_scores(model, tokenizer, read_tasks(tasks)))
    return scores
