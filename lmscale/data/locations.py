"""Where a data path points (a local file or directory, a store URL, a Hub dataset) and whether it is there.

Kept apart from `lmscale.data.sources`, which loads data with `datasets`: the launcher checks every data path
before any rank starts, and importing `datasets` for that would cost each launch about a second.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmscale.data.remote import is_remote, remote_listing
from lmscale.errors import ConfigError

HUB_DATASET = "hf://datasets/"
EVAL_PATH_FIX = "fix the path, or unset data.eval_path to hold out data.eval_fraction of the training data"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, also when it was set after huggingface_hub was imported."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").upper()
    return value in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def is_hub_dataset(path: str) -> bool:
    return path.startswith(HUB_DATASET)


def missing_source_problem(path: str, key: str, options: dict | None = None) -> str | None:
    """Why data `path` (set as `key`) cannot be read, or None (Hub datasets are checked when read; a URL is
    asked of its store, with the storage `options`)."""
    if is_remote(path):
        try:
            remote_listing(path, options or {}, key)
        except ConfigError as exc:
            return str(exc)
        return None
    if is_hub_dataset(path) or Path(path).expanduser().exists():
        return None
    fix = EVAL_PATH_FIX if key == "data.eval_path" else "fix the path, or unset it for the embedded corpus"
    return f"{key}={path} does not exist: {fix}"
