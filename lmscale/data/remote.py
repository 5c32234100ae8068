"""Data in object storage: `data.path`, `data.eval_path` and `data.sources[].path` as fsspec URLs
(`s3://bucket/corpus/`, `gs://`, `az://`, `file://`), with `data.storage_options`.

A URL's files are copied once into `<data.cache_dir>/remote/`, keyed by what the store says of them (each
file's size and ETag or modification time), and the copy is read like any local path: every format, the
cleaning and tokenization caches, streaming. Ranks of a node share one download (a file lock); a changed
object is a new copy. fsspec moves the bytes; the key and the all-or-nothing copy are written here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from filelock import FileLock

from lmscale.config import DataConfig
from lmscale.errors import ConfigError

log = logging.getLogger(__name__)

EXTRAS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


def is_remote(path: str) -> bool:
    """An fsspec URL other than a Hub dataset (hf://, read by datasets itself)."""
    return "://" in path and not path.startswith("hf://")


def open_url(url: str, options: dict[str, Any], key: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a URL set as `key`; a missing package or a bad URL is one line."""
    import fsspec

    if url.startswith(("file://", "local://")):
        options = {"auto_mkdir": True, **options}  # object stores have no directories to make first
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError:
        protocol = url.split("://", 1)[0]
        package = EXTRAS.get(protocol, f"the fsspec package for {protocol}://")
        raise ConfigError(f"{key}={url} needs {package}: pip install {package} (or lmscale[cloud])") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key}={url}: {exc}; give a URL such as s3://bucket/prefix") from None


def store_failure(key: str, url: str, exc: Exception, options_key: str) -> ConfigError:
    """One line for a store that refused or could not be reached: credentials missing, access denied, or the
    endpoint/network (botocore's NoCredentialsError, a PermissionError, a refused connection, ...)."""
    if "Credentials" in type(exc).__name__:
        return ConfigError(
            f"{key}={url}: no credentials found ({exc}): set them in the environment (e.g. AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) or in {options_key}"
        )
    if isinstance(exc, PermissionError):
        return ConfigError(
            f"{key}={url}: access denied ({exc}): check the credentials in the environment (e.g. "
            f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) or {options_key}"
        )
    return ConfigError(
        f"{key}={url} cannot be reached ({type(exc).__name__}: {exc}): check the credentials in the environment, "
        "the endpoint, and the network"
    )


# One listing per URL per start (lmscale.runs.run.open_run begins each start: a command, or a rank): the
# preflight check, the resume's fingerprint comparison, the fingerprint written and the local copy see the
# same version of the objects, and a prefix of many objects is listed once rather than four times. Cleared at
# every start, so a later run in the same process (a sweep, a test) sees the store as it is then.
_listings: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}


def begin_start() -> None:
    """Forget the listings of an earlier start in this process."""
    _listings.clear()


def remote_listing(url: str, options: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
    """{path relative to the URL: {"bytes", "version"}} of every file under the URL ("" for a URL that is a
    single file), as the store said at this start's first look.
    A missing object, bucket or credentials is one line naming `key`."""
    memo_key = (url, json.dumps(options, sort_keys=True, default=str))
    if memo_key not in _listings:
        _listings[memo_key] = list_url(url, options, key)
    return {name: dict(entry) for name, entry in _listings[memo_key].items()}


def list_url(url: str, options: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
    """What the store says of the URL's files now (remote_listing's question to the store)."""
    fs, root = open_url(url, options, key)
    try:
        if fs.isfile(root):
            entries = {root: fs.info(root)}
        else:
            entries = fs.find(root, detail=True)
        if not entries:
            raise FileNotFoundError(root)
    except FileNotFoundError:
        raise ConfigError(f"{key}={url} does not exist: fix the URL (or the bucket)") from None
    except Exception as exc:  # botocore's NoCredentialsError, access denied, a refused connection
        raise store_failure(key, url, exc, "data.storage_options") from None
    base = root.rstrip("/")
    listing = {}
    for name, info in entries.items():
        relative = "" if name == root else name[len(base) + 1 :]
        version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        listing[relative] = {"bytes": int(info.get("size") or 0), "version": str(version)}
    return listing


def local_copy(url: str, options: dict[str, Any], cache_dir: Path, key: str) -> str:
    """The local path of the URL's files as they are now, downloaded first if this version is not cached."""
    listing = remote_listing(url, options, key)
    version = hashlib.blake2b(json.dumps([url, listing], sort_keys=True).encode(), digest_size=8).hexdigest()
    fs, root = open_url(url, options, key)
    name = Path(root.rstrip("/")).name or "data"
    target = cache_dir / "remote" / version / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent) + ".lock"):
        if target.exists():
            return str(target)
        partial = target.parent / f"{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            if fs.isfile(root):
                fs.get_file(root, str(partial))
            else:
                partial.mkdir()
                for relative in listing:
                    (partial / relative).parent.mkdir(parents=True, exist_ok=True)
                    fs.get_file(f"{root.rstrip('/')}/{relative}", str(partial / relative))
        except Exception as exc:
            shutil.rmtree(partial, ignore_errors=True)
            partial.unlink(missing_ok=True)
            raise ConfigError(
                f"{key}={url} could not be downloaded ({type(exc).__name__}: {exc}): check the connection "
                "and the space in data.cache_dir, and run the same command again"
            ) from None
        partial.rename(target)
        total = sum(entry["bytes"] for entry in listing.values())
        log.info("data: copied %s (%d file(s), %s bytes) into %s", url, len(listing), f"{total:,}", target)
    return str(target)


def with_local_copies(config: DataConfig, cache_dir: Path) -> DataConfig:
    """The data config with every URL replaced by its local copy, for reading (the run's saved config keeps
    the URLs, which is what a resume compares)."""
    options = config.storage_options

    def local(path: str | None, key: str) -> str | None:
        return local_copy(path, options, cache_dir, key) if path and is_remote(path) else path

    if not any(is_remote(path) for _, path in config.source_paths()):
        return config
    sources = [
        source.model_copy(update={"path": local(source.path, "data.sources")}) for source in config.sources
    ]
    return config.model_copy(
        update={
            "path": local(config.path, "data.path"),
            "eval_path": local(config.eval_path, "data.eval_path"),
            "sources": sources,
        }
    )


def remote_fingerprint(url: str, options: dict[str, Any], key: str) -> dict[str, dict[str, int | str]]:
    """The data fingerprint's entries of a URL's files: the store's size and version of each (ETag or
    modification time; reading a remote corpus at every start to hash it would not do)."""
    base = url.rstrip("/")
    listing = remote_listing(url, options, key)
    return {
        (f"{base}/{relative}" if relative else url): {"bytes": entry["bytes"], "blake2b": entry["version"]}
        for relative, entry in listing.items()
    }
