"""checkpoint.mirror against an S3-compatible server (moto's, as s3fs's own tests use) started by the test
on the loopback: complete checkpoints are uploaded beside the run's files, keep_last applies there, a run
on a machine with nothing of it resumes from the newest complete mirrored checkpoint exactly, and a wrong
bucket or missing credentials are one line each."""

import json
import shutil

import pytest
from helpers import S3_BUCKET as BUCKET
from helpers import S3_CREDENTIALS as CREDENTIALS
from helpers import S3_NO_CREDENTIALS as NO_CREDENTIALS
from helpers import SHORT_RUN_ARGS, run_lmscale

pytestmark = pytest.mark.slow

ARGS = [*SHORT_RUN_ARGS, "checkpoint.async=true"]


def losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_a_run_with_nothing_local_resumes_from_its_mirror_exactly(tmp_path, cache_dir, s3):
    out, mirror = tmp_path / "run", f"s3://{BUCKET}/runs/one"

    def train():
        args = [f"output_dir={out}", f"data.cache_dir={cache_dir}", f"checkpoint.mirror={mirror}", *ARGS]
        return run_lmscale("train", *args, env=CREDENTIALS, timeout=600)

    result = train()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mirror: step_00000008 uploaded" in result.stderr
    expected = losses(out)
    remote = f"{BUCKET}/runs/one"
    # keep_last=2 there too; the run's own files beside the checkpoints
    assert sorted(p.rsplit("/", 1)[-1] for p in s3.ls(f"{remote}/checkpoints")) == [
        "latest",
        "step_00000006",
        "step_00000008",
    ]
    assert s3.cat_file(f"{remote}/checkpoints/latest") == b"step_00000008"
    assert s3.exists(f"{remote}/config.yaml") and s3.exists(f"{remote}/tokenizer/tokenizer.json")

    # Step 8's upload never finished (its manifest, written last, is missing), and the machine is new.
    s3.rm(f"{remote}/checkpoints/step_00000008/COMPLETE")
    s3.invalidate_cache()
    shutil.rmtree(out)
    result = train()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "restored step_00000006 from the mirror" in result.stderr
    assert "step_00000006 (step 6)" in result.stderr
    assert {s: losses(out)[s] for s in (7, 8)} == {s: expected[s] for s in (7, 8)}
    s3.invalidate_cache()
    assert s3.exists(f"{remote}/checkpoints/step_00000008/COMPLETE")  # uploaded whole again


@pytest.mark.parametrize(
    "mirror, env, message",
    [
        (f"s3://no-such-{BUCKET}/x", CREDENTIALS, "the bucket no-such-lmscale-runs does not exist"),
        (f"s3://{BUCKET}/x", {**CREDENTIALS, **NO_CREDENTIALS}, "no credentials found"),
    ],
)
def test_a_wrong_bucket_or_missing_credentials_is_one_line_before_anything_is_written(
    tmp_path, s3, mirror, env, message
):
    out = tmp_path / "run"
    result = run_lmscale(
        "train", f"output_dir={out}", f"checkpoint.mirror={mirror}", *ARGS, env=env, timeout=300
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("lmscale: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr, result.stderr[
        -2000:
    ]
    assert not out.exists()
