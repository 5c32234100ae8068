"""What a training method is: the data it trains on, its objective, what it needs before training, what it
logs and how its results read. One module per method defines one `Method`; `lmscale.methods.METHODS` lists
them. The methods import no other lmscale module (the config's checks consult them, so they sit below it)
and nothing heavy: an objective's implementation is imported by its factory, where training starts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmscale.config import Config

# A dashboard panel: (title, y label, metric keys, y axis starts at zero).
Panel = tuple[str, str, tuple[str, ...], bool]


@dataclass(frozen=True)
class MethodFigures:
    """How a method's figures are shown: the report's panels, the summary's rows, the console line."""

    loss_name: str  # the loss in an evaluation's line ("held-out DPO loss 0.61")
    loss_label: str  # what the loss measures, with its unit (the report's axis)
    panels: tuple[Panel, ...]  # the method's own panels, after the common ones
    summary_keys: tuple[str, ...]  # held-out figures of the last evaluation the summary reports
    console: tuple[tuple[str, str, str], ...] = ()  # (metric, label, format) added to each step's line
    evaluation: tuple[tuple[str, str, str], ...] = ()  # the same, added to an evaluation's line
    # eval_loss is the training loss on held-out data, drawn beside it; False: it is some other figure (GRPO's
    # minus its greedy reward, drawn in the method's own panel instead)
    held_out_loss: bool = True


def no_rules(config: Config) -> list[str]:
    return []


def no_rank_rules(config: Config, data_ranks: int) -> list[str]:
    return []


@dataclass(frozen=True)
class Method:
    name: str  # its METHODS key
    key: str  # the config setting that selects it, as a user writes it
    data_formats: tuple[str, ...]  # the data.format values it trains on
    figures: MethodFigures
    # The objective for the loop, built from the run's config; None = next-token (or class) cross-entropy.
    # Its factory imports the implementation when called: the training layer calls it, a config check never.
    objective: Callable[[Config], Any] | None = None
    rules: Callable[[Config], list[str]] = no_rules  # the method's own config refusals, one line each
    # ... and those that depend on the job's data-parallel rank count (checked with the layout)
    rank_rules: Callable[[Config, int], list[str]] = no_rank_rules
    accuracy_metric: str | None = None  # the held-out share it logs (as eval_<metric>) and closes with
    accuracy_label: str = "accuracy"  # that share in words
    perplexity: bool = True  # exp(loss) means something: the loss is a token cross-entropy
    class_head: bool = False  # the model predicts one class per sequence (a classification head)
    class_names: tuple[str, ...] | None = None  # the head's outputs when the data does not name them
    target_unit: str = "tokens"  # what its loss is a mean over (lmscale eval counts them: eval_<unit>)
    needs_reference: bool = False  # the starting model scores the data once, before training
    dropout_off: bool = False  # the objective compares runs of the model, so dropout noise would bias it
    whole_records: bool = False  # even on data.format=text: no packing, streaming or length warm-up
    # It samples its own training data from the policy (online RL): the training layer builds its batches from
    # the engine (lmscale.rollouts), and its held-out figure is the reward of greedy answers.
    online: bool = False
    tensor_parallel: bool = True  # AutoTP splits what it trains
    sequence_parallel: bool = True  # Ulysses slices what it trains on
    expert_parallel: bool = False  # tested with AutoEP's experts (parallel.expert)

    def problems(self, config: Config) -> list[str]:
        """Every reason `config` cannot train with this method."""
        if config.data.format not in self.data_formats:
            formats = " or ".join(self.data_formats)
            return [
                f"{self.key} trains on data.format {formats}: set data.format={self.data_formats[0]} "
                f"(got {config.data.format})"
            ]
        return self.rules(config)

    def describe_evaluation(self, loss: float, means: dict[str, float], perplexity: float) -> str:
        """An evaluation's line: the loss and the figure that reads best for this method (`perplexity` as
        lmscale.objectives.loss computes it, capped, which this layer cannot import)."""
        figure = (
            f"{self.accuracy_label} {means[self.accuracy_metric]:.3f}"
            if self.accuracy_metric in means
            else f"perplexity {perplexity:.2f}"
        )
        extra = "".join(
            f", {label} {fmt.format(means[key])}"
            for key, label, fmt in self.figures.evaluation
            if key in means
        )
        if not self.figures.held_out_loss:  # its "loss" is some other figure (GRPO: minus its reward)
            return f"held-out {figure}{extra}"
        return f"held-out {self.figures.loss_name} {loss:.4f}, {figure}{extra}"
