"""data.path as an object-storage URL, against the session's S3-compatible server (conftest `s3`): a run
trains on a bucket's corpus through its local copy, its data fingerprint holds what the store says of each
object, an object changed in the bucket stops the resume with one line, and a missing prefix is one line."""

import json

import pytest
from helpers import S3_BUCKET, S3_CREDENTIALS, run_lmscale

from lmscale.data.sources import embedded_corpus_files

pytestmark = pytest.mark.slow

ARGS = [
    "model.preset=tiny-gpt2",
    "data.max_seq_len=64",
    "data.vocab_size=512",
    "data.max_tokens_per_batch=1024",
    "train.max_steps=4",
    "schedule.warmup_steps=1",
    "train.eval_every=100",
    "train.eval_batches=2",
    "data.eval_fraction=0.1",
    "checkpoint.save_every=2",
    "data.num_workers=0",
    "wandb.mode=disabled",
    "precision=bf16",
]


def test_a_run_trains_on_a_bucket_and_notices_an_object_changed_there(tmp_path, cache_dir, s3):
    prefix = f"{S3_BUCKET}/corpus"
    for index, source in enumerate(embedded_corpus_files()[0][:40]):
        s3.pipe_file(f"{prefix}/part{index:02d}.txt", open(source, "rb").read())
    out, url = tmp_path / "run", f"s3://{prefix}/"

    def train(*extra):
        args = [f"output_dir={out}", f"data.cache_dir={cache_dir}", f"data.path={url}", *ARGS, *extra]
        return run_lmscale("train", *args, env=S3_CREDENTIALS, timeout=600)

    result = train()
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"data: copied {url} (40 file(s)" in result.stderr
    fingerprint = json.loads((out / "data_fingerprint.json").read_text())
    assert sorted(fingerprint) == [f"s3://{prefix}/part{i:02d}.txt" for i in range(40)]

    # Someone rewrites an object under the run: resuming would train on other data, so it stops.
    s3.pipe_file(f"{prefix}/part07.txt", b"other text\n" * 50)
    result = train("train.max_steps=6")
    errors = [line for line in result.stderr.splitlines() if line.startswith("lmscale: error:")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-2000:]
    assert f"s3://{prefix}/part07.txt changed" in errors[0]


def test_a_missing_prefix_is_one_line_and_no_run_directory(tmp_path, s3):
    out = tmp_path / "run"
    url = f"s3://{S3_BUCKET}/no-such-corpus/"
    result = run_lmscale(
        "train", f"output_dir={out}", f"data.path={url}", *ARGS, env=S3_CREDENTIALS, timeout=300
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("lmscale: error:")]
    assert result.returncode != 0 and len(errors) == 1 and "Traceback" not in result.stderr
    assert f"data.path={url} does not exist" in errors[0] and not out.exists()
