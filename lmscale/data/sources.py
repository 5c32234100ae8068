"""Where documents come from: the embedded stdlib corpus, or local text / directories / jsonl via `datasets`."""

from __future__ import annotations

import sys
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from lmscale.errors import ConfigError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
# The held-out split must not move when the run's seed changes, so it has a seed of its own.
SPLIT_SEED = 0
# Test suites and GUI demos are left out of the embedded corpus: they are repetitive and
# unlike the library code a user would expect the demo model to learn.
EMBEDDED_EXCLUDED_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo"}
EMBEDDED_EVAL_EVERY = 40  # every 40th file (sorted by path) is held out: a fixed split on every machine


def stdlib_root() -> Path:
    """The Python standard library's source directory, present on every Python install."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    root = Path(sys.base_prefix) / "lib" / version
    if not root.is_dir():
        raise ConfigError(
            f"the embedded corpus needs {root}, which is missing: set data.path to your own text"
        )
    return root


def embedded_corpus_files() -> tuple[list[str], list[str]]:
    """Deterministic (train, eval) file lists of the embedded stdlib corpus."""
    root = stdlib_root()
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not EMBEDDED_EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    train = [str(p) for i, p in enumerate(files) if i % EMBEDDED_EVAL_EVERY != EMBEDDED_EVAL_EVERY - 1]
    held_out = [str(p) for i, p in enumerate(files) if i % EMBEDDED_EVAL_EVERY == EMBEDDED_EVAL_EVERY - 1]
    return train, held_out


def _load_text_files(files: dict[str, list[str]], sample_by: str, cache_dir: str) -> DatasetDict:
    return load_dataset("text", data_files=files, sample_by=sample_by, cache_dir=cache_dir)


def _directory_files(path: Path) -> list[str]:
    files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise ConfigError(
            f"data.path={path} holds no {'/'.join(TEXT_SUFFIXES)} files: add text files or point data.path elsewhere"
        )
    return files


def _load_jsonl(path: Path, text_field: str, cache_dir: str) -> Dataset:
    try:
        dataset = load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as exc:  # datasets wraps the JSON parser's error in several layers
        raise ConfigError(
            f"data.path={path} is not valid jsonl ({type(exc).__name__}): fix or remove the bad lines"
        ) from None
    if text_field not in dataset.column_names:
        raise ConfigError(
            f"data.path={path} has no field {text_field!r} (fields: {', '.join(dataset.column_names)}): "
            "set data.text_field to the field holding the text"
        )
    return (
        dataset.select_columns([text_field]).rename_column(text_field, "text")
        if text_field != "text"
        else dataset
    )


def _split(dataset: Dataset, eval_fraction: float, source: str) -> tuple[Dataset, Dataset]:
    if len(dataset) < 2:
        raise ConfigError(
            f"data.path={source} holds {len(dataset)} document(s); at least 2 are needed for a held-out split"
        )
    parts = dataset.train_test_split(test_size=eval_fraction, seed=SPLIT_SEED)
    return parts["train"], parts["test"]


def load_documents(
    path: str | None, text_field: str, eval_fraction: float, cache_dir: str
) -> tuple[Dataset, Dataset]:
    """(train, eval) datasets with one `text` column, one row per document."""
    datasets_cache = str(Path(cache_dir) / "datasets")
    if path is None:
        train_files, eval_files = embedded_corpus_files()
        splits = _load_text_files({"train": train_files, "eval": eval_files}, "document", datasets_cache)
        return splits["train"], splits["eval"]
    source = Path(path).expanduser()
    if not source.exists():
        raise ConfigError(
            f"data.path={path} does not exist: fix the path, or unset it for the embedded corpus"
        )
    if source.is_dir():
        dataset = _load_text_files({"train": _directory_files(source)}, "document", datasets_cache)["train"]
    elif source.suffix in (".jsonl", ".json"):
        dataset = _load_jsonl(source, text_field, datasets_cache)
    else:
        # A single text file: blank-line separated paragraphs are the documents.
        dataset = _load_text_files({"train": [str(source)]}, "paragraph", datasets_cache)["train"]
    dataset = dataset.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    return _split(dataset, eval_fraction, path)
