import json

import pytest
from conftest import run_lmscale

from lmscale.errors import LmscaleError
from lmscale.report import report, summarize


def write_run(tmp_path):
    records = [{"step": 0, "eval_loss": 9.0, "eval_ppl": 8103.1}]
    for step in range(10, 110, 10):
        records.append(
            {
                "step": step,
                "loss": 9 - step / 20,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "tokens_per_s": 1000.0 + step,
                "padding_frac": 0.01,
                "tokens_seen": step * 100,
                "memory_rss_gb": 1.5,
                "mfu": 0.4,
            }
        )
    records.append({"step": 100, "eval_loss": 4.0, "eval_ppl": 54.6})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_summary_and_plots(tmp_path):
    write_run(tmp_path)
    summary, plots = report(str(tmp_path))
    assert summary["steps"] == 100 and summary["tokens"] == 10000
    assert summary["eval_loss"] == 4.0 and summary["best_eval_loss"] == 4.0
    assert summary["mean_tokens_per_s"] == pytest.approx(1055.0) and summary["mean_mfu"] == pytest.approx(0.4)
    assert sorted(p.name for p in plots) == [
        "loss.png",
        "lr.png",
        "memory.png",
        "padding_frac.png",
        "tokens_per_s.png",
    ]
    for path in plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_summary_without_eval():
    assert summarize([{"step": 5, "loss": 1.0, "tokens_per_s": 2.0, "tokens_seen": 7}]) == {
        "steps": 5,
        "tokens": 7,
        "mean_tokens_per_s": 2.0,
    }


def test_bad_run_dirs(tmp_path):
    with pytest.raises(LmscaleError, match="has no metrics.jsonl"):
        report(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
    with pytest.raises(LmscaleError, match="line 2 is not JSON"):
        report(str(tmp_path))


def test_report_command(tmp_path):
    write_run(tmp_path)
    result = run_lmscale("report", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "lmscale run summary" in result.stderr and "best eval loss" in result.stderr
    assert str(tmp_path / "loss.png") in result.stdout
    assert run_lmscale("report", str(tmp_path / "nope")).returncode == 1
