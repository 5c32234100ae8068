"""`lmscale sweep SWEEP.yaml`: hyperparameter search where every trial is a real lmscale run.

Search (grid, random, Bayesian TPE) and pruning (median pruner on the metric as it is logged) are
Optuna's; the study lives in `<output_dir>/optuna.db`, so re-running the same sweep skips finished
trials. Each trial runs `lmscale train` in `<output_dir>/trial_NNN` (its own run dir, config and
checkpoints), in W&B group = the sweep's name; `parallel` trials run at once (Optuna threads, each
starting one process), each on its own share of the GPUs, or of the CPU cores on a machine without
one. Results: `<output_dir>/sweep.csv`, a console table, and the best trial's whole config as
`<output_dir>/best.yaml`.
"""

from __future__ import annotations

import csv
import json
import os
import queue
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmscale.atomic import write_atomically
from lmscale.checkpointing.rundir import RunDir
from lmscale.config import Config, config_to_yaml, flatten, load_config
from lmscale.errors import ConfigError


class Parameter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["choice", "uniform", "loguniform", "int"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _check(self) -> Parameter:
        if self.type == "choice":
            if not self.values:
                raise ValueError("a choice needs a non-empty values list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.type} needs low < high")
        elif self.type == "loguniform" and self.low <= 0:
            raise ValueError("loguniform needs low > 0")
        return self


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str | None = Field(None, description="The config every trial starts from (unset: the defaults).")
    method: Literal["grid", "random", "bayes"] = "bayes"
    trials: int = Field(20, ge=1, description="Trials to run (grid: every combination, at most this many).")
    metric: str = Field("eval_loss", description="Minimised; the last value a trial logged counts.")
    parallel: int = Field(1, ge=1, description="Trials running at once, each on its own devices.")
    devices: list[int] | None = Field(
        None, description="GPU ids shared out among parallel trials (unset: every visible GPU, or none)."
    )
    overrides: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Parameter]

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        if "output_dir" not in self.overrides:
            raise ValueError("overrides needs output_dir: the sweep's directory (sweep.csv goes there)")
        if not self.space:
            raise ValueError("space is empty: name at least one config key to search")
        if self.method == "grid":
            continuous = [k for k, p in self.space.items() if p.type in ("uniform", "loguniform")]
            if continuous:
                raise ValueError(f"grid needs choice or int parameters, not {', '.join(continuous)}")
        return self


def load_spec(path: Path) -> SweepSpec:
    """The sweep spec, validated; any problem is one ConfigError naming it."""
    if not path.is_file():
        raise ConfigError(f"sweep spec {path} does not exist: give a YAML file (see README, Sweeps)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        spec = SweepSpec.model_validate(raw if isinstance(raw, dict) else {"space": raw})
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"sweep spec {path} is not valid YAML ({exc.__class__.__name__}): fix its syntax"
        ) from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"sweep spec {path}: {problems}") from None
    unknown = sorted(set(spec.space) - set(flatten(Config().model_dump())))
    if unknown:
        raise ConfigError(f"sweep spec {path}: space names unknown config keys {', '.join(unknown)}")
    check_trial_config(spec)
    return spec


def check_trial_config(spec: SweepSpec) -> None:
    """A trial's run (base + overrides + a sample) must open as `lmscale train` would open it: valid, its
    model and packages there. Its directory is not checked: trials resume or start in their own."""
    from lmscale.parallel.engine import has_gpu
    from lmscale.runs.run import StartChecks, open_run

    overrides = overrides_for(spec, sample_of(spec))
    open_run(spec.base, overrides, world_size=1, has_gpu=has_gpu(), checks=StartChecks.NONE)


def sample_of(spec: SweepSpec) -> dict[str, Any]:
    return {
        k: p.values[0] if p.type == "choice" else (int(p.low) if p.type == "int" else p.low)
        for k, p in spec.space.items()
    }


def overrides_for(spec: SweepSpec, params: dict[str, Any], output_dir: Path | None = None) -> list[str]:
    values = {**spec.overrides, **params}
    if output_dir is not None:
        values["output_dir"] = str(output_dir)
    return [
        f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in values.items()
    ]


def suggest(trial, spec: SweepSpec) -> dict[str, Any]:
    params = {}
    for key, p in spec.space.items():
        if p.type == "choice":
            params[key] = trial.suggest_categorical(key, p.values)
        elif p.type == "int":
            params[key] = trial.suggest_int(key, int(p.low), int(p.high))
        else:
            params[key] = trial.suggest_float(key, p.low, p.high, log=p.type == "loguniform")
    return params


def metric_values(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    values = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if metric in record and record.get("step", 0) > 0:
            values.append((record["step"], float(record[metric])))
    return values


def device_slots(spec: SweepSpec, gpus: list[int], cores: int) -> list[dict[str, str]]:
    """The environment of each of `parallel` trial slots: disjoint GPUs, or a share of the CPU cores."""
    devices = spec.devices if spec.devices is not None else gpus
    if not devices:
        threads = str(max(1, cores // spec.parallel))  # trials on one CPU must not oversubscribe its cores
        return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(spec.parallel)]
    if len(devices) < spec.parallel:
        raise ConfigError(
            f"sweep: parallel={spec.parallel} needs at least that many GPUs, but has {len(devices)} "
            f"({devices}): lower parallel or list more devices"
        )
    share = len(devices) // spec.parallel
    return [
        {"CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in devices[i * share : (i + 1) * share])}
        for i in range(spec.parallel)
    ]


@contextmanager
def borrowed(slots: queue.Queue):
    slot = slots.get()
    try:
        yield slot
    finally:
        slots.put(slot)


def run_trial(trial, spec: SweepSpec, sweep_dir: Path, name: str, slots: queue.Queue) -> float:
    """One real `lmscale train` run on a free device slot; reports the metric as it is logged so weak
    trials stop early."""
    with borrowed(slots) as environment:
        return _run_trial(trial, spec, sweep_dir, name, environment)


def _run_trial(trial, spec: SweepSpec, sweep_dir: Path, name: str, environment: dict[str, str]) -> float:
    import optuna

    params = suggest(trial, spec)
    run_dir = sweep_dir / f"trial_{trial.number:03d}"
    command = [sys.executable, "-m", "lmscale.cli", "train", *([spec.base] if spec.base else [])]
    command += [
        *overrides_for(spec, params, run_dir),
        f"wandb.group={name}",
        f"wandb.name={name}-{trial.number:03d}",
    ]
    log_path = sweep_dir / f"trial_{trial.number:03d}.log"
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **environment}
        )
        reported: set[int] = set()
        while process.poll() is None:
            time.sleep(0.5)
            for step, value in metric_values(run_dir, spec.metric):
                if step not in reported:
                    reported.add(step)
                    trial.report(value, step)
                    if trial.should_prune():
                        process.terminate()  # SIGTERM: the run checkpoints and stops at a step boundary
                        process.wait()
                        raise optuna.TrialPruned()
    if process.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(
            f"trial {trial.number} failed (exit {process.returncode}): {' '.join(tail)}; see {log_path}"
        )
    values = metric_values(run_dir, spec.metric)
    if not values:
        raise RuntimeError(f"trial {trial.number} logged no {spec.metric}: see {log_path}")
    return values[-1][1]


def sampler_for(spec: SweepSpec):
    import optuna

    if spec.method == "grid":
        grid = {
            k: (p.values if p.type == "choice" else list(range(int(p.low), int(p.high) + 1)))
            for k, p in spec.space.items()
        }
        return optuna.samplers.GridSampler(grid, seed=0)
    if spec.method == "random":
        return optuna.samplers.RandomSampler(seed=0)
    # With trials running at once, the constant liar keeps TPE from proposing the same point to each.
    return optuna.samplers.TPESampler(
        seed=0, n_startup_trials=min(10, max(2, spec.trials // 2)), constant_liar=spec.parallel > 1
    )


def run_sweep(spec_path: Path) -> Path:
    """Run (or continue) the sweep; returns the sweep directory."""
    import optuna

    spec = load_spec(spec_path)
    sweep_dir = Path(spec.overrides["output_dir"]).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    name = sweep_dir.name
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=name,
        storage=f"sqlite:///{sweep_dir / 'optuna.db'}",
        load_if_exists=True,
        direction="minimize",
        sampler=sampler_for(spec),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    )
    done = [
        t
        for t in study.trials
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    remaining = spec.trials - len(done)
    if done:
        print(f"sweep: {len(done)} trial(s) already finished in {sweep_dir}; {max(0, remaining)} to run")
    if remaining > 0:
        slots: queue.Queue = queue.Queue()
        for slot in device_slots(spec, visible_gpus(), os.cpu_count() or 1):
            slots.put(slot)
        study.optimize(
            lambda trial: run_trial(trial, spec, sweep_dir, name, slots),
            n_trials=remaining,
            n_jobs=spec.parallel,
            catch=(RuntimeError,),
        )
    write_results(study, spec, sweep_dir)
    return sweep_dir


def visible_gpus() -> list[int]:
    import torch

    return list(range(torch.cuda.device_count()))


def write_results(study, spec: SweepSpec, sweep_dir: Path) -> None:
    import optuna

    keys = list(spec.space)
    rows = [
        {
            "trial": t.number,
            "state": t.state.name.lower(),
            **{k: t.params.get(k) for k in keys},
            spec.metric: t.value,
        }
        for t in study.trials
    ]
    with (sweep_dir / "sweep.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["trial", "state", *keys, spec.metric])
        writer.writeheader()
        writer.writerows(rows)
    print_table(rows, keys, spec.metric)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        print(f"no trial completed: see the trial_*.log files in {sweep_dir}")
        return
    best = min(complete, key=lambda t: t.value)
    config, _ = load_config(
        spec.base, overrides_for(spec, best.params, sweep_dir / f"trial_{best.number:03d}")
    )
    write_atomically(sweep_dir / "best.yaml", config_to_yaml(config))
    print(
        f"best: trial {best.number}, {spec.metric} {best.value:.4f}, {best.params}; config {sweep_dir / 'best.yaml'}"
    )


def print_table(rows: list[dict], keys: list[str], metric: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="sweep")
    for column in ("trial", "state", *keys, metric):
        table.add_column(column, justify="right")
    for row in rows:
        value = row[metric]
        table.add_row(
            *(str(row[k]) for k in ("trial", "state", *keys)), "-" if value is None else f"{value:.4f}"
        )
    Console(width=120).print(table)
