"""`lmscale sweep`: spec validation, and a real 4-trial Bayesian sweep of the tiny model that resumes."""

import csv

import pytest
import yaml
from helpers import run_lmscale

from lmscale.errors import ConfigError
from lmscale.jobs.sweep import load_spec


def write_spec(tmp_path, **fields):
    spec = {
        "method": "bayes",
        "trials": 4,
        "metric": "eval_loss",
        "overrides": {"output_dir": str(tmp_path / "sweep")},
        "space": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
        **fields,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"method": "annealing"}, "method"),
        ({"overrides": {}}, "overrides needs output_dir"),
        ({"space": {}}, "space is empty"),
        ({"space": {"optim.lr": {"type": "uniform", "low": 1.0, "high": 0.1}}}, "uniform needs low < high"),
        (
            {"space": {"optim.lr": {"type": "loguniform", "low": 0.0, "high": 0.1}}},
            "loguniform needs low > 0",
        ),
        (
            {"space": {"optim.name": {"type": "choice", "values": []}}},
            "a choice needs a non-empty values list",
        ),
        (
            {"space": {"train.learning_rate": {"type": "choice", "values": [1]}}},
            "unknown config keys train.learning_rate",
        ),
        ({"method": "grid"}, "grid needs choice or int parameters, not optim.lr"),
        ({"trials": 0}, "trials"),
        ({"space": {"optim.lr": {"type": "choice", "values": [-1.0]}}}, "optim.lr"),
    ],
)
def test_bad_sweep_specs_are_one_line_errors(tmp_path, fields, fragment):
    with pytest.raises(ConfigError, match=fragment) as error:
        load_spec(write_spec(tmp_path, **fields))
    assert "\n" not in str(error.value)


def test_missing_or_broken_spec_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("space: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(tmp_path / "broken.yaml")


def test_parallel_trials_get_disjoint_devices_or_a_share_of_the_cores(tmp_path):
    from lmscale.jobs.sweep import device_slots

    fixed = {"overrides": {"output_dir": str(tmp_path / "sweep"), "schedule.min_lr": 0.0}}
    spec = load_spec(write_spec(tmp_path, parallel=2, **fixed))
    assert device_slots(spec, gpus=[0, 1, 2, 3], cores=8) == [
        {"CUDA_VISIBLE_DEVICES": "0,1"},
        {"CUDA_VISIBLE_DEVICES": "2,3"},
    ]
    assert device_slots(spec, gpus=[], cores=8) == [{"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}] * 2
    listed = load_spec(write_spec(tmp_path, parallel=2, devices=[5, 7, 6], **fixed))
    assert device_slots(listed, gpus=[0], cores=2) == [
        {"CUDA_VISIBLE_DEVICES": "5"},
        {"CUDA_VISIBLE_DEVICES": "7"},
    ]
    with pytest.raises(ConfigError, match="parallel=3 needs at least that many GPUs, but has 2"):
        device_slots(load_spec(write_spec(tmp_path, parallel=3, **fixed)), gpus=[0, 1], cores=8)


@pytest.mark.slow
def test_bayesian_sweep_runs_real_trials_picks_the_best_and_resumes(tmp_path, cache_dir):
    spec = write_spec(
        tmp_path,
        overrides={
            "output_dir": str(tmp_path / "sweep"),
            "data.cache_dir": str(cache_dir),
            "data.max_seq_len": 64,
            "data.vocab_size": 1024,
            "data.max_tokens_per_batch": 1024,
            "train.max_steps": 12,
            "schedule.warmup_steps": 1,
            "schedule.min_lr": 0.0,
            "train.eval_every": 4,
            "train.eval_batches": 2,
            "wandb.mode": "disabled",
        },
        space={
            "optim.lr": {"type": "loguniform", "low": 1e-5, "high": 3e-3},
            "optim.name": {"type": "choice", "values": ["adamw", "lion"]},
        },
        parallel=2,  # two trials at a time, one core each
    )
    result = run_lmscale("sweep", str(spec))
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert len(rows) == 4 and {r["state"] for r in rows} <= {"complete", "pruned"}
    complete = [r for r in rows if r["state"] == "complete"]
    best = min(complete, key=lambda r: float(r["eval_loss"]))
    chosen = yaml.safe_load((sweep / "best.yaml").read_text())
    assert chosen["optim"]["lr"] == pytest.approx(float(best["optim.lr"]))
    assert chosen["optim"]["name"] == best["optim.name"]
    assert f"best: trial {best['trial']}" in result.stdout
    for row in complete:  # each trial is a real run in its own run dir
        assert (
            sweep / f"trial_{int(row['trial']):03d}" / "checkpoints" / "step_00000012" / "COMPLETE"
        ).is_file()

    again = run_lmscale("sweep", str(spec))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 trial(s) already finished" in again.stdout and "0 to run" in again.stdout
    assert len(list(csv.DictReader((sweep / "sweep.csv").open()))) == 4
