"""What the loop calls out to, wired for one rank: checkpoints, stop signals, the sequence-length warm-up,
FLOPs accounting, unfreezing, the hang watchdog's heartbeat, the benchmark harness and the method's loss."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from lmscale.data.batches import seq_len_cap
from lmscale.evaluation.harness import flat_metrics, run_harness
from lmscale.methods import method_for
from lmscale.model.compiling import compile_seconds
from lmscale.model.finetune import Unfreezing
from lmscale.model.router_balance import RouterBiasBalancer
from lmscale.parallel import engine as ds_engine
from lmscale.reporting.sink import log
from lmscale.reporting.throughput import ThroughputModel, model_shape, peak_tflops
from lmscale.runs.run import Run
from lmscale.training.loop import LoopHooks
from lmscale.training.online import OnlineTraining
from lmscale.training.resume import CheckpointSaver
from lmscale.training.signals import StopRequest
from lmscale.training.watchdog import HangWatchdog


def loop_hooks(
    run: Run,
    engine,
    train_stream,
    unfreezing: Unfreezing,
    watchdog: HangWatchdog,
    tokenizer,
    stop: StopRequest,
    online: OnlineTraining | None = None,
) -> LoopHooks:
    config, method = run.config, method_for(run.config.finetune)
    if online is not None:  # never with the router bias (lmscale.config.run.router_bias_problems)
        extra_hooks = {"held_out": online.evaluate, "window_figures": online.stream.drain_figures}
    else:
        extra_hooks = router_bias_hooks(config.model.router_bias_update, engine.module)
    saver = CheckpointSaver(engine, train_stream, run, unfreezing)
    return LoopHooks(
        save=saver.save,
        settle_saves=saver.settle,
        stop_requested=stop.agreed,
        length_cap=partial(
            seq_len_cap,
            start=config.data.seq_len_start,
            max_seq_len=config.data.max_seq_len,
            warmup_steps=config.data.seq_len_warmup_steps,
        ),
        throughput=throughput_model(run, engine.module),
        before_step=unfreezing.apply,
        progress=watchdog.beat,
        harness=harness_hook(run, engine, tokenizer, watchdog),
        objective=method.objective(config) if method.objective else None,
        method=method,
        compile_clock=compile_seconds if config.model.compile else None,
        **extra_hooks,
    )


def router_bias_hooks(speed: float, model: torch.nn.Module) -> dict[str, Callable]:
    """DeepSeek-V3's balancing by the routing bias after each step (model.router_bias_update = `speed`), and
    the bias's largest size in the logs."""
    if not speed:
        return {}
    log.info(
        "router bias: each step, every MoE layer's routing bias moves %g toward its layer's mean load", speed
    )
    balancer = RouterBiasBalancer(model, speed)
    return {"after_update": balancer.after_step, "window_figures": balancer.figures}


def throughput_model(run: Run, model: torch.nn.Module) -> ThroughputModel:
    """FLOPs accounting for this model on this device (MFU/HFU only where a peak is known)."""
    device_name = torch.cuda.get_device_name() if ds_engine.has_gpu() else None
    peak = peak_tflops(device_name, run.config.metrics.peak_tflops)
    if peak is None:
        log.info("metrics: no peak TFLOP/s known for this device; set metrics.peak_tflops to log MFU/HFU")
    return ThroughputModel(
        model_shape(model.config),
        activation_checkpointing=run.config.model.activation_checkpointing,
        peak_tflops=peak,
    )


def harness_hook(run: Run, engine, tokenizer, watchdog: HangWatchdog):
    """The loop's benchmark hook: lm-eval on the live model at step 0, every eval.harness_every, and the end.

    Every rank runs the same requests in the same order, so ZeRO-3's per-layer gathers stay matched
    across ranks (and no rank waits idle in a collective while another scores); rank 0 logs.
    """
    settings = run.config.eval
    if not settings.harness_tasks:
        return lambda step, is_last: {}

    def benchmark(step: int, is_last: bool) -> dict[str, float]:
        due = step == 0 or is_last or (settings.harness_every and step % settings.harness_every == 0)
        if not due:
            return {}
        watchdog.beat(step, "harness evaluation")
        table = run_harness(
            engine.module,
            tokenizer,
            settings.harness_tasks,
            settings.harness_include_path,
            settings.harness_limit,
        )
        watchdog.beat(step, "training step")
        return flat_metrics(table)

    return benchmark
