"""Bucketed batches differ in size per micro-step and rank; the step's gradient must still equal the
gradient of one big batch holding the same tokens (the loss is a mean over every target token)."""

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from datasets import Dataset
from helpers import tiny_gpt2_config
from transformers import GPT2LMHeadModel

from lmscale.data.batches import BatchSettings, BatchStream, collate
from lmscale.objectives.loss import summed_token_loss
from lmscale.parallel.engine import free_port, shutdown_distributed
from lmscale.parallel.layout import Layout
from lmscale.training.loop import train_step
from lmscale.training.step_metrics import Window

pytestmark = pytest.mark.slow

WORLD_SIZE, ACCUMULATION, VOCAB = 2, 2, 64


def tiny_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_gpt2_config(VOCAB))


def sequences() -> Dataset:
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 32, size=40)
    ids = [rng.integers(1, VOCAB, size=n).tolist() for n in lengths]
    return Dataset.from_dict({"input_ids": ids, "length": lengths.tolist()})


def stream(rank: int) -> BatchStream:
    settings = BatchSettings(
        batching="bucket", max_tokens_per_batch=96, micro_batch_size=1, max_seq_len=32, num_workers=0
    )
    return BatchStream(sequences(), settings, rank, WORLD_SIZE, seed=5, pad_id=0)


def one_step_on_rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        DS_ACCELERATOR="cpu",
    )
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": ACCUMULATION,
        "train_batch_size": ACCUMULATION * WORLD_SIZE,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 0},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    batches = iter(stream(rank))
    micro_batches = [next(batches) for _ in range(ACCUMULATION)]
    window = Window(loss_sum=torch.zeros((), dtype=torch.float64))
    train_step(engine, micro_batches, Layout(WORLD_SIZE), window, log_grad_norm=False)
    if rank == 0:
        torch.save(
            {k: v.detach().clone() for k, v in engine.module.state_dict().items()}, f"{out_dir}/after.pt"
        )
    # As every lmscale rank does: left to interpreter exit, gloo's threads can abort a rank.
    shutdown_distributed()


def test_bucketed_accumulation_on_two_ranks_equals_one_big_batch(tmp_path):
    mp.spawn(one_step_on_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    after = torch.load(tmp_path / "after.pt", weights_only=True)

    # The same step's sequences from both ranks and both micro-steps, as one batch in one process.
    plan = stream(0).plan(epoch=0)
    data = sequences()
    indices = [int(i) for group in plan.groups[:ACCUMULATION] for batch in group for i in batch]
    rows = data[indices]["input_ids"]
    sizes = {len(b) for group in plan.groups[:ACCUMULATION] for b in group}
    assert len(sizes) > 1, "the test needs batches of different sizes"
    batch = collate(rows, pad_id=0)
    model = tiny_model()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = summed_token_loss(logits, batch["labels"]) / (batch["labels"][:, 1:] != -100).sum()
    loss.backward()
    for name, param in model.named_parameters():
        expected = param.detach() - 1.0 * param.grad  # SGD with lr 1
        torch.testing.assert_close(after[name], expected, rtol=1e-5, atol=1e-6, msg=name)
