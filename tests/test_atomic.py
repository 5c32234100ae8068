"""Files written whole or not at all, and the one-line errors for places that cannot be written."""

import errno
import os
import shutil
from pathlib import Path

import pytest

from lmscale.atomic import write_atomically
from lmscale.checkpointing.checkpoint import torch_write_failure
from lmscale.checkpointing.rundir import check_output_dir
from lmscale.errors import ConfigError, is_write_failure, write_failure_line


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    write_atomically(path, "model: 1\n")
    assert path.read_text() == "model: 1\n"
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # as open() would make it

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, "model: 2\n" * 1000)
    assert path.read_text() == "model: 1\n" and os.listdir(tmp_path) == ["config.yaml"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_torch_save_failures_become_the_os_error_behind_them(tmp_path, monkeypatch):
    partial = tmp_path / "step_00000004.partial"
    message = "[enforce fail at inline_container.cc:672] . unexpected pos 7959616 vs 7959504"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    failure = torch_write_failure(RuntimeError(message), partial)
    assert failure.errno == errno.ENOSPC and failure.filename == str(partial)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):  # not a write: raised again
        torch_write_failure(RuntimeError("CUDA out of memory"), partial)


def test_unwritable_output_dirs_are_one_line_before_anything_starts(tmp_path):
    for where in (Path("/proc/lmscale-test/run"), Path("/sys/lmscale-test")):
        with pytest.raises(ConfigError, match=f"output_dir={where} cannot be written"):
            check_output_dir(where, force=False, resume="auto")
    check_output_dir(tmp_path / "new" / "run", force=False, resume="auto")
    assert not (tmp_path / "new").exists()  # the probe leaves nothing behind


def test_write_failures_name_the_file_and_the_fix():
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/a/lmscale.lock")
    assert is_write_failure(full)
    assert write_failure_line(full).startswith(
        "cannot use /runs/a/lmscale.lock (No space left on device): free"
    )
    denied = OSError(errno.EACCES, os.strerror(errno.EACCES), "/runs/a/report.png")
    assert is_write_failure(denied) and "fix its permissions" in write_failure_line(denied)
    assert not is_write_failure(OSError(errno.ECONNRESET, "reset"))
