"""`lmscale slurm submit|status|cancel`: SLURM batch jobs that run lmscale on one or more nodes.

The batch script is `slurm/lmscale.sbatch.template` with the job's values filled in (string.Template,
so the rendered script stays a plain, editable sbatch file). Inside the job, `srun` starts one task per
node and each runs DeepSpeed's per-node launcher as lmscale starts it (lmscale.jobs.node_launcher, given the
hostfile: node rank $SLURM_NODEID, the job's GPUs); the rest (signals, requeue) is in the template's comments.
Written by hand because it is glue: SLURM and DeepSpeed do the work.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from lmscale.atomic import write_atomically
from lmscale.checkpointing.rundir import RunDir
from lmscale.errors import ConfigError, LmscaleError
from lmscale.jobs.launch import LAUNCHER_SCRIPT
from lmscale.jobs.node_launcher import node_launcher_prefix
from lmscale.resources import resource

TEMPLATE = resource("slurm/lmscale.sbatch.template")
JOB_ID_FILE = "job_id"  # in <run_dir>/slurm/
# Each job picks its rendezvous port from its id, so jobs sharing a first node do not collide.
PORT_FROM_JOB_ID = "$((20000 + SLURM_JOB_ID % 20000))"


@dataclass
class SlurmJob:
    run_dir: Path
    config_path: str | None
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    ranks_per_node: int = 1  # GPUs per node, or CPU processes with `cpu`
    cpu: bool = False  # CPU ranks: request no GPUs
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    signal_seconds: int = 120
    master_port: int | None = None
    job_name: str = "lmscale"

    def check(self) -> None:
        if self.nodes < 1 or self.ranks_per_node < 1:
            raise ConfigError(
                f"--nodes {self.nodes} --gpus-per-node {self.ranks_per_node}: both must be at least 1"
            )
        if self.signal_seconds < 1:
            raise ConfigError(f"--signal-seconds {self.signal_seconds} must be at least 1")


def _resource_lines(job: SlurmJob) -> str:
    lines = [] if job.cpu else [f"--gpus-per-node={job.ranks_per_node}"]
    if job.cpus_per_task:
        lines.append(f"--cpus-per-task={job.cpus_per_task}")
    for option, value in (("time", job.time), ("partition", job.partition), ("account", job.account)):
        if value:
            lines.append(f"--{option}={value}")
    return "".join(f"#SBATCH {line}\n" for line in lines)


def worker_command(job: SlurmJob) -> str:
    """The launcher's script and lmscale's arguments, pinned to this run dir (as shell words)."""
    script = [str(LAUNCHER_SCRIPT)] if LAUNCHER_SCRIPT.is_file() else ["--module", "lmscale.training.worker"]
    config = ["--config", str(Path(job.config_path).resolve())] if job.config_path else []
    overrides = [o for o in job.overrides if not o.startswith("output_dir=")]
    return shlex.join([*script, *config, *overrides, f"output_dir={job.run_dir}"])


def render(job: SlurmJob) -> str:
    """The batch script for `job`."""
    job.check()
    if not TEMPLATE.is_file():
        raise LmscaleError(
            f"the sbatch template {TEMPLATE} is missing: reinstall lmscale from its repository"
        )
    return Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        job_name=job.job_name,
        nodes=job.nodes,
        resource_lines=_resource_lines(job),
        workdir=Path.cwd(),
        run_dir=job.run_dir,
        signal_seconds=job.signal_seconds,
        master_port=job.master_port or PORT_FROM_JOB_ID,
        ranks_per_node=job.ranks_per_node,
        node_launcher=shlex.join(node_launcher_prefix()),
        worker_command=worker_command(job),
    )


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise LmscaleError(
            f"`{name}` is not on PATH: run this on a SLURM login node (or use --dry-run to see the script)"
        )
    return path


def submit_job(job: SlurmJob, dry_run: bool = False) -> str:
    """Check the job and its config (for its rank count and device) and the run directory, render the sbatch
    script and submit it; returns what to print (the script itself for a dry run, which writes nothing)."""
    from lmscale.runs.preflight import model_fit_problems
    from lmscale.runs.run import StartChecks, open_run

    job.check()
    world_size = job.nodes * job.ranks_per_node
    checks = StartChecks.NONE if dry_run else StartChecks.FULL  # a dry run writes nothing
    run = open_run(job.config_path, job.overrides, world_size, has_gpu=not job.cpu, checks=checks)
    if problems := model_fit_problems(run.config, run.layout):
        raise ConfigError("; ".join(problems))
    job.run_dir = run.dir.root.resolve()
    script = render(job)
    if dry_run:
        return script
    job_id = submit(job, script)
    return f"submitted job {job_id}: log {job.run_dir / 'slurm' / (job_id + '.out')}; lmscale slurm status {job.run_dir}\n"


def submit(job: SlurmJob, script: str) -> str:
    """Write the script into the run dir, `sbatch` it, and return the job id."""
    sbatch = _tool("sbatch")
    slurm_dir = RunDir(job.run_dir).slurm
    slurm_dir.mkdir(parents=True, exist_ok=True)  # sbatch writes the job's log here
    path = slurm_dir / "lmscale.sbatch"
    write_atomically(path, script)
    result = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise LmscaleError(f"sbatch refused {path}: {reason}")
    job_id = result.stdout.strip().split(";")[0]
    write_atomically(slurm_dir / JOB_ID_FILE, job_id + "\n")
    return job_id


def job_id_of(run_dir: Path) -> str:
    path = RunDir(run_dir).slurm / JOB_ID_FILE
    if not path.is_file():
        raise LmscaleError(
            f"{run_dir} has no SLURM job (no slurm/{JOB_ID_FILE}): submit one with lmscale slurm submit"
        )
    return path.read_text(encoding="utf-8").strip()


def status(run_dir: Path) -> str:
    """One line on the run's job: its queue state, or that it left the queue and how the run ended."""
    job_id = job_id_of(run_dir)
    result = subprocess.run(
        [_tool("squeue"), "-h", "-j", job_id, "-o", "%i %T %M %l %R"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode == 0 and result.stdout.strip():
        return f"job {result.stdout.strip()}; log {run_dir / 'slurm' / (job_id + '.out')}"
    finished = RunDir(run_dir).finished
    outcome = f"finished: {finished.read_text().strip()}" if finished.is_file() else "did not finish"
    return f"job {job_id} is no longer queued; the run {outcome}; log {run_dir / 'slurm' / (job_id + '.out')}"


def cancel(run_dir: Path) -> str:
    job_id = job_id_of(run_dir)
    result = subprocess.run([_tool("scancel"), job_id], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LmscaleError(f"scancel {job_id} failed: {result.stderr.strip()}")
    return job_id
