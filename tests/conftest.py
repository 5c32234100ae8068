import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# TRL, a test extra used in-process as the reference implementation, reports its trainers to the Hub
# (huggingface_hub telemetry): no network calls from the suite.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One data cache for the whole session: the embedded corpus is tokenized once."""
    return tmp_path_factory.mktemp("lmscale-cache")


@pytest.fixture(scope="session")
def exact_one_process_run(tmp_path_factory, cache_dir) -> Path:
    """The one-process run of helpers.EXACT_RUN_ARGS that runs computing otherwise (parallel layouts, the
    compiled model) are compared with: trained once per session."""
    from helpers import EXACT_RUN_ARGS, run_lmscale

    out = tmp_path_factory.mktemp("exact-one-process") / "run"
    result = run_lmscale(
        "train", f"output_dir={out}", f"data.cache_dir={cache_dir}", *EXACT_RUN_ARGS, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def s3():
    """An S3-compatible server (moto's, as s3fs's own tests use) on the loopback, with an empty bucket;
    an s3fs filesystem to look into it."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    from helpers import S3_BUCKET, S3_ENDPOINT, S3_PORT

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    try:
        fs = s3fs.S3FileSystem(
            key="testing",
            secret="testing",
            client_kwargs={"endpoint_url": S3_ENDPOINT, "region_name": "us-east-1"},
        )
        fs.call_s3("create_bucket", Bucket=S3_BUCKET)  # us-east-1: no location constraint to give
        yield fs
    finally:
        server.stop()


@pytest.fixture
def restore_environment():
    """A command run in-process (debug mode) announces a one-rank job in os.environ; keep that, and any
    variable a test sets, out of the other tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
