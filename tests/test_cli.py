"""The CLI as a user meets it: bad input stops before anything is written, with one line and exit 2."""

import pytest
from helpers import run_lmscale

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
        (["optim.lr"], ["not key=value"]),
        (["deepspeed_config=ds_configs/zero2_bf16.json", "zero.stage=1"], ["zero.stage=1 but", "says 2"]),
    ],
)
@pytest.mark.parametrize("command", ["train", "launch"])
def test_bad_input_writes_nothing(tmp_path, command, overrides, fragments):
    out = tmp_path / "run"
    result = run_lmscale(command, f"output_dir={out}", *overrides)
    assert_one_line_error(result, *fragments)
    assert not out.exists()


def test_launch_checks_data_and_layout_once_before_any_rank_starts(tmp_path):
    """What the ranks would find 15 s later, once per rank in launcher noise: one line from the launcher."""
    out = tmp_path / "run"
    missing = run_lmscale("launch", "--gpus-per-node", "2", f"output_dir={out}", f"data.path={tmp_path}/a.jsonl",
                          f"data.eval_path={tmp_path}/b.jsonl")  # fmt: skip
    assert_one_line_error(
        missing, f"data.path={tmp_path}/a.jsonl does not exist", "unset data.eval_path to hold out"
    )
    unfit = run_lmscale("launch", "--gpus-per-node", "2", f"output_dir={out}", "parallel.sequence=2")
    assert_one_line_error(unfit, "gpt2 attention does not fit DeepSpeed Ulysses", "parallel.sequence=1")
    dense = run_lmscale("launch", "--gpus-per-node", "2", f"output_dir={out}", "parallel.expert=2")
    assert_one_line_error(dense, "gpt2 is not a mixture-of-experts model", "parallel.expert=1")
    both = missing.stderr + unfit.stderr + dense.stderr
    assert "deepspeed" not in both and not out.exists()  # no launcher was started


def test_existing_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("precious: true\n")
    result = run_lmscale("train", f"output_dir={out}", "checkpoint.resume=none")
    assert_one_line_error(result, "already holds a run", "checkpoint.resume=none", "--force")
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
        f"checkpoint.resume={tmp_path / 'nope'}",
        "train.max_steps=40",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.vocab_size=300",
    )
    assert_one_line_error(result, "checkpoint.resume=", "does not exist")
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
    args = parse_args(
        ["launch", "optim.lr=1e-3", "--gpus-per-node", "2", "zero.stage=2", "--force", "optim.lr=2e-3"]
    )
    assert args.gpus_per_node == 2 and args.force
    config_path, overrides = split_config_and_overrides(args)
    assert config_path is None and overrides == ["optim.lr=1e-3", "zero.stage=2", "optim.lr=2e-3"]
    config, _ = load_config(config_path, overrides)
    assert config.optim.lr == 2e-3 and config.zero.stage == 2  # the later value wins


def test_a_stray_word_after_the_flags_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["plan", "zero.stage=2", "--gpus-per-node", "2", "oops"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: oops" in capsys.readouterr().err


def every_command(parser=None, prefix=()):
    """Every (sub)command path of the CLI, e.g. ("slurm", "submit")."""
    import argparse

    from lmscale.cli import build_parser

    parser = parser or build_parser()
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                paths.append((*prefix, name))
                paths += every_command(child, (*prefix, name))
    return paths


def test_every_subcommand_has_working_help_on_every_flag(capsys):
    """`--help` renders for every command (a bare % in a help string used to crash it)."""
    import argparse

    from lmscale.cli import build_parser, main

    paths = every_command()
    assert ("slurm", "submit") in paths and ("config", "keys") in paths and len(paths) >= 15
    for path in paths:
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        assert exit_info.value.code == 0, path
        assert "usage: lmscale" in capsys.readouterr().out
    parser = build_parser()

    def undocumented(parser, path=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from undocumented(child, (*path, name))
            elif action.option_strings and action.help is None:
                yield (*path, action.option_strings[0])

    assert list(undocumented(parser)) == []


def test_version_and_debug_on_either_side_of_the_subcommand(capsys):
    from lmscale import __version__
    from lmscale.cli import main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"lmscale {__version__}"
    assert parse_args(["--debug", "plan", "--gpus-per-node", "1"]).debug
    assert parse_args(["plan", "--gpus-per-node", "1", "--debug"]).debug
    assert not parse_args(["plan", "--gpus-per-node", "1"]).debug


def test_one_name_for_gpus_per_node_and_the_old_names_still_parse():
    for argv in (["launch"], ["plan"], ["slurm", "submit"]):
        assert parse_args([*argv, "--gpus-per-node", "4"]).gpus_per_node == 4
    assert parse_args(["launch", "--nproc", "3"]).gpus_per_node == 3
    assert parse_args(["plan", "--gpus", "8"]).gpus_per_node == 8


def test_config_keys_lists_every_key_with_default_and_description():
    from lmscale.config.reference import config_keys

    result = run_lmscale("config", "keys")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(config_keys()) >= 100
    lr = next(line for line in lines if line.startswith("optim.lr "))
    assert "0.002" in lr and "Peak learning rate." in lr
    assert any(line.startswith("finetune.lora.r ") for line in lines)


def test_config_show_prints_the_resolved_config():
    import yaml

    result = run_lmscale("config", "show", "configs/tiny-cpu.yaml", "optim.lr=1e-3", "zero.stage=2")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert (
        shown["optim"]["lr"] == 1e-3 and shown["zero"]["stage"] == 2 and shown["data"]["max_seq_len"] == 256
    )
    assert_one_line_error(
        run_lmscale("config", "show", "optm.lr=1"), "optm: unknown key; did you mean optim?"
    )


@pytest.mark.parametrize(
    ("unknown", "meant"),
    [
        ("train.lrr", "optim.lr"),
        ("data.lr", "optim.lr"),
        ("data.max_seq_length", "data.max_seq_len"),
        ("zero.offlod", "zero.offload"),
        ("wandb.nonsense_words", None),
    ],
)
def test_unknown_key_suggests_the_closest(unknown, meant):
    from lmscale.config.reference import closest_key

    assert closest_key(unknown) == meant


def test_importing_lmscale_does_no_work():
    """No module selects the accelerator or imports deepspeed when imported: commands do, where they start."""
    import subprocess
    import sys

    code = (
        "import os, sys; import lmscale.cli; cli_torch = 'torch' in sys.modules; "
        "import lmscale.training.worker, lmscale.planning.plan, lmscale.checkpointing.export; "
        "print('deepspeed' in sys.modules, 'DS_ACCELERATOR' in os.environ, cli_torch)"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "DS_ACCELERATOR"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    # and the CLI itself imports no torch, so `lmscale --help` is quick
    assert result.stdout.split() == ["False", "False", "False"], result.stderr[-2000:]


@pytest.mark.parametrize("argv", [["config", "keys"], ["--help"]])
def test_a_closed_pipe_ends_the_output_quietly(argv):
    """`lmscale config keys | head`: the reader leaves early; no BrokenPipeError traceback, exit 0."""
    import subprocess
    import sys

    from helpers import REPO

    command = [sys.executable, "-m", "lmscale.cli", *argv]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # closed before the first write: every write meets a closed pipe
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and b"Traceback" not in stderr, stderr.decode()[-2000:]
