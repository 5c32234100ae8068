"""A normal install (a wheel, no source tree) carries the recipes, DeepSpeed JSONs, sbatch template and
launcher script, and the commands that use them work from it."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow

SHIPPED = [
    "lmscale/resources/configs/tiny-cpu.yaml",
    "lmscale/resources/configs/gpt2-124m.yaml",
    "lmscale/resources/ds_configs/zero2_bf16.json",
    "lmscale/resources/slurm/lmscale.sbatch.template",
    "lmscale/resources/launcher/train.py",
]


def run(*command, cwd=None):
    # Without PYTHONPATH: the installed wheel, not a checkout on the path, must be what runs.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def share_site_packages(python) -> None:
    """Let the venv of `python` import what this interpreter has installed, wherever that is (a venv of its
    own, a user site, the system's): one path per line of a .pth file. --system-site-packages would give the
    base interpreter's packages only, which lack the dependencies when the tests run inside a venv. The
    directories' own .pth files are not read, so an editable install of the checkout stays invisible."""
    import site

    directories = [*site.getsitepackages(), site.getusersitepackages()]
    inner = run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    lines = [d for d in dict.fromkeys(directories) if os.path.isdir(d)]
    (Path(inner) / "outer_site_packages.pth").write_text("\n".join(lines) + "\n")


def test_wheel_carries_its_files_and_slurm_submit_works_from_it(tmp_path):
    # No build isolation: the build needs only setuptools, which the test environment has.
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        str(REPO),
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(tmp_path),
    )
    (wheel,) = tmp_path.glob("lmscale-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(SHIPPED) <= names, sorted(set(SHIPPED) - names)
    for pattern in ("configs/", "ds_configs/", "slurm/", "launcher/"):
        shipped = {n for n in names if n.startswith(f"lmscale/resources/{pattern}")}
        in_repo = {f"lmscale/resources/{pattern}{p.name}" for p in (REPO / pattern).iterdir()}
        assert shipped <= in_repo and shipped, pattern  # real files, the same as the repository's

    # Installed into a fresh environment that sees this interpreter's dependencies but not the source tree.
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv))
    python = venv / "bin" / "python"
    share_site_packages(python)
    run(str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(str(python), "-c", "import lmscale; print(lmscale.__file__)", cwd=elsewhere).stdout
    assert str(REPO) not in where  # the wheel's copy, not the checkout
    result = run(
        str(python),
        "-m",
        "lmscale.cli",
        "slurm",
        "submit",
        "configs/tiny-cpu.yaml",
        "--dry-run",
        "--nodes",
        "2",
        "--gpus-per-node",
        "8",
        "deepspeed_config=ds_configs/zero2_bf16.json",
        "zero.stage=2",
        "zero.stage=2",
        f"output_dir={tmp_path / 'run'}",
        cwd=elsewhere,
    )
    script = result.stdout
    assert "#SBATCH --nodes=2" in script and "lmscale/resources/launcher/train.py" in script
    assert str(venv) in script and "resources/configs/tiny-cpu.yaml" in script
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
