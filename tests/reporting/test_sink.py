"""The metrics sink: metrics.jsonl as the record, plain progress lines off a terminal, the run's summary,
and silence on every rank but rank 0."""

import json

from lmscale.checkpointing.rundir import RunDir
from lmscale.config import Config
from lmscale.reporting.sink import MetricsSink, wandb_run_id, wandb_summary


def a_sink(tmp_path, enabled=True, initial_step=0):
    config = Config(output_dir=str(tmp_path)).model_copy(deep=True)
    config.wandb.mode = "disabled"
    return MetricsSink(config, RunDir(tmp_path), total_steps=10, enabled=enabled, initial_step=initial_step)


def test_each_logged_step_is_one_json_line_and_a_plain_progress_line(tmp_path, capsys):
    sink = a_sink(tmp_path)
    sink.log(2, {"loss": 3.5, "lr": 1e-3, "tokens_per_s": 1234.0})
    sink.log(2, {"eval_loss": 3.25, "eval_ppl": 25.8})
    sink.message("step 2: held-out loss 3.2500")
    records = [json.loads(line) for line in RunDir(tmp_path).metrics.read_text().splitlines()]
    assert records == [
        {"step": 2, "loss": 3.5, "lr": 1e-3, "tokens_per_s": 1234.0},
        {"step": 2, "eval_loss": 3.25, "eval_ppl": 25.8},
    ]
    err = capsys.readouterr().err.splitlines()  # pytest's stderr is no terminal: lines, not a bar
    assert err[0].startswith("lmscale: step 2/10: loss 3.5000, lr 1.000e-03, 1,234 tokens/s, ETA ")
    assert err[1] == "lmscale: step 2: held-out loss 3.2500"  # an evaluation has no progress line


def test_the_summary_adds_the_best_eval_loss_and_mean_throughput(tmp_path, capsys):
    sink = a_sink(tmp_path)
    for step, (loss, speed) in enumerate([(3.0, 100.0), (2.0, 300.0), (2.5, 200.0)], start=1):
        sink.log(step, {"loss": loss, "tokens_per_s": speed})
        sink.log(step, {"eval_loss": loss + 0.1})
    summary = sink.summary({"steps": 3, "eval_loss": 2.6})
    assert summary == {"steps": 3, "eval_loss": 2.6, "best_eval_loss": 2.1, "mean_tokens_per_s": 200.0}
    sink.close({"steps": 3, "eval_loss": 2.6})
    table = capsys.readouterr().err
    assert "best eval loss" in table and "2.1000" in table and "mean tokens/s" in table
    assert wandb_summary(summary) == {
        "steps": 3,
        "eval/loss": 2.6,
        "eval/best_loss": 2.1,
        "perf/mean_tokens_per_s": 200.0,
    }


def test_ranks_other_than_zero_write_and_say_nothing(tmp_path, capsys):
    sink = a_sink(tmp_path, enabled=False)
    sink.log(1, {"loss": 1.0})
    sink.message("hello")
    sink.close({"steps": 1})
    assert not RunDir(tmp_path).metrics.exists() and capsys.readouterr().err == ""


def test_a_resumed_run_keeps_its_wandb_id_and_counts_eta_from_where_it_resumed(tmp_path, capsys):
    first = wandb_run_id(RunDir(tmp_path))
    assert wandb_run_id(RunDir(tmp_path)) == first and len(first) == 16  # the same W&B run continues
    sink = a_sink(tmp_path, initial_step=8)
    assert sink.progress.eta_s(8) is None  # nothing done since the resume: no guess
    sink.log(9, {"loss": 1.0})
    assert "step 9/10" in capsys.readouterr().err
