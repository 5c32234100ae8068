"""Starting jobs: debug mode in this process, or the `deepspeed` launcher for several ranks/nodes.

The launcher glue is ours; process spawning, rendezvous and multi-node fan-out are DeepSpeed's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from lmscale.errors import ConfigError

LAUNCHER_SCRIPT = Path(__file__).resolve().parent.parent / "launcher" / "train.py"


HOSTFILE_LINE = re.compile(r"^\S+\s+slots=[1-9]\d*$")


def check_hostfile(path: Path) -> None:
    """A DeepSpeed hostfile: `hostname slots=N` per line (# comments, blank lines allowed); checked up front."""
    if not path.is_file():
        raise ConfigError(f"hostfile {path} does not exist: give a file of 'host slots=N' lines")
    hosts = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not HOSTFILE_LINE.match(text):
            raise ConfigError(
                f"hostfile {path} line {number} ({text!r}) is not 'host slots=N': fix that line"
            )
        hosts.append(text.split()[0])
    if not hosts:
        raise ConfigError(f"hostfile {path} names no hosts: add 'host slots=N' lines")
    if len(set(hosts)) != len(hosts):
        raise ConfigError(f"hostfile {path} names a host twice: list each host once")


def deepspeed_command(
    nproc: int,
    config_path: str | None,
    overrides: list[str],
    hostfile: str | None,
    force: bool,
    master_port: int,
) -> list[str]:
    """The `deepspeed` command line that runs the lmscale worker on `nproc` ranks per node."""
    launcher = shutil.which("deepspeed")
    if launcher is None:
        raise ConfigError(
            "the `deepspeed` launcher is not on PATH: pip install deepspeed, or activate its environment"
        )
    command = [launcher, "--num_gpus", str(nproc), "--master_port", str(master_port)]
    if hostfile:
        check_hostfile(Path(hostfile))
        command += ["--hostfile", hostfile]
    # From a checkout, run the same script users pass to `deepspeed`; from an installed wheel, the module.
    command += [str(LAUNCHER_SCRIPT)] if LAUNCHER_SCRIPT.is_file() else ["--module", "lmscale.worker"]
    if config_path:
        command += ["--config", config_path]
    if force:
        command.append("--force")
    return command + list(overrides)


def run_deepspeed(command: list[str]) -> int:
    """Run the launcher; on a machine with no GPU its ranks use DeepSpeed's CPU accelerator."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    print("lmscale: " + " ".join(command), file=sys.stderr, flush=True)
    return subprocess.call(command, env=env)
