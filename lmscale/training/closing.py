"""The end of a run: the summary table and W&B summary, the finished marker, and the closing line."""

from __future__ import annotations

import math

from lmscale.checkpointing.rundir import mark_finished
from lmscale.checkpointing.runlock import this_job
from lmscale.methods import SFT, Method, method_for
from lmscale.objectives.loss import perplexity
from lmscale.reporting.sink import MetricsSink
from lmscale.runs.run import Run
from lmscale.training.loop import LoopStart, TrainResult
from lmscale.training.stopping import EARLY_STOP


def finish(result: TrainResult, sink: MetricsSink, run: Run, start: LoopStart) -> None:
    """Summary table, W&B summary, and the closing line."""
    sink.close(run_summary(result, method_for(run.config.finetune)))
    if not run.is_rank_zero:
        return
    if result.stopped_by in (None, EARLY_STOP):  # not a stop signal: that run goes on when resumed
        mark_finished(run.dir.root, result.steps, result.stopped_by or "reached train.max_steps")
    print(closing_line(result, run, start))


def run_summary(result: TrainResult, method: Method) -> dict:
    summary = {
        "steps": result.steps,
        "tokens": result.tokens,
        "wall_time_s": round(result.wall_time_s, 1),
        "eval_loss": result.final_eval_loss,
        "checkpoint": str(result.checkpoint),
    }
    if method.perplexity:
        summary["eval_ppl"] = perplexity(result.final_eval_loss)
    if method.accuracy_metric and result.final_eval_accuracy is not None:
        summary[f"eval_{method.accuracy_metric}"] = result.final_eval_accuracy
    return summary


def closing_line(result: TrainResult, run: Run, start: LoopStart) -> str:
    """What the run did, in one line: its figure, or why it stopped and how to go on."""
    if result.stopped_by == EARLY_STOP:
        best = run.dir.checkpoints / run.dir.best_tag()
        patience = run.config.train.early_stopping.patience
        return (
            f"early stopping at step {result.steps}: held-out loss did not improve for {patience} evaluations; "
            f"best checkpoint {best}"
        )
    if result.stopped_by:
        # torchrun's agent stops its ranks with SIGTERM to let a joining node in, and then restarts them.
        elastic = " (under torchrun's elastic agent, a restart for a node that joined goes on by itself)"
        return (
            f"stopped by {result.stopped_by} at step {result.steps}; checkpoint {result.checkpoint}; "
            f"run the same command again to resume{elastic if this_job() and result.stopped_by == 'SIGTERM' else ''}"
        )
    if result.checkpoint is None:
        return (
            f"nothing to do: the run in this output_dir already reached step {start.step} (train.max_steps)"
        )
    return (
        f"{closing_figure(result, method_for(run.config.finetune))} after {result.steps} steps, "
        f"{result.tokens:,} tokens in {result.wall_time_s:.0f} s; checkpoint {result.checkpoint}"
    )


def closing_figure(result: TrainResult, method: Method = SFT) -> str:
    """The method's held-out share where it has one (a classifier's or DPO's exp(loss) means nothing to a
    reader), perplexity otherwise."""
    if result.final_eval_accuracy is not None:
        name = method.accuracy_label
        untrained = (
            ""
            if result.initial_eval_accuracy is None
            else f" (untrained: {result.initial_eval_accuracy:.3f})"
        )
        return f"held-out {name}: {result.final_eval_accuracy:.3f}{untrained}"
    untrained = (
        ""
        if math.isnan(result.initial_eval_loss)
        else f" (untrained: {perplexity(result.initial_eval_loss):.1f})"
    )
    return f"held-out perplexity: {perplexity(result.final_eval_loss):.2f}{untrained}"
