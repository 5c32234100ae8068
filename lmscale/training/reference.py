"""The reference pass of a method that compares the policy with the model it started from (DPO): the
starting model's log-probabilities of every example, computed once before the first step."""

from __future__ import annotations

from lmscale.data.pipeline import PreparedData
from lmscale.objectives.dpo import load_reference, reference_logps, save_reference, with_reference
from lmscale.reporting.sink import log
from lmscale.runs.run import Run
from lmscale.training.streams import fixed_stream
from lmscale.training.watchdog import HangWatchdog


def attach_reference(run: Run, data: PreparedData, engine, resuming: bool, watchdog: HangWatchdog) -> None:
    """The reference log-probabilities as columns of the training and held-out examples: computed by all
    ranks before the first step, saved by rank 0, read back from the run dir on a resume."""
    if resuming:
        tables = load_reference(run.dir.reference_logps)
    else:
        log.info("%s: reference log-probabilities of %d + %d examples", run.config.finetune.method,
                 len(data.train), len(data.eval))  # fmt: skip
        tables = {}
        for split, examples in (("train", data.train), ("eval", data.eval)):
            stream = fixed_stream(run, examples, data.tokenizer.pad_token_id)
            tables[split] = reference_logps(
                engine, stream, lambda: watchdog.beat(0, "reference log-probabilities")
            )
        if run.is_rank_zero:
            save_reference(run.dir.reference_logps, tables)
    data.train = with_reference(data.train, tables["train"], "training")
    data.eval = with_reference(data.eval, tables["eval"], "held-out")
