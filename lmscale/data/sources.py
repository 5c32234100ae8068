"""Where documents come from: the embedded stdlib corpus, or local files loaded with `datasets`.

Every source becomes a `Dataset` with one `text` column, one row per document.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import datasets.config
from datasets import (
    Dataset,
    DatasetDict,
    concatenate_datasets,
    interleave_datasets,
    load_dataset,
    load_from_disk,
)

from lmscale.config import DataConfig
from lmscale.data.locations import HUB_DATASET, hub_offline, is_hub_dataset, missing_source_problem
from lmscale.errors import ConfigError

log = logging.getLogger(__name__)

# datasets counts every load of its packaged builders (text, json, parquet, ...) with a HEAD request to S3,
# local files included (datasets/load.py, increase_load_count: a 3 s timeout, after a DNS lookup that has
# none). A job reading local files makes no network calls: on an air-gapped cluster, or one that drops
# outbound packets, each load of every rank would wait that out. HF_UPDATE_DOWNLOAD_COUNTS is read per call.
datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# The held-out split must not move when the run's seed changes, so it has a seed of its own.
SPLIT_SEED = 0
# Test suites and GUI demos are left out of the embedded corpus: they are repetitive and
# unlike the library code a user would expect the demo model to learn.
EMBEDDED_EXCLUDED_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo"}
EMBEDDED_EVAL_EVERY = 40  # every 40th file (sorted by path) is held out: a fixed split on every machine
BAD_LINES_SHOWN = 5


def stdlib_root() -> Path:
    """The Python standard library's source directory, present on every Python install."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    root = Path(sys.base_prefix) / "lib" / version
    if not root.is_dir():
        raise ConfigError(
            f"the embedded corpus needs {root}, which is missing: set data.path to your own text"
        )
    return root


def _stdlib_python_files(root: Path) -> list[Path]:
    """The `.py` files under `root`, outside the excluded directories."""
    found = []
    for directory, subdirectories, names in os.walk(root):
        # Pruned while walking: site-packages alone (torch, transformers, ...) holds most of the files a
        # glob over the whole tree would visit only to throw away (~1.6 s of every start).
        subdirectories[:] = [d for d in subdirectories if d not in EMBEDDED_EXCLUDED_DIRS]
        found.extend(Path(directory, name) for name in names if name.endswith(".py"))
    return found


def embedded_corpus_files() -> tuple[list[str], list[str]]:
    """Deterministic (train, eval) file lists of the embedded stdlib corpus."""
    root = stdlib_root()
    files = sorted(_stdlib_python_files(root))
    train = [str(p) for i, p in enumerate(files) if i % EMBEDDED_EVAL_EVERY != EMBEDDED_EVAL_EVERY - 1]
    held_out = [str(p) for i, p in enumerate(files) if i % EMBEDDED_EVAL_EVERY == EMBEDDED_EVAL_EVERY - 1]
    return train, held_out


def directory_files(path: Path, pattern: str | None) -> list[str]:
    candidates = path.glob(pattern) if pattern else path.rglob("*")
    files = sorted(str(p) for p in candidates if p.is_file() and (pattern or p.suffix in TEXT_SUFFIXES))
    if not files:
        wanted = f"files matching data.glob={pattern!r}" if pattern else f"{'/'.join(TEXT_SUFFIXES)} files"
        raise ConfigError(f"data.path={path} holds no {wanted}: fix data.glob or point data.path elsewhere")
    return files


def malformed_json_lines(path: Path) -> list[int]:
    """1-based numbers of the non-blank lines of a jsonl file that are not JSON objects."""
    bad = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                if not isinstance(json.loads(line), dict):
                    bad.append(number)
            except json.JSONDecodeError:
                bad.append(number)
    return bad


def _good_json_records(path: str, fields: list[str], version: str) -> Iterator[dict]:
    """Records of the well-formed lines only (`version` keys the datasets cache to the file's state); with
    `fields`, those holding all of them, cut to them."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and all(f in record for f in fields):
                yield {f: record[f] for f in fields} if fields else record


def _load_json(path: Path, config: DataConfig, cache_dir: str, fields: list[str]) -> Dataset:
    datasets_log = logging.getLogger("datasets")
    level = datasets_log.level
    datasets_log.setLevel(logging.CRITICAL)  # a parse failure is reported below, once, with line numbers
    try:
        return load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as exc:  # datasets wraps the JSON parser's error in several layers
        bad = malformed_json_lines(path)
        if not bad:
            raise ConfigError(
                f"data.path={path} could not be read as json ({type(exc).__name__}): check the file"
            ) from None
    finally:
        datasets_log.setLevel(level)
    shown = ", ".join(str(n) for n in bad[:BAD_LINES_SHOWN]) + (", ..." if len(bad) > BAD_LINES_SHOWN else "")
    if config.on_bad_record == "error":
        raise ConfigError(
            f"data.path={path} has {len(bad)} malformed line(s) (line {shown}): fix them, or set data.on_bad_record=skip"
        )
    log.warning("data: skipped %d malformed line(s) of %s (line %s)", len(bad), path, shown)
    stat = path.stat()
    return Dataset.from_generator(
        _good_json_records,
        gen_kwargs={
            "path": str(path),
            "fields": fields,
            "version": f"{stat.st_size}-{stat.st_mtime_ns}",
        },
        cache_dir=cache_dir,
    )


def load_disk_dataset(path: Path) -> Dataset:
    try:
        loaded = load_from_disk(str(path))
    except Exception as exc:  # a damaged save_to_disk directory fails in many ways
        raise ConfigError(
            f"data.path={path} is not a readable save_to_disk dataset ({type(exc).__name__})"
        ) from None
    if isinstance(loaded, DatasetDict):
        if "train" not in loaded:
            raise ConfigError(
                f"data.path={path} holds splits {list(loaded)} but no 'train': save the training split as 'train'"
            )
        loaded = loaded["train"]
    return loaded


def _text_column(dataset: Dataset, field: str, source: Path) -> Dataset:
    if field not in dataset.column_names:
        raise ConfigError(
            f"data.path={source} has no field {field!r} (fields: {', '.join(dataset.column_names)}): "
            "set data.text_field to the field holding the text"
        )
    dataset = dataset.select_columns([field])
    if field != "text":
        dataset = dataset.rename_column(field, "text")
    return dataset.filter(
        lambda batch: [isinstance(t, str) and bool(t.strip()) for t in batch["text"]], batched=True
    )


def is_disk_dataset(source: Path) -> bool:
    return source.is_dir() and (
        (source / "dataset_info.json").exists() or (source / "dataset_dict.json").exists()
    )


def existing_source(path: str, key: str) -> Path:
    problem = missing_source_problem(path, key)
    if problem:
        raise ConfigError(problem)
    return Path(path).expanduser()


def load_table(source: Path, config: DataConfig, cache_dir: str, fields: list[str]) -> Dataset:
    """Records of a jsonl/json/parquet/csv file or a save_to_disk directory (all columns)."""
    if is_disk_dataset(source):
        return load_disk_dataset(source)
    if source.suffix in (".jsonl", ".json"):
        return _load_json(source, config, cache_dir, fields)
    try:
        return load_dataset(
            LOADERS[source.suffix], data_files=str(source), split="train", cache_dir=cache_dir
        )
    except Exception as exc:  # pyarrow/pandas parser errors
        raise ConfigError(
            f"data.path={source} could not be read ({type(exc).__name__}): check the file"
        ) from None


def record_origins(source: Path, count: int, fields: list[str]) -> list[str]:
    """Where each of `count` records loaded from `source` is in it, as a person finds it: the 1-based line
    of a jsonl or csv file, else the 1-based record number (records are shuffled and mixed before they are
    checked, so a position in the dataset would name the wrong record)."""
    if source.is_file() and source.suffix == ".jsonl":
        lines = _record_lines(source, count, fields)
        if len(lines) == count:
            return [f"{source} line {n}" for n in lines]
    if source.is_file() and source.suffix == ".csv":
        return [f"{source} line {n + 2}" for n in range(count)]  # line 1 is the header
    return [f"{source} record {n + 1}" for n in range(count)]


def _record_lines(path: Path, count: int, fields: list[str]) -> list[int]:
    """Line numbers of a jsonl file's `count` records: its non-blank lines, or, when malformed lines were
    skipped (`_good_json_records`), the lines that are objects holding every field."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        lines = [(number, line) for number, line in enumerate(handle, start=1) if line.strip()]
    if len(lines) == count:
        return [number for number, _ in lines]
    kept = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and all(f in record for f in fields):
            kept.append(number)
    return kept


def is_table(source: Path) -> bool:
    return is_disk_dataset(source) or (source.is_file() and source.suffix in LOADERS)


def load_hub_dataset(
    path: str, config: DataConfig, cache_dir: str | None, key: str, streaming: bool = False
) -> Dataset:
    """A Hub dataset (`hf://datasets/org/name`), the split named by data.hub_split (data.hub_eval_split for
    data.eval_path). Online, `datasets` fetches only the files that split needs (or streams them);
    offline (HF_HUB_OFFLINE) the repository's snapshot in the Hugging Face cache is read as a local one."""

    repo = path.removeprefix(HUB_DATASET).strip("/")
    split = config.hub_eval_split if key == "data.eval_path" else config.hub_split
    source = repo
    if hub_offline():
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            source = snapshot_download(repo, repo_type="dataset", local_files_only=True)
        except LocalEntryNotFoundError:
            raise ConfigError(
                f"{key}={path} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it where "
                f"there is network (hf download {repo} --repo-type dataset), or point {key} at local files"
            ) from None
    try:
        return load_dataset(
            source,
            name=config.hub_config,
            split=split,
            streaming=streaming,
            cache_dir=None if streaming else cache_dir,
        )
    except Exception as exc:  # unknown split/config, network, repository: datasets raises many kinds
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"{key}={path} (config {config.hub_config}, split {split}) could not be loaded: {reason}"
        ) from None


def load_source(path: str, config: DataConfig, cache_dir: str, key: str = "data.path") -> Dataset:
    """One source as a `text` dataset: file type chosen by suffix; a directory is text files or save_to_disk;
    hf://datasets/... a Hub dataset."""
    if is_hub_dataset(path):
        return _text_column(load_hub_dataset(path, config, cache_dir, key), config.text_field, path)
    source = existing_source(path, key)
    if is_table(source):
        return _text_column(
            load_table(source, config, cache_dir, [config.text_field]), config.text_field, source
        )
    if source.is_dir():
        files = directory_files(source, config.glob)
        return load_dataset("text", data_files={"train": files}, sample_by="document", cache_dir=cache_dir)[
            "train"
        ]
    # A single text file: blank-line separated paragraphs are the documents.
    return load_dataset(
        "text", data_files={"train": [str(source)]}, sample_by="paragraph", cache_dir=cache_dir
    )["train"]


def split_held_out(dataset: Dataset, eval_fraction: float, source: str) -> tuple[Dataset, Dataset]:
    if len(dataset) < 2:
        raise ConfigError(
            f"data path {source} holds {len(dataset)} document(s); at least 2 are needed for a held-out split"
        )
    parts = dataset.train_test_split(test_size=eval_fraction, seed=SPLIT_SEED)
    return parts["train"], parts["test"]


def _embedded(cache_dir: str) -> tuple[Dataset, Dataset]:
    train_files, eval_files = embedded_corpus_files()
    files = {"train": train_files, "eval": eval_files}
    splits = load_dataset("text", data_files=files, sample_by="document", cache_dir=cache_dir)
    return splits["train"], splits["eval"]


def _mix(parts: list[Dataset], weights: list[float]) -> Dataset:
    if len(parts) == 1:
        return parts[0]
    # datasets' own mixing: draws by weight until every source has been seen once, so a small source
    # with a large weight is repeated rather than a large one cut short.
    total = sum(weights)
    return interleave_datasets(
        parts, probabilities=[w / total for w in weights], seed=SPLIT_SEED, stopping_strategy="all_exhausted"
    )


def load_documents(config: DataConfig, cache_dir: str, loader=load_source) -> tuple[Dataset, Dataset]:
    """(train, eval) datasets with one `text` column, one row per document, before cleaning.

    `loader(path, config, cache_dir, key)` reads one source (fine-tuning formats read other fields).
    """
    datasets_cache = str(Path(cache_dir) / "datasets")
    if config.path is None and not config.sources:
        return _embedded(datasets_cache)
    sources = config.sources or [{"path": config.path, "weight": 1.0}]
    pairs = [(s["path"], s["weight"]) if isinstance(s, dict) else (s.path, s.weight) for s in sources]
    key = "data.sources" if config.sources else "data.path"
    loaded = [loader(path, config, datasets_cache, key) for path, _ in pairs]
    if config.eval_path:
        held_out = loader(config.eval_path, config, datasets_cache, "data.eval_path")
        return _mix(loaded, [w for _, w in pairs]), held_out
    splits = [
        split_held_out(dataset, config.eval_fraction, path)
        for dataset, (path, _) in zip(loaded, pairs, strict=True)
    ]
    train = _mix([t for t, _ in splits], [w for _, w in pairs])
    return train, concatenate_datasets([e for _, e in splits])
