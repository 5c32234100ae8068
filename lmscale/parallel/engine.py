"""DeepSpeed set-up: accelerator choice, the process group, and `deepspeed.initialize`."""

from __future__ import annotations

import contextlib
import io
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

# Long enough for the slowest rank to finish first-run work (e.g. the JIT build of DeepSpeed's
# communication op) before the others give up in a collective.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


def has_gpu() -> bool:
    return torch.cuda.is_available()


def select_accelerator() -> None:
    """Use DeepSpeed's CPU accelerator on a machine with no GPU; must run before deepspeed is imported."""
    if "DS_ACCELERATOR" not in os.environ and not has_gpu():
        os.environ["DS_ACCELERATOR"] = "cpu"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_single_process_env() -> None:
    """Debug mode has no launcher: announce a one-rank job on this host ourselves."""
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def ranks_per_node() -> int | None:
    """The ranks the launcher started on this node (torchrun's LOCAL_WORLD_SIZE, then DeepSpeed's LOCAL_SIZE),
    or None outside a launcher."""
    value = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
    return int(value) if value and value.isdigit() and int(value) > 0 else None


def share_cpu_cores() -> str | None:
    """Give each CPU rank its share of the host's cores as torch threads, as torchrun does for its ranks.

    DeepSpeed's launcher leaves every rank at torch's default of one thread per core, so N ranks on a
    host run N threads per core and wait on each other (2 ranks here: ~5% slower, and noisier). Nothing
    changes on GPUs, or when the user set OMP_NUM_THREADS. Returns what was done, for the start-up log.
    """
    if has_gpu() or "OMP_NUM_THREADS" in os.environ:
        return None
    local = ranks_per_node() or 1
    cores = torch.get_num_threads()  # torch's count of this process's cores
    threads = max(1, cores // local)
    torch.set_num_threads(threads)
    return f"{threads} torch thread(s) per rank, {local} rank(s) sharing {cores} core(s) (OMP_NUM_THREADS to choose)"


def init_distributed(hang_timeout_s: float | None = None) -> None:
    """The process group; its timeout is longer than the hang watchdog's, so that a hang is reported by
    the watchdog (which says where each rank was) rather than by a collective's timeout."""
    import deepspeed

    backend = "nccl" if has_gpu() else "gloo"
    timeout = max(PROCESS_GROUP_TIMEOUT, timedelta(seconds=2 * (hang_timeout_s or 0)))
    # On CPUs DeepSpeed prints "deepspeed_shm_comm_op built successfully" from every rank of every run;
    # a failed build still raises. (A first build's compiler output goes to the terminal, not through here.)
    if elastic_restart() is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        init_on_attempt_store(backend, timeout)  # DeepSpeed keeps a process group that exists
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)


def elastic_restart() -> int | None:
    """How many times torchrun's elastic agent has restarted this job's ranks (0 on the first start), or None
    outside torchrun."""
    value = os.environ.get("TORCHELASTIC_RESTART_COUNT", "")
    return int(value) if value.isdigit() else None


def init_on_attempt_store(backend: str, timeout: timedelta) -> None:
    """The process group on a store prefix of this restart's own.

    torch 2.13's env:// handler connects workers to the elastic agent's store without a per-restart prefix,
    trusting that each restart gets a new store; with the c10d rendezvous it is the same store, so a
    restarted rank read the dead ranks' addresses and gloo's connectFullMesh failed ("Connection refused").
    Checked here with a plain two-rank script under `torchrun --max-restarts 1`: it fails without a prefix,
    restarts cleanly with one."""
    import torch.distributed as dist

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timeout,
    )
    store = dist.PrefixStore(f"/lmscale/restart_{elastic_restart()}", agent_store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def release_shared_memory_names() -> None:
    """Unlink this rank's /dev/shm all-reduce buffer, once every rank has mapped every buffer.

    DeepSpeed's CPU all-reduce creates one ~69 MB file per rank in /dev/shm and never removes it, so
    every CPU job leaked them (until the machine ran out of memory). Each rank maps all buffers inside
    `init_distributed`; call this after a barrier that follows it. The mappings live on until the
    processes exit, so nothing changes for the job, and a killed job leaves nothing behind.
    """
    if has_gpu():
        return
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{address}_{port}_{rank()}"):
        path.unlink(missing_ok=True)


_CPU_GROUP: Any = None


def cpu_group() -> Any:
    """A gloo group for small host-side agreements, so they never wait on a GPU stream (None when the
    default group is gloo already). Created on first use: every rank must reach that call."""
    global _CPU_GROUP
    if _CPU_GROUP is None and torch.distributed.get_backend() != "gloo":
        _CPU_GROUP = torch.distributed.new_group(backend="gloo")
    return _CPU_GROUP


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a collective: every rank must call it)."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=cpu_group())
    return bool(value.item())


def shutdown_distributed() -> None:
    """Tear the process groups down while every rank is still here.

    Left to interpreter exit, gloo's threads were sometimes destroyed while still joinable, which
    aborted a rank ("terminate called without an active exception") after a successful run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def build_engine(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ds_config: dict[str, Any],
    mpu: Any = None,
) -> Any:
    """Wrap model, optimizer and schedule in a DeepSpeed engine (ZeRO, precision, clipping, accumulation,
    AutoEP's expert split); `mpu` holds the sequence-parallel groups (lmscale.parallel.ulysses)."""
    import deepspeed

    from lmscale.model.expert_routing import watch_routing
    from lmscale.parallel.autoep import (
        autoep_degree,
        count_folded_experts_on_every_rank,
        transformers_registry_accepts_names,
        without_route_scale_echo,
    )

    if has_gpu():
        torch.cuda.set_device(local_rank())
    autoep = autoep_degree(ds_config) is not None
    adapter = transformers_registry_accepts_names if autoep else contextlib.nullcontext
    quiet = without_route_scale_echo if autoep else contextlib.nullcontext
    with adapter(), quiet():
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu
        )
    if autoep and ds_config.get("tensor_parallel", {}).get("autotp_size", 1) > 1:
        count_folded_experts_on_every_rank(engine.optimizer)
    watch_routing(engine.module)  # after AutoEP has swapped the routers
    return engine


def build_frozen_engine(model: torch.nn.Module, ds_config: dict[str, Any]) -> Any:
    """A DeepSpeed engine that only runs `model` forward (a frozen reference): partitioned over the ranks like
    the policy under ZeRO-3, whole on every rank otherwise, in the run's precision; no optimizer or gradients."""
    import deepspeed

    model.requires_grad_(False)
    config = {key: value for key, value in ds_config.items() if key not in ("optimizer", "scheduler")}
    zero = dict(config.get("zero_optimization", {}))
    if zero.get("stage", 0) != 3:
        zero = {"stage": 0}  # nothing to partition but the weights, which only ZeRO-3 splits
    zero.pop("offload_optimizer", None)
    config["zero_optimization"] = zero
    engine, _, _, _ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
