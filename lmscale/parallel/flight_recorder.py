"""torch's flight recorder: the last collectives each rank issued, kept in a ring buffer. lmscale switches it
on for every job (NCCL and, since torch 2.6, gloo record into it), and the hang watchdog writes it into the run
directory when a rank stops making progress: the one collective a rank still waits in says which peer is
missing. On NCCL, a collective's own timeout dumps it too (TORCH_NCCL_DUMP_ON_TIMEOUT), should it come first.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

BUFFER_ENTRIES = "2000"  # collectives kept per rank: a few steps' worth, a few hundred kB


def switch_on(nccl_dump_prefix: Path) -> None:
    """Set the recorder's variables (a user's own settings win); before the process group exists."""
    if not any(os.environ.get(name) for name in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")):
        # torch with the backend-neutral recorder reads TORCH_FR_BUFFER_SIZE (and warns on the old name)
        os.environ[buffer_variable()] = BUFFER_ENTRIES
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str(nccl_dump_prefix))  # NCCL appends the rank


def buffer_variable() -> str:
    from torch._C import _distributed_c10d

    generic = hasattr(_distributed_c10d, "_dump_fr_trace_json")
    return "TORCH_FR_BUFFER_SIZE" if generic else "TORCH_NCCL_TRACE_BUFFER_SIZE"


def dump(path: Path) -> str | None:
    """Write this rank's recorded collectives to `path` as JSON; returns the oldest one not completed, in
    words, or None when nothing was recorded (a torch without the recorder: then nothing is written)."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace_json  # private, but what torch's own tools read
    except ImportError:
        return None
    try:
        raw = _dump_fr_trace_json()
    except RuntimeError:  # no process group, or the recorder switched off
        return None
    path.write_bytes(raw)
    return waiting_in(json.loads(raw).get("entries", []))


def waiting_in(entries: list[dict]) -> str | None:
    """The oldest recorded collective not yet completed, e.g. "gloo:all_reduce #412 (issued 95 s ago)"."""
    pending = [e for e in entries if e.get("state") != "completed" and not e.get("retired", False)]
    if not pending:
        return None
    oldest = min(pending, key=lambda e: e.get("collective_seq_id", 0))
    created_ns = oldest.get("time_created_ns", 0)
    age = f", issued {(time.time_ns() - created_ns) / 1e9:.0f} s ago" if created_ns else ""
    return f"{oldest.get('profiling_name', 'a collective')} #{oldest.get('collective_seq_id', '?')}{age}"
