"""The CLI as a user meets it: bad input stops before anything is written, with one line and exit 2."""

import pytest
from conftest import run_lmscale

from lmscale.cli import parse_args, split_config_and_overrides
from lmscale.config import load_config


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("lmscale: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["zero.stage=5"], ["zero.stage=5", "less than or equal to 3"]),
        (["train.micro_batch_size=0"], ["train.micro_batch_size=0"]),
        (["model.dropout=0.1"], ["model.dropout: unknown key"]),
        (["precision=fp16"], ["precision=fp16 needs a GPU", "precision=bf16"]),
        (["train.lr"], ["not key=value"]),
        (["deepspeed_config=ds_configs/zero2_bf16.json", "zero.stage=1"], ["zero.stage=1 but", "says 2"]),
    ],
)
@pytest.mark.parametrize("command", ["train", "launch"])
def test_bad_input_writes_nothing(tmp_path, command, overrides, fragments):
    out = tmp_path / "run"
    result = run_lmscale(command, f"output_dir={out}", *overrides)
    assert_one_line_error(result, *fragments)
    assert not out.exists()


def test_existing_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("precious: true\n")
    result = run_lmscale("train", f"output_dir={out}", "train.resume=none")
    assert_one_line_error(result, "already holds a run", "train.resume=none", "--force")
    result = run_lmscale("train", f"output_dir={out}")  # resume: auto, but this is no lmscale run
    assert_one_line_error(result, "not an lmscale run's", "--force")
    assert (out / "config.yaml").read_text() == "precious: true\n"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_resuming_with_another_model_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("model:\n  preset: tiny-llama\ndata:\n  max_seq_len: 256\n")
    result = run_lmscale("train", f"output_dir={out}", "model.preset=tiny-gpt2")
    assert_one_line_error(result, "model.preset='tiny-gpt2' (the run has 'tiny-llama')")


def test_resume_path_that_does_not_exist(tmp_path):
    result = run_lmscale(
        "train",
        f"output_dir={tmp_path / 'run'}",
        f"train.resume={tmp_path / 'nope'}",
        "train.max_steps=40",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.vocab_size=300",
    )
    assert_one_line_error(result, "train.resume=", "does not exist")
    assert not (tmp_path / "run").exists()


def test_missing_recipe_and_data(tmp_path):
    assert_one_line_error(run_lmscale("train", str(tmp_path / "nope.yaml")), "does not exist")
    result = run_lmscale(
        "train",
        f"output_dir={tmp_path / 'run'}",
        f"data.path={tmp_path / 'missing.txt'}",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    assert_one_line_error(result, "data.path=", "does not exist")
    assert not (tmp_path / "run").exists()


def test_debug_flag_shows_the_traceback(tmp_path):
    result = run_lmscale("--debug", "train", f"output_dir={tmp_path}", "zero.stage=9")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_overrides_may_follow_the_flags_and_keep_their_order():
    args = parse_args(["launch", "train.lr=1e-3", "--nproc", "2", "zero.stage=2", "--force", "train.lr=2e-3"])
    assert args.nproc == 2 and args.force
    config_path, overrides = split_config_and_overrides(args)
    assert config_path is None and overrides == ["train.lr=1e-3", "zero.stage=2", "train.lr=2e-3"]
    config, _ = load_config(config_path, overrides)
    assert config.train.lr == 2e-3 and config.zero.stage == 2  # the later value wins


def test_a_stray_word_after_the_flags_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["plan", "zero.stage=2", "--gpus", "2", "oops"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: oops" in capsys.readouterr().err
