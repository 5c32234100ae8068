"""The run directory: every name in it (RunDir), and the rules around it: never overwritten by
accident, checked before a resume, written by rank 0.

No other module spells a run directory's file names: they ask a RunDir.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from lmscale.atomic import write_atomically
from lmscale.errors import ConfigError

if TYPE_CHECKING:
    from lmscale.config import Config

# Keys that may change between a run and its resume (paths to caches, worker counts, the length of training).
# model.router_bias_update: how fast the routing bias moves is a training schedule, not the model (DeepSeek-V3
# set it to 0 for its last 500B tokens), so a resume may change it.
RESUMABLE_CHANGES = {
    "data.cache_dir",
    "data.num_workers",
    "data.num_proc",
    "train.max_steps",
    "model.router_bias_update",
}


@dataclass(frozen=True)
class RunDir:
    """The files and folders of one run, by what they are."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of(cls, config: Config) -> RunDir:
        """The run directory a config names (its output_dir)."""
        return cls(Path(config.output_dir))

    @property
    def config(self) -> Path:  # the resolved lmscale config
        return self.root / "config.yaml"

    @property
    def ds_config(self) -> Path:  # the DeepSpeed config the engine was built with
        return self.root / "ds_config.json"

    @property
    def metrics(self) -> Path:  # one JSON object per logged step
        return self.root / "metrics.jsonl"

    @property
    def expert_load(self) -> Path:  # a mixture-of-experts model's tokens per expert and layer, at log steps
        return self.root / "expert_load.jsonl"

    @property
    def samples(self) -> Path:  # an online method's prompts, completions and rewards, at log steps
        return self.root / "samples.jsonl"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def labels(self) -> Path:  # classification: class names in id order, for export and eval
        return self.root / "labels.json"

    @property
    def finished(
        self,
    ) -> Path:  # written when a run ends other than by a stop signal (SLURM requeues otherwise)
        return self.root / "finished"

    @property
    def wandb_run_id(self) -> Path:  # so that a resumed run continues the same W&B run
        return self.root / "wandb_run_id"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def slurm(self) -> Path:  # the rendered sbatch script, the job id, the job's logs
        return self.root / "slurm"

    @property
    def lock(self) -> Path:  # the job training here (lmscale.checkpointing.runlock)
        return self.root / "lmscale.lock"

    @property
    def data_fingerprint(self) -> Path:  # the data files as they were at the run's start
        return self.root / "data_fingerprint.json"

    @property
    def reference_logps(self) -> Path:  # DPO: the starting model's log-probabilities of every pair's replies
        return self.root / "reference_logps.npz"

    @property
    def report(self) -> Path:  # the dashboard `lmscale report` draws
        return self.root / "report.png"

    def harness_results(self, tag: str) -> Path:  # lm-eval scores of checkpoint `tag` (step_N)
        return self.root / "eval" / f"harness-{tag}.json"

    def hang_dump(self, rank: int) -> Path:  # every thread's stack of a rank the watchdog ended
        return self.root / f"hang_rank{rank}.txt"

    def profile_trace(self, rank: int, steps: tuple[int, int]) -> Path:  # a rank's train.profile_steps trace
        return self.root / "profile" / f"rank{rank}_steps{steps[0]}-{steps[1]}.pt.trace.json"

    def flight_recorder(self, rank: int) -> Path:  # a rank's last collectives, written when it hangs (JSON)
        return self.root / f"flight_recorder_rank{rank}.json"

    @property
    def nccl_dump_prefix(self) -> Path:  # NCCL's own dump on a collective timeout: this + the rank
        return self.root / "flight_recorder_nccl_rank"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def latest(self) -> Path:  # the newest complete checkpoint's tag; moved last
        return self.checkpoints / "latest"

    @property
    def best(self) -> Path:  # the tag of the checkpoint with the lowest held-out loss
        return self.checkpoints / "best"

    def best_tag(self) -> str | None:
        return self.best.read_text(encoding="utf-8").strip() if self.best.is_file() else None

    @staticmethod
    def complete_marker(checkpoint: Path) -> Path:
        """A checkpoint counts only with this manifest (step, ranks, every file's size and checksum)."""
        return checkpoint / "COMPLETE"

    def run_files(self) -> list[Path]:
        """The run's own files, apart from its checkpoints: what a mirror keeps beside them so that a run
        restored on another machine is the same run (its config, tokenizer, data fingerprint, metrics)."""
        singles = [
            self.config,
            self.ds_config,
            self.data_fingerprint,
            self.metrics,
            self.expert_load,
            self.samples,
            self.labels,
        ]
        singles += [self.wandb_run_id, self.reference_logps]
        tokenizer = (
            sorted(p for p in self.tokenizer.rglob("*") if p.is_file()) if self.tokenizer.is_dir() else []
        )
        return [p for p in singles if p.is_file()] + tokenizer

    def markers(self) -> list[Path]:
        """What makes a directory hold a run."""
        return [self.config, self.metrics, self.checkpoints]


def holds_run(output_dir: Path) -> list[str]:
    return [path.name for path in RunDir(output_dir).markers() if path.exists()]


def check_output_dir(output_dir: Path, force: bool, resume: str) -> None:
    """An output_dir holding a run is resumed (resume: auto/path) or refused (resume: none), unless --force."""
    existing = holds_run(output_dir)
    if existing and not force and resume == "none":
        raise ConfigError(
            f"output_dir={output_dir} already holds a run ({', '.join(existing)}) and checkpoint.resume=none: "
            "choose a new output_dir=..., resume it with checkpoint.resume=auto, or pass --force to replace it"
        )
    probe = output_dir if output_dir.exists() else next(p for p in output_dir.parents if p.exists())
    if not probe.is_dir():
        raise ConfigError(
            f"output_dir={output_dir} is inside {probe}, which is a file: choose a directory path"
        )
    problem = cannot_create_in(probe)
    if problem:
        raise ConfigError(
            f"output_dir={output_dir} cannot be written ({problem} in {probe}): choose a directory you can write to"
        )


def cannot_create_in(directory: Path) -> str | None:
    """Why nothing can be created in `directory`, found by creating (and removing) an empty directory
    there: os.access says yes to root on a read-only filesystem, /proc or /sys."""
    try:
        Path(tempfile.mkdtemp(dir=directory, prefix=".lmscale-probe-")).rmdir()
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def check_resume_compatible(output_dir: Path, config: Config) -> None:
    """Resuming with another model or data would silently train something else: refuse, naming the keys."""
    from lmscale.config import flatten

    path = RunDir(output_dir).config
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
    from lmscale.data.fingerprint import changed_data, data_fingerprint, read_fingerprint

    saved = read_fingerprint(RunDir(output_dir).data_fingerprint)
    if saved is None:
        return
    difference = changed_data(saved, data_fingerprint(config.data))
    if difference:
        raise ConfigError(
            f"{difference} since the run in output_dir={output_dir} started: restore it to resume that run, "
            "or pass --force (or choose another output_dir) to start a new one on the data as it is now"
        )


def write_run_files(config: Config, ds_config: dict, output_dir: Path, forced: bool) -> None:
    from lmscale.config import config_to_yaml
    from lmscale.data.fingerprint import write_fingerprint

    run = RunDir(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if forced:  # --force replaces the old run whole, so no stale checkpoint or metric survives
        for path in (run.metrics, run.expert_load, run.samples, run.wandb_run_id):
            path.unlink(missing_ok=True)
        shutil.rmtree(run.checkpoints, ignore_errors=True)
    run.finished.unlink(missing_ok=True)  # this run is not finished until it says so
    write_atomically(run.config, config_to_yaml(config))
    if forced or not run.data_fingerprint.is_file():  # a resume keeps the start's fingerprint
        write_fingerprint(run.data_fingerprint, config.data)
    write_atomically(run.ds_config, json.dumps(ds_config, indent=2) + "\n")


def write_labels(output_dir: Path, labels: list[str] | None) -> None:
    if labels is not None:
        write_atomically(RunDir(output_dir).labels, json.dumps(labels) + "\n")


def read_labels(output_dir: Path) -> list[str] | None:
    path = RunDir(output_dir).labels
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def mark_finished(output_dir: Path, step: int, reason: str) -> None:
    write_atomically(RunDir(output_dir).finished, json.dumps({"step": step, "reason": reason}) + "\n")


def truncate_metrics(output_dir: Path, last_step: int) -> None:
    """Drop records logged after the checkpoint being resumed, so steps never go backwards in metrics.jsonl
    (or expert_load.jsonl, samples.jsonl)."""
    run = RunDir(output_dir)
    for path in (run.metrics, run.expert_load, run.samples):
        if path.is_file():
            truncate_jsonl(path, last_step)


def truncate_jsonl(path: Path, last_step: int) -> None:
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut by the crash
    write_atomically(path, "".join(f"{line}\n" for line in kept))
