"""The held-out figures a run logs while training (the loop's evaluation, over the ranks) and the ones
`lmscale eval` prints for the same model and data (one process, the run's buckets) are the same numbers."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
from datasets import Dataset
from helpers import tiny_gpt2_config
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

from lmscale.config import Config
from lmscale.data.batches import BatchSettings, BatchStream
from lmscale.evaluation.held_out import ModelForward, held_out_scores
from lmscale.methods import CLASSIFICATION, SFT
from lmscale.objectives.loss import cross_entropy_objective
from lmscale.training.loop import evaluate

VOCAB = 48


class OneProcessEngine(ModelForward):
    """What the loop's evaluation reads of a DeepSpeed engine, for one process: forward, device, modes."""

    def eval(self):
        self.model.eval()

    def train(self):
        self.model.train()


@pytest.fixture
def one_rank_group():
    """A one-rank gloo group (no port: an in-memory store) for the loop's all-reduce; torn down after."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def sequences(labelled: bool) -> Dataset:
    rng = np.random.default_rng(3)
    lengths = rng.integers(4, 32, size=30)  # within the tiny model's 32 positions
    columns = {
        "input_ids": [rng.integers(1, VOCAB, size=n).tolist() for n in lengths],
        "length": lengths.tolist(),
    }
    if labelled:
        columns["label"] = rng.integers(0, 3, size=len(lengths)).tolist()
    return Dataset.from_dict(columns)


def loop_figures(model, data: Dataset, method) -> dict[str, float]:
    settings = BatchSettings(
        "bucket", max_tokens_per_batch=96, micro_batch_size=1, max_seq_len=32, num_workers=0
    )
    stream = BatchStream(data, settings, 0, 1, seed=0, pad_id=0, shuffle=False)
    return evaluate(
        OneProcessEngine(model), stream, 10_000, cross_entropy_objective(), method=method
    ).metrics()


def test_a_language_models_held_out_loss_is_the_same_in_training_and_in_lmscale_eval(one_rank_group):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(VOCAB)).eval()
    data = sequences(labelled=False)
    logged = loop_figures(model, data, SFT)
    printed = held_out_scores(model, data, Config(), pad_id=0, max_batches=None)
    assert logged["eval_loss"] == pytest.approx(printed["eval_loss"], rel=1e-5)
    assert logged["eval_ppl"] == pytest.approx(printed["eval_ppl"], rel=1e-5)
    assert printed["eval_tokens"] == sum(n - 1 for n in data["length"])  # every next token, once
    assert 2.0 < printed["eval_loss"] < 6.0  # an untrained model over 48 tokens: about ln 48


def test_a_classifiers_loss_and_accuracy_are_the_same_in_training_and_in_lmscale_eval(one_rank_group):
    torch.manual_seed(0)
    config = tiny_gpt2_config(VOCAB)
    config.num_labels, config.pad_token_id = 3, 0
    model = GPT2ForSequenceClassification(config).eval()
    data = sequences(labelled=True)
    logged = loop_figures(model, data, CLASSIFICATION)
    printed = held_out_scores(model, data, Config(), pad_id=0, max_batches=None)
    assert logged["eval_loss"] == pytest.approx(printed["eval_loss"], rel=1e-5)
    assert logged["eval_accuracy"] == pytest.approx(printed["eval_accuracy"])
    assert "eval_ppl" not in logged  # exp of a class cross-entropy is no perplexity
    assert printed["eval_documents"] == len(data)
