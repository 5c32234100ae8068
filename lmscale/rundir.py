"""The run directory: never overwritten by accident, checked before a resume, written by rank 0."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from lmscale.config import Config, config_to_yaml, flatten
from lmscale.data.fingerprint import changed_data, data_fingerprint, read_fingerprint, write_fingerprint
from lmscale.errors import ConfigError

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")
DATA_FINGERPRINT = "data_fingerprint.json"
# Keys that may change between a run and its resume (paths to caches, worker counts, the length of training).
RESUMABLE_CHANGES = {"data.cache_dir", "data.num_workers", "data.num_proc", "train.max_steps"}


def holds_run(output_dir: Path) -> list[str]:
    return [name for name in RUN_MARKERS if (output_dir / name).exists()]


def check_output_dir(output_dir: Path, force: bool, resume: str) -> None:
    """An output_dir holding a run is resumed (resume: auto/path) or refused (resume: none), unless --force."""
    existing = holds_run(output_dir)
    if existing and not force and resume == "none":
        raise ConfigError(
            f"output_dir={output_dir} already holds a run ({', '.join(existing)}) and train.resume=none: "
            "choose a new output_dir=..., resume it with train.resume=auto, or pass --force to replace it"
        )
    probe = output_dir if output_dir.exists() else next(p for p in output_dir.parents if p.exists())
    if not probe.is_dir():
        raise ConfigError(
            f"output_dir={output_dir} is inside {probe}, which is a file: choose a directory path"
        )
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"output_dir={output_dir} is not writable: choose a directory you can write to")


def check_resume_compatible(output_dir: Path, config: Config) -> None:
    """Resuming with another model or data would silently train something else: refuse, naming the keys."""
    path = output_dir / "config.yaml"
    if not path.is_file():
        return
    try:
        saved = flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except yaml.YAMLError:
        saved = {}
    ours = flatten(config.model_dump(mode="json"))
    if not set(saved) >= {"model.preset", "data.max_seq_len"}:
        raise ConfigError(
            f"output_dir={output_dir} holds a config.yaml that is not an lmscale run's: choose a new output_dir or pass --force"
        )
    changed = [
        f"{key}={ours[key]!r} (the run has {saved[key]!r})"
        for key in sorted(ours)
        if key.startswith(("model.", "data."))
        and key not in RESUMABLE_CHANGES
        and key in saved
        and saved[key] != ours[key]
    ]
    if changed:
        raise ConfigError(
            f"output_dir={output_dir} holds a run with other model/data settings: {'; '.join(changed)}: "
            "resume with the run's settings, choose a new output_dir, or pass --force"
        )
    check_data_unchanged(output_dir, config)


def check_data_unchanged(output_dir: Path, config: Config) -> None:
    """The data files must be the ones the run started on (same path is not enough: content counts)."""
    saved = read_fingerprint(output_dir / DATA_FINGERPRINT)
    if saved is None:
        return
    difference = changed_data(saved, data_fingerprint(config.data))
    if difference:
        raise ConfigError(
            f"{difference} since the run in output_dir={output_dir} started: restore it to resume that run, "
            "or pass --force (or choose another output_dir) to start a new one on the data as it is now"
        )


def write_run_files(config: Config, ds_config: dict, output_dir: Path, forced: bool) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    if forced:  # --force replaces the old run whole, so no stale checkpoint or metric survives
        for name in ("metrics.jsonl", "wandb_run_id"):
            (output_dir / name).unlink(missing_ok=True)
        shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    (output_dir / FINISHED).unlink(missing_ok=True)  # this run is not finished until it says so
    (output_dir / "config.yaml").write_text(config_to_yaml(config), encoding="utf-8")
    if forced or not (output_dir / DATA_FINGERPRINT).is_file():  # a resume keeps the start's fingerprint
        write_fingerprint(output_dir / DATA_FINGERPRINT, config.data)
    (output_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n", encoding="utf-8")


LABELS = "labels.json"  # classification runs: class names in id order, for export and eval


def write_labels(output_dir: Path, labels: list[str] | None) -> None:
    if labels is not None:
        (output_dir / LABELS).write_text(json.dumps(labels) + "\n", encoding="utf-8")


def read_labels(output_dir: Path) -> list[str] | None:
    path = output_dir / LABELS
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


FINISHED = "finished"  # written when a run ends other than by a stop signal (SLURM requeues otherwise)


def mark_finished(output_dir: Path, step: int, reason: str) -> None:
    (output_dir / FINISHED).write_text(json.dumps({"step": step, "reason": reason}) + "\n", encoding="utf-8")


def truncate_metrics(output_dir: Path, last_step: int) -> None:
    """Drop records logged after the checkpoint being resumed, so steps never go backwards in metrics.jsonl."""
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut by the crash
    temporary = path.with_name("metrics.jsonl.tmp")
    temporary.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(temporary, path)
