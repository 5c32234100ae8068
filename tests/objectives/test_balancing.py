"""The load-balancing loss of sequence-parallel slices (lmscale.objectives.balancing) against transformers' own
over the whole rows: the same loss on every rank, and each slice's router gradient the whole rows' gradient."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from lmscale.objectives.balancing import sliced_balancing_loss

LAYERS, ROWS, WIDTH, EXPERTS, TOP_K = 3, 2, 8, 4, 2
# Each rank weighs its copy of the loss by its share of the step's targets (lmscale.objectives.loss); the
# shares add up to 1, so the rows' gradient is the reference's.
SHARES = (0.25, 0.75)


def whole_rows():
    logits = torch.randn(LAYERS, ROWS, WIDTH, EXPERTS, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(ROWS, WIDTH, dtype=torch.long)
    mask[1, 5:] = 0  # the second row is padded: its last 3 tokens are not routed into the loss
    return logits, mask


def reference():
    logits, mask = whole_rows()
    logits.requires_grad_(True)
    loss = load_balancing_loss_func(
        tuple(layer.reshape(-1, EXPERTS) for layer in logits), EXPERTS, TOP_K, mask
    )
    loss.backward()
    return loss.detach(), logits.grad


def slice_of(tensor, rank, size=2):
    share = WIDTH // size
    columns = slice(rank * share, (rank + 1) * share)
    return tensor[:, :, columns] if tensor.dim() == 4 else tensor[:, columns]  # logits, or the mask


def rank_process(rank, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        logits, mask = whole_rows()
        own = slice_of(logits, rank).clone().requires_grad_(True)
        loss = sliced_balancing_loss(
            tuple(layer.reshape(-1, EXPERTS) for layer in own), TOP_K, slice_of(mask, rank), dist.group.WORLD
        )
        (loss * SHARES[rank]).backward()
        results[rank] = (loss.detach(), own.grad)
    finally:
        dist.destroy_process_group()


def test_sliced_rows_give_the_whole_rows_loss_and_gradient():
    from lmscale.parallel.engine import free_port

    results = mp.Manager().dict()
    mp.spawn(rank_process, args=(free_port(), results), nprocs=2, join=True)
    loss, grad = reference()
    for rank in (0, 1):
        rank_loss, rank_grad = results[rank]
        torch.testing.assert_close(rank_loss, loss, atol=1e-6, rtol=0)
        torch.testing.assert_close(rank_grad, slice_of(grad, rank), atol=1e-6, rtol=0)
    # a slice alone is not the rows: what each rank computed before this module
    first = load_balancing_loss_func(
        tuple(layer.reshape(-1, EXPERTS) for layer in slice_of(whole_rows()[0], 0)),
        EXPERTS,
        TOP_K,
        slice_of(whole_rows()[1], 0),
    )
    assert abs(first - loss) > 1e-3
