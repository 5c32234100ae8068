"""`model.compile`: torch.compile of the model under DeepSpeed (`engine.compile`), and how long it took.

Bucketed batches change rows and length from one micro-batch to the next; compiled with static shapes,
every new (rows, length) pair would compile a new graph. `dynamic=True` marks those dimensions symbolic
from the start, so one graph (a few, when a guard splits them) serves every bucket.

Compile time is reported apart from throughput: the loop subtracts the seconds spent compiling in a
logging window from that window's time, and logs them as `compile_s`. Dynamo keeps no public total, so it
is read from its own timers (`torch._dynamo.utils.calculate_time_spent`), which are private; if they
change, the figure reads 0 and throughput then includes compiling.
"""

from __future__ import annotations

from typing import Any


def compile_model(engine: Any) -> None:
    """Compile the engine's module in place (Inductor, dynamic shapes)."""
    engine.compile(compile_kwargs={"dynamic": True})


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (Dynamo's `total_wall_time`: tracing, and the
    forward and backward graphs' code generation)."""
    try:
        import torch._dynamo.utils as dynamo

        return float(dynamo.calculate_time_spent().get("total_wall_time", 0.0))
    except (AttributeError, TypeError, ValueError):  # a torch whose private timers changed
        return 0.0


def compiled_graphs() -> int:
    """Distinct graphs compiled so far (each bucket shape that needed its own would add one)."""
    import torch._dynamo.utils as dynamo

    return int(dynamo.counters["stats"]["unique_graphs"])
