import json

import pytest

from lmscale.data.sources import embedded_corpus_files, load_documents
from lmscale.errors import ConfigError


def test_embedded_split_is_fixed_and_disjoint():
    train, held_out = embedded_corpus_files()
    assert (train, held_out) == embedded_corpus_files()
    assert len(train) > 300 and len(held_out) > 5
    assert not set(train) & set(held_out)
    assert not any("/test/" in f or "site-packages" in f for f in train + held_out)


def test_directory_of_text_files(tmp_path):
    for i in range(20):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i}\n" * 5)
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    train, held_out = load_documents(str(tmp_path), "text", 0.1, str(tmp_path / "cache"))
    assert len(train) + len(held_out) == 20
    assert len(held_out) == 2
    assert all("document number" in t for t in train["text"])


def test_single_text_file_splits_on_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"paragraph {i} line one\nline two" for i in range(10)))
    train, held_out = load_documents(str(path), "text", 0.2, str(tmp_path / "cache"))
    assert len(train) + len(held_out) == 10


def test_jsonl_with_custom_field(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"text {i}", "id": i}) for i in range(10)))
    train, held_out = load_documents(str(path), "body", 0.2, str(tmp_path / "cache"))
    assert train.column_names == ["text"] and len(train) == 8
    with pytest.raises(ConfigError, match="has no field 'text'.*set data.text_field"):
        load_documents(str(path), "text", 0.2, str(tmp_path / "cache"))


def test_split_is_independent_of_run_seed_and_repeatable(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"text {i}"}) for i in range(50)))
    first = load_documents(str(path), "text", 0.2, str(tmp_path / "cache"))[1]["text"]
    second = load_documents(str(path), "text", 0.2, str(tmp_path / "cache2"))[1]["text"]
    assert first == second


def test_bad_paths_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_documents(str(tmp_path / "missing.txt"), "text", 0.1, str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no"):
        load_documents(str(tmp_path / "empty"), "text", 0.1, str(tmp_path))
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "only one"}))
    with pytest.raises(ConfigError, match="at least 2 are needed"):
        load_documents(str(one), "text", 0.1, str(tmp_path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ConfigError, match="is not valid jsonl"):
        load_documents(str(bad), "text", 0.1, str(tmp_path))
