"""train.profile_steps: the profiler covers exactly the chosen steps, and a run that ends inside them still
writes its trace."""

import json

import torch

from lmscale.training.profiling import StepProfiler


def traced_steps(profiler: StepProfiler, steps: range, last: int) -> None:
    for step in steps:
        profiler.before_step(step)
        torch.ones(8).add_(step)  # an operator the trace records
        profiler.after_step(step, last=step == last)


def test_the_trace_is_written_after_the_last_chosen_step(tmp_path):
    trace = tmp_path / "profile" / "rank0_steps2-3.pt.trace.json"
    profiler = StepProfiler((2, 3), trace)
    traced_steps(profiler, range(1, 3), last=10)
    assert not trace.exists()  # step 3 not run yet
    traced_steps(profiler, range(3, 6), last=10)
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)
    assert not list(trace.parent.glob("*.partial"))


def test_a_run_that_ends_inside_the_range_writes_what_it_traced(tmp_path):
    trace = tmp_path / "rank0_steps4-9.pt.trace.json"
    traced_steps(StepProfiler((4, 9), trace), range(1, 6), last=5)
    assert trace.is_file()
    untouched = tmp_path / "unused.pt.trace.json"
    traced_steps(StepProfiler(None, untouched), range(1, 6), last=5)
    assert not untouched.exists()
