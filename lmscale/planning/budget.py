"""`data.max_tokens_per_batch: auto`: the largest token budget per micro-batch that fits this device.

On a GPU it is measured: real forward/backward passes of the model on a batch of the longest rows,
doubling the budget until one runs out of memory, then bisecting, and keeping a margin. On a CPU
there is no out-of-memory signal to back off from (the machine would swap), so it is the planner's
figure for the available host memory, capped where bigger batches stop paying on CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from lmscale.config import Config
from lmscale.planning.plan import GIB, Hardware, facts_of, largest_token_budget, plan_rows

log = logging.getLogger(__name__)

MARGIN = 0.9  # keep 10% below the largest budget that ran: fragmentation, longer logging steps
CPU_CAP_ROWS = 64  # more rows per micro-batch than this give a CPU no more throughput


def search_token_budget(fits: Callable[[int], bool], step: int, ceiling: int) -> int:
    """The largest multiple of `step` up to `ceiling` for which `fits` holds (fits is monotone); 0 if none."""
    if ceiling < step or not fits(step):
        return 0
    good, bad = step, None
    while bad is None:  # double until something does not fit
        trial = good * 2
        if trial > ceiling:
            trial = ceiling // step * step
            if trial == good or fits(trial):
                return trial
            bad = trial
        elif fits(trial):
            good = trial
        else:
            bad = trial
    while bad - good > step:  # then bisect on multiples of step
        middle = (good + bad) // 2 // step * step
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def with_margin(tokens: int, step: int) -> int:
    return max(step, int(tokens * MARGIN) // step * step)


def gpu_probe(model: torch.nn.Module, vocab: int, seq_len: int) -> Callable[[int], bool]:
    """fits(tokens): one forward/backward of tokens // seq_len rows of seq_len tokens, False on OOM."""

    def fits(tokens: int) -> bool:
        rows = max(1, tokens // seq_len)
        try:
            ids = torch.randint(0, vocab, (rows, seq_len), device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    return fits


def auto_token_budget(config: Config, model: torch.nn.Module, world_size: int) -> int:
    """The budget `auto` stands for on this machine (logged with how it was found)."""
    seq_len = config.data.max_seq_len
    facts = facts_of(model)
    if torch.cuda.is_available():
        import os

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        hardware = Hardware(gpus_per_node=world_size, gpu_mem_bytes=memory)
        found, how = gpu_token_budget(model, facts, config, hardware)
    else:
        import psutil

        hardware = Hardware(1, gpu_mem_bytes=psutil.virtual_memory().available / world_size, cpu_mem_bytes=0)
        planned = largest_token_budget(facts, config, hardware, _stage_row(facts, config, hardware))
        found = min(planned, CPU_CAP_ROWS * seq_len)
        how = f"planned for {hardware.gpu_mem_bytes / GIB:.1f} GiB of host memory per rank"
    budget = agreed_minimum(with_margin(found, seq_len))  # every rank must plan the same batches
    log.info("data: max_tokens_per_batch=auto -> %d tokens per micro-batch (%s, 10%% margin)", budget, how)
    return budget


def gpu_token_budget(model: torch.nn.Module, facts, config: Config, hardware: Hardware) -> tuple[int, str]:
    """Tokens per micro-batch on this GPU, measured where the unsplit model fits, planned otherwise; and how."""
    seq_len = config.data.max_seq_len
    if config.parallel.tensor * config.parallel.sequence > 1:
        # A probe would run the unsplit model on whole rows: plan the layout's per-rank share instead.
        found = largest_token_budget(facts, config, hardware, _stage_row(facts, config, hardware))
        return found, "planned for the tensor/sequence-parallel layout"
    row = plan_rows(facts, config, hardware, seq_len)[0]
    ceiling = max(seq_len, 4 * largest_token_budget(facts, config, hardware, row))
    model.cuda()
    found = search_token_budget(gpu_probe(model, facts.vocab, seq_len), seq_len, ceiling)
    model.cpu()
    if found == 0:  # the whole model does not train on one GPU (ZeRO-3 will partition it): plan instead
        found = largest_token_budget(facts, config, hardware, _stage_row(facts, config, hardware))
        return found, "planned (the unpartitioned model does not fit one GPU to measure)"
    return found, "measured by forward/backward on this GPU"


def agreed_minimum(value: int) -> int:
    """The smallest of every rank's value (one collective)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def _stage_row(facts, config: Config, hardware: Hardware):
    rows = plan_rows(facts, config, hardware, config.data.max_seq_len)
    return next(
        r for r in rows if r.stage == config.zero.stage and r.offload == (config.zero.offload == "cpu")
    )
