import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One data cache for the whole session: the embedded corpus is tokenized once."""
    return tmp_path_factory.mktemp("lmscale-cache")


@pytest.fixture
def restore_environment():
    """A command run in-process (debug mode) announces a one-rank job in os.environ; keep that, and any
    variable a test sets, out of the other tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
