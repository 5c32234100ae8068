"""Checkpoints mirrored to object storage (`checkpoint.mirror`: any fsspec URL, `s3://bucket/prefix`,
`gs://`, `az://`, `file://`), and a run restored from there on a machine that has none of it.

The mirror holds the run directory's shape: the run's own files (config, tokenizer, metrics, ...) and
`checkpoints/step_N/`. Rank 0 uploads each complete checkpoint in a background thread, its files first and
its `COMPLETE` manifest last, then moves the mirror's `checkpoints/latest`: a checkpoint without its
manifest in the mirror is an upload that did not finish, and is never restored. The mirror keeps the same
`checkpoint.keep_last` (and the best) as the local directory. fsspec does the storage; what it has no
notion of (the order that makes a mirrored checkpoint complete) is written here.
"""

from __future__ import annotations

import logging
import queue
import shutil
import tempfile
import threading
from hashlib import sha1
from pathlib import Path
from typing import Any

from filelock import FileLock

from lmscale.atomic import write_atomically
from lmscale.checkpointing.checkpoint import TAG_PATTERN, UNIVERSAL, complete_checkpoints
from lmscale.checkpointing.rundir import RunDir
from lmscale.data.remote import open_url, store_failure
from lmscale.errors import ConfigError, LmscaleError

log = logging.getLogger(__name__)

# The mirror's names, relative to its root: a run directory's own (RunDir spells them).
MIRRORED = RunDir(Path(""))


def open_mirror(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    """(fsspec filesystem, root path) of the mirror."""
    return open_url(url, options, "checkpoint.mirror")


def check_mirror(url: str, options: dict[str, Any]) -> None:
    """The mirror answers with these credentials (its bucket exists; a local one is made); else one line."""
    fs, root = open_mirror(url, options)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    bucket = root if local else root.split("/", 1)[0]
    try:
        if local:
            fs.makedirs(root, exist_ok=True)
        else:
            fs.ls(bucket, detail=False)
    except FileNotFoundError:
        raise ConfigError(
            f"checkpoint.mirror={url}: the bucket {bucket} does not exist: create it, or fix the URL"
        ) from None
    except Exception as exc:  # botocore's NoCredentialsError, access denied, a refused connection
        raise store_failure("checkpoint.mirror", url, exc, "checkpoint.mirror_options") from None


def _remote(root: str, local: Path) -> str:
    """The mirror's path of a name relative to a run directory."""
    return f"{root}/{local.as_posix()}"


def _mirrored_checkpoints(fs, root: str) -> list[str]:
    """Tags of the mirror's complete checkpoints, oldest first."""
    base = _remote(root, MIRRORED.checkpoints)
    if not fs.exists(base):
        return []
    tags = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False))
    complete = [t for t in tags if TAG_PATTERN.match(t)]
    return [t for t in complete if fs.exists(_remote(root, RunDir.complete_marker(MIRRORED.checkpoints / t)))]


class CheckpointMirror:
    """Rank 0's uploader: complete checkpoints go to the mirror in the order they were completed, in a
    daemon thread (a job that dies leaves the mirror's previous checkpoint its newest complete one)."""

    def __init__(self, url: str, options: dict[str, Any], run_dir: RunDir, keep_last: int) -> None:
        self.url, self.run_dir, self.keep_last = url, run_dir, keep_last
        self.fs, self.root = open_mirror(url, options)
        self._queue: queue.Queue = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        threading.Thread(target=self._work, name="lmscale-checkpoint-mirror", daemon=True).start()

    def upload(self, checkpoint: Path) -> None:
        self._idle.clear()
        self._queue.put(checkpoint)

    def wait(self) -> None:
        self._idle.wait()

    def _work(self) -> None:
        while True:
            checkpoint = self._queue.get()
            try:
                self._upload(checkpoint)
                log.info("mirror: %s uploaded to %s", checkpoint.name, self.url)
            # Any failure: the local checkpoint is complete, training goes on, and the next one is uploaded whole.
            except Exception as exc:
                log.warning(
                    "mirror: uploading %s to %s failed (%s: %s); it is complete locally, the next checkpoint "
                    "is uploaded whole",
                    checkpoint.name,
                    self.url,
                    type(exc).__name__,
                    exc,
                )
            finally:
                if self._queue.empty():
                    self._idle.set()

    def _upload(self, checkpoint: Path) -> None:
        for path in self.run_dir.run_files():
            self.fs.put_file(str(path), _remote(self.root, path.relative_to(self.run_dir.root)))
        manifest = RunDir.complete_marker(checkpoint)
        for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p != manifest):
            if UNIVERSAL in path.relative_to(checkpoint).parts:  # made again from the files on demand
                continue
            self.fs.put_file(str(path), _remote(self.root, path.relative_to(self.run_dir.root)))
        # last: with its manifest there, the mirrored checkpoint counts
        self.fs.put_file(str(manifest), _remote(self.root, manifest.relative_to(self.run_dir.root)))
        self.fs.pipe_file(_remote(self.root, MIRRORED.latest), checkpoint.name.encode())
        self._prune()

    def _prune(self) -> None:
        best = self.run_dir.best_tag()
        for tag in _mirrored_checkpoints(self.fs, self.root)[: -self.keep_last]:
            if tag != best:
                self.fs.rm(_remote(self.root, MIRRORED.checkpoints / tag), recursive=True)


def restore_from_mirror(url: str, options: dict[str, Any], run_dir: RunDir) -> Path | None:
    """A run directory with no complete checkpoint of its own (a new node, a new cloud instance) gets the
    mirror's newest complete checkpoint and the run's files; the restored checkpoint, or None.

    Ranks of one node share the download (a lock in the node's temp directory); the files land in a
    `.partial` directory renamed into place, so a download cut short is never taken for a checkpoint. The
    resume that follows checks every file against the manifest's checksums.
    """
    key = sha1(str(run_dir.root.resolve()).encode()).hexdigest()[:16]
    with FileLock(str(Path(tempfile.gettempdir()) / f"lmscale-mirror-{key}.lock")):
        if complete_checkpoints(run_dir.checkpoints):
            return None
        fs, root = open_mirror(url, options)
        tags = _mirrored_checkpoints(fs, root)
        if not tags:
            return None
        return _download(fs, root, tags[-1], run_dir)


def _download(fs, root: str, tag: str, run_dir: RunDir) -> Path:
    remote = _remote(root, MIRRORED.checkpoints / tag)
    target = run_dir.checkpoints / tag
    partial = run_dir.checkpoints / f"{tag}.partial"
    run_dir.root.mkdir(parents=True, exist_ok=True)
    try:
        for name in fs.ls(root, detail=False):
            leaf = name.rstrip("/").rsplit("/", 1)[-1]
            local = run_dir.root / leaf
            if leaf != MIRRORED.checkpoints.name and not local.exists():
                fs.get(name, str(local), recursive=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        fs.get(remote, str(partial), recursive=True)
    except Exception as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise LmscaleError(
            f"restoring {tag} from the mirror {root} failed ({type(exc).__name__}: {exc}): check the "
            "connection and run the same command again"
        ) from None
    partial.rename(target)
    write_atomically(run_dir.latest, tag)  # the pointer moves last, as for a checkpoint written here
    log.info("mirror: restored %s from the mirror into %s", tag, run_dir.root)
    return target
