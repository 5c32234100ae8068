"""The data files a run trains on, fingerprinted at its start, so a resume notices a file edited in place
(same path, other content) instead of silently training on something else."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lmscale.atomic import write_atomically
from lmscale.config import DataConfig
from lmscale.data.locations import is_hub_dataset
from lmscale.data.remote import is_remote, remote_fingerprint
from lmscale.data.sources import directory_files, is_disk_dataset

WHOLE_FILE_BYTES = 8 << 20  # smaller files are hashed whole; larger ones at SAMPLES spread blocks
SAMPLES = 16
BLOCK_BYTES = 64 << 10


def local_sources(config: DataConfig) -> list[str]:
    return [p for _, p in config.source_paths() if not is_hub_dataset(p) and not is_remote(p)]


def source_files(path: str, config: DataConfig) -> list[Path]:
    source = Path(path).expanduser()
    if source.is_file():
        return [source]
    if is_disk_dataset(source):
        return sorted(p for p in source.rglob("*") if p.is_file())
    if source.is_dir():
        return [Path(p) for p in directory_files(source, config.glob)]
    return []


def file_fingerprint(path: Path) -> dict[str, int | str]:
    """Size and a BLAKE2b of the content (whole, or of blocks spread over a large file: an edit in place
    almost always changes the size or one of them; reading all of a large corpus at every start would not do)."""
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as handle:
        if size <= WHOLE_FILE_BYTES:
            digest.update(handle.read())
        else:
            for index in range(SAMPLES):
                handle.seek((size - BLOCK_BYTES) * index // (SAMPLES - 1))
                digest.update(handle.read(BLOCK_BYTES))
    return {"bytes": size, "blake2b": digest.hexdigest()}


def data_fingerprint(config: DataConfig) -> dict[str, dict[str, int | str]]:
    """{file path: fingerprint} of every local data file (the embedded corpus and Hub datasets have none)."""
    files = sorted({str(f.resolve()) for path in local_sources(config) for f in source_files(path, config)})
    fingerprint = {name: file_fingerprint(Path(name)) for name in files}
    for key, url in config.source_paths():  # data at a URL: what its store says of it
        if is_remote(url):
            fingerprint.update(remote_fingerprint(url, config.storage_options, key))
    return dict(sorted(fingerprint.items()))


def changed_data(saved: dict[str, dict], now: dict[str, dict]) -> str | None:
    """The first difference between two fingerprints, in words, or None."""
    for name, then in saved.items():
        if name not in now:
            return f"data file {name} is gone"
        if now[name]["bytes"] != then["bytes"]:
            return f"data file {name} changed (it had {then['bytes']:,} bytes, now {now[name]['bytes']:,})"
        if now[name]["blake2b"] != then["blake2b"]:
            return f"data file {name} changed (same size, other content)"
    added = sorted(set(now) - set(saved))
    return f"data file {added[0]} was added" if added else None


def write_fingerprint(path: Path, config: DataConfig) -> None:
    write_atomically(path, json.dumps(data_fingerprint(config), indent=1) + "\n")


def read_fingerprint(path: Path) -> dict[str, dict] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a run from before fingerprints were kept
