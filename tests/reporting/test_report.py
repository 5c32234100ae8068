import json

import pytest
from helpers import run_lmscale

from lmscale.errors import LmscaleError
from lmscale.reporting.report import report, summarize


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


def test_summary_and_dashboard(tmp_path):
    write_run(tmp_path)
    summary, dashboard = report(str(tmp_path))
    assert summary["steps"] == 100 and summary["tokens"] == 10000
    assert summary["eval_loss"] == 4.0 and summary["best_eval_loss"] == 4.0
    assert summary["mean_tokens_per_s"] == pytest.approx(1055.0) and summary["mean_mfu"] == pytest.approx(0.4)
    assert dashboard == tmp_path / "report.png"
    assert dashboard.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and dashboard.stat().st_size > 50_000


def test_dashboard_panels_plot_what_they_name(tmp_path):
    """Each panel draws its metrics (eval loss at its steps' tokens), rates and sizes from zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmscale.reporting.report import PANELS, tokens_at, write_dashboard

    write_run(tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert tokens_at(records)[100] == 10000 and tokens_at(records)[0] == 0
    saved = []
    original = plt.Figure.savefig
    plt.Figure.savefig = lambda figure, *a, **k: (saved.append(figure), original(figure, *a, **k))[1]
    try:
        write_dashboard(records, tmp_path / "out", "run")
    finally:
        plt.Figure.savefig = original
    panels = {axes.get_title(): axes for axes in saved[0].axes if axes.get_title()}
    assert list(panels) == [title for title, *_ in PANELS]
    by_tokens = panels["Loss by tokens"].get_lines()
    assert [line.get_label() for line in by_tokens] == ["loss", "eval_loss"]
    assert list(by_tokens[1].get_xdata()) == [0, 10000]
    for title, _, _, from_zero in PANELS:
        if from_zero:
            assert panels[title].get_ylim()[0] == 0, title
    assert panels["Throughput"].get_legend() is not None
    assert "mfu" in [t.get_text() for t in panels["Throughput"].get_legend().get_texts()]


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
    assert str(tmp_path / "report.png") in result.stdout
    elsewhere = run_lmscale("report", str(tmp_path), "--out", str(tmp_path / "plots"))
    assert elsewhere.returncode == 0 and (tmp_path / "plots" / "report.png").is_file()
    assert run_lmscale("report", str(tmp_path / "nope")).returncode == 1


def test_dashboard_title_names_the_model_and_layout(tmp_path):
    from lmscale.reporting.report import run_title, saved_configs

    assert run_title(tmp_path, *saved_configs(tmp_path)) == str(tmp_path)  # metrics only: the directory alone
    (tmp_path / "config.yaml").write_text("model:\n  preset: tiny-llama\nprecision: bf16\n")
    ds_config = {"zero_optimization": {"stage": 3}, "sequence_parallel_size": 2}
    (tmp_path / "ds_config.json").write_text(json.dumps(ds_config))
    assert (
        run_title(tmp_path, *saved_configs(tmp_path)) == f"{tmp_path} (tiny-llama, bf16, ZeRO-3, sequence 2)"
    )
    (tmp_path / "config.yaml").write_text(
        "model:\n  preset: tiny-llama\nprecision: bf16\nfinetune:\n  method: dpo\n"
    )
    assert (
        run_title(tmp_path, *saved_configs(tmp_path))
        == f"{tmp_path} (tiny-llama, dpo, bf16, ZeRO-3, sequence 2)"
    )
    (tmp_path / "config.yaml").write_text("model:\n  preset: tiny-mixtral\nprecision: fp32\n")
    (tmp_path / "ds_config.json").write_text(json.dumps({"expert_parallel": {"autoep_size": 2}}))
    assert (
        run_title(tmp_path, *saved_configs(tmp_path)) == f"{tmp_path} (tiny-mixtral, fp32, ZeRO-0, expert 2)"
    )


def test_report_of_a_dpo_run_shows_its_preference_figures(tmp_path):
    """A DPO run logs no perplexity: its summary and panels are the method's (preference accuracy, rewards)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [{"step": 0, "eval_loss": 0.69, "eval_pref_accuracy": 0.5, "eval_rewards_margin": 0.0}]
    for step in range(1, 11):
        figures = {"loss": 0.69 - step / 100, "tokens_per_s": 10.0, "tokens_seen": step * 10, "lr": 1e-4}
        figures |= {
            "pref_accuracy": 0.5 + step / 40,
            "rewards_chosen": step / 10,
            "rewards_rejected": -step / 10,
        }
        records.append({"step": step, **figures, "rewards_margin": step / 5})
    records.append({"step": 10, "eval_loss": 0.5, "eval_pref_accuracy": 0.875, "eval_rewards_margin": 1.5})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "config.yaml").write_text("model:\n  preset: tiny-llama\nfinetune:\n  method: dpo\n")
    saved = []
    original = plt.Figure.savefig
    plt.Figure.savefig = lambda figure, *a, **k: (saved.append(figure), original(figure, *a, **k))[1]
    try:
        summary, dashboard = report(str(tmp_path))
    finally:
        plt.Figure.savefig = original
    assert summary["eval_pref_accuracy"] == 0.875 and summary["eval_rewards_margin"] == 1.5
    assert "eval_ppl" not in summary and summary["eval_loss"] == 0.5
    panels = {axes.get_title(): axes for axes in saved[0].axes if axes.get_title()}
    assert panels["Loss by step"].get_ylabel() == "DPO loss (nats/pair)"
    accuracy = panels["Preference accuracy"]
    assert [line.get_label() for line in accuracy.get_lines()] == ["pref_accuracy", "eval_pref_accuracy"]
    assert "rewards_margin" in [line.get_label() for line in panels["Rewards"].get_lines()]


def test_a_grpo_report_draws_its_greedy_reward_with_the_rewards_not_with_the_loss():
    from lmscale.methods import GRPO, SFT
    from lmscale.reporting.report import dashboard_panels

    panels = {title: keys for title, _, keys, _ in dashboard_panels(GRPO.figures)}
    assert panels["Loss by step"] == ("loss",) and panels["Loss by tokens"] == ("loss",)
    assert panels["Reward"] == ("reward", "eval_reward")
    assert {title: keys for title, _, keys, _ in dashboard_panels(SFT.figures)}["Loss by step"] == (
        "loss",
        "eval_loss",
    )


def test_a_mixture_of_experts_report_shows_its_routing(tmp_path):
    """Expert load, routing bias and the last step's loads per layer and expert; a dense run shows none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmscale.reporting.report import MOE_PANELS, last_expert_loads, write_dashboard

    write_run(tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for record in records[1:-1]:
        record.update(expert_load_max_over_mean=1.5, expert_load_min_over_mean=0.5, router_bias_absmax=0.01)
    loads = [{"step": 10, "tokens_per_expert": [[1, 1, 1, 1], [2, 2, 2, 2]]}]
    loads.append({"step": 20, "tokens_per_expert": [[30, 10, 0, 0], [10, 10, 10, 10]]})
    text = "".join(json.dumps(line) + "\n" for line in loads)
    (tmp_path / "expert_load.jsonl").write_text(text + '{"step": 30, "tokens_per_exp')  # killed mid-line
    assert last_expert_loads(tmp_path) == (20, [[30, 10, 0, 0], [10, 10, 10, 10]])
    saved = []
    original = plt.Figure.savefig
    plt.Figure.savefig = lambda figure, *a, **k: (saved.append(figure), original(figure, *a, **k))[1]
    try:
        write_dashboard(records, tmp_path / "moe", "run", expert_loads=last_expert_loads(tmp_path))
        write_dashboard(records[:1] + records[-1:], tmp_path / "dense", "run")
    finally:
        plt.Figure.savefig = original
    moe = {axes.get_title(): axes for axes in saved[0].axes if axes.get_title()}
    assert [title for title in moe][-3:] == ["Expert load", "Routing bias", "Expert load by layer (step 20)"]
    assert "Router loss" not in moe  # not logged (DeepSeek-V3 has no auxiliary loss)
    assert [line.get_label() for line in moe["Expert load"].get_lines()] == list(MOE_PANELS[0][2])
    heat = moe["Expert load by layer (step 20)"].get_images()[0].get_array()
    assert heat.tolist() == [[3.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    dense = [axes.get_title() for axes in saved[1].axes if axes.get_title()]
    assert not set(dense) & {"Expert load", "Routing bias", "Router loss"}
    assert last_expert_loads(tmp_path / "dense") is None
