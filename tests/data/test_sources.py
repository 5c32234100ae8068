import json

import pytest
from datasets import Dataset, DatasetDict

from lmscale.config import DataConfig
from lmscale.data.sources import embedded_corpus_files, load_documents, malformed_json_lines
from lmscale.errors import ConfigError


def load(tmp_path, **keys):
    return load_documents(DataConfig(**keys), str(tmp_path / "cache"))


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_embedded_split_is_fixed_and_disjoint():
    train, held_out = embedded_corpus_files()
    assert (train, held_out) == embedded_corpus_files()
    assert len(train) > 300 and len(held_out) > 5
    assert not set(train) & set(held_out)
    assert not any("/test/" in f or "site-packages" in f for f in train + held_out)


def test_directory_of_text_files_and_glob(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i in range(20):
        (corpus / "sub" / f"doc{i}.txt").write_text(f"document number {i}\n" * 5)
    (corpus / "notes.md").write_text("markdown notes\n")
    (corpus / "image.png").write_bytes(b"\x89PNG")
    train, held_out = load(tmp_path, path=str(corpus), eval_fraction=0.1)
    assert len(train) + len(held_out) == 21
    train, held_out = load(tmp_path, path=str(corpus), glob="sub/*.txt", eval_fraction=0.1)
    assert len(train) + len(held_out) == 20 and len(held_out) == 2
    with pytest.raises(ConfigError, match=r"no files matching data.glob='\*.csv'"):
        load(tmp_path, path=str(corpus), glob="*.csv")


def test_single_text_file_splits_on_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"paragraph {i} line one\nline two" for i in range(10)))
    train, held_out = load(tmp_path, path=str(path), eval_fraction=0.2)
    assert len(train) + len(held_out) == 10


def test_jsonl_parquet_csv_and_disk_with_custom_field(tmp_path):
    records = [{"body": f"text {i}", "id": i} for i in range(10)]
    table = Dataset.from_list(records)
    write_jsonl(tmp_path / "c.jsonl", records)
    table.to_parquet(str(tmp_path / "c.parquet"))
    table.to_csv(str(tmp_path / "c.csv"), index=False)
    table.save_to_disk(str(tmp_path / "disk"))
    DatasetDict({"train": table}).save_to_disk(str(tmp_path / "disk_dict"))
    for name in ("c.jsonl", "c.parquet", "c.csv", "disk", "disk_dict"):
        train, held_out = load(tmp_path, path=str(tmp_path / name), text_field="body", eval_fraction=0.2)
        assert train.column_names == ["text"] and len(train) == 8 and len(held_out) == 2, name
        with pytest.raises(ConfigError, match="has no field 'text'.*set data.text_field"):
            load(tmp_path, path=str(tmp_path / name))


def test_split_is_fixed_whatever_the_cache(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"text {i}"} for i in range(50)])
    first = list(load_documents(DataConfig(path=str(path)), str(tmp_path / "a"))[1]["text"])
    second = list(load_documents(DataConfig(path=str(path)), str(tmp_path / "b"))[1]["text"])
    assert first == second


def test_eval_path_and_weighted_sources(tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": f"big {i}"} for i in range(40)])
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": f"small {i}"} for i in range(10)])
    held = write_jsonl(tmp_path / "held.jsonl", [{"text": f"held {i}"} for i in range(5)])
    train, held_out = load(
        tmp_path,
        sources=[{"path": str(big), "weight": 1}, {"path": str(small), "weight": 1}],
        eval_path=str(held),
    )
    assert list(held_out["text"]) == [f"held {i}" for i in range(5)]
    texts = list(train["text"])
    assert {f"big {i}" for i in range(40)} <= set(texts) and {f"small {i}" for i in range(10)} <= set(texts)
    # equal weights: the small source is repeated until it matches the big one's share
    assert sum(t.startswith("small") for t in texts) == pytest.approx(
        sum(t.startswith("big") for t in texts), rel=0.3
    )


def test_malformed_jsonl_names_lines_or_skips(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"text": "fine one"}\n{"text": broken\n\n[1, 2]\n{"text": "fine two"}\n{"text": "fine three"}\n'
    )
    assert malformed_json_lines(path) == [2, 4]
    with pytest.raises(ConfigError, match=r"2 malformed line\(s\) \(line 2, 4\).*data.on_bad_record=skip"):
        load(tmp_path, path=str(path))
    train, held_out = load(tmp_path, path=str(path), on_bad_record="skip", eval_fraction=0.34)
    assert sorted(list(train["text"]) + list(held_out["text"])) == ["fine one", "fine three", "fine two"]


def test_bad_paths_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path, path=str(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no"):
        load(tmp_path, path=str(tmp_path / "empty"))
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "only one"}])
    with pytest.raises(ConfigError, match="at least 2 are needed"):
        load(tmp_path, path=str(one))


def test_loading_local_files_makes_no_network_calls(tmp_path, monkeypatch):
    """datasets pings S3 to count loads of its packaged builders, local files included: a job on an
    air-gapped cluster would wait that out on every rank (lmscale.data turns the count off)."""
    import socket

    looked_up = []
    real_getaddrinfo = socket.getaddrinfo

    def recording_getaddrinfo(host, *args, **kwargs):
        looked_up.append(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording_getaddrinfo)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10)))
    load_documents(DataConfig(path=str(tmp_path / "docs.jsonl")), str(tmp_path / "cache"))
    load_documents(DataConfig(), str(tmp_path / "cache"))  # the embedded corpus, text files
    assert looked_up == []
