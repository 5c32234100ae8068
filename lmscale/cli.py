"""`lmscale` command line: each subcommand maps to one module."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from lmscale.engine import free_port, select_accelerator
from lmscale.errors import LmscaleError

select_accelerator()  # before anything imports deepspeed, here or in launched ranks


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML recipe (default: the embedded tiny CPU recipe)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=3e-4 zero.stage=2"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing run in output_dir")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmscale", description="Train transformer LMs on DeepSpeed.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for lmscale errors")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train in this process (debug mode: one GPU, or CPU)")
    _add_run_arguments(train)
    launch = commands.add_parser("launch", help="train on several ranks/nodes through the deepspeed launcher")
    _add_run_arguments(launch)
    launch.add_argument("--nproc", type=int, default=1, help="ranks per node (GPUs, or CPU processes)")
    launch.add_argument("--hostfile", help="DeepSpeed hostfile ('host slots=N' lines) for several nodes")
    launch.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")
    report = commands.add_parser(
        "report", help="print a run's summary and write PNG plots next to metrics.jsonl"
    )
    report.add_argument("run_dir", help="the output_dir of an lmscale run")
    return parser


def split_config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """argparse puts a first `key=value` into `config` when no recipe is given; move it back."""
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def _train(args: argparse.Namespace) -> int:
    from lmscale import worker

    config_path, overrides = split_config_and_overrides(args)
    worker.run(config_path, overrides, force=args.force)
    return 0


def _launch(args: argparse.Namespace) -> int:
    from lmscale import launch, rundir, worker
    from lmscale.checkpoint import find_resume_checkpoint
    from lmscale.logging import configure_console

    configure_console(is_rank_zero=True)
    config_path, overrides = split_config_and_overrides(args)
    if args.nproc < 1:
        raise LmscaleError(f"--nproc {args.nproc} must be at least 1")
    # Validate here, once, so a bad config fails before any rank starts.
    config, _ = worker.resolve_config(config_path, overrides, world_size=args.nproc)
    rundir.check_output_dir(Path(config.output_dir), args.force, config.train.resume)
    if not args.force:
        rundir.check_resume_compatible(Path(config.output_dir), config)
        find_resume_checkpoint(Path(config.output_dir), config.train.resume)
    command = launch.deepspeed_command(
        args.nproc, config_path, overrides, args.hostfile, args.force, args.master_port or free_port()
    )
    return launch.run_deepspeed(command)


def _report(args: argparse.Namespace) -> int:
    from lmscale.logging import print_summary_table
    from lmscale.report import report

    summary, plots = report(args.run_dir)
    print_summary_table(summary)
    for path in plots:
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"train": _train, "launch": _launch, "report": _report}
    try:
        return handlers[args.command](args)
    except LmscaleError as exc:
        if args.debug:
            raise
        tqdm.write(f"lmscale: error: {exc}", file=sys.stderr)  # clears an open progress bar line first
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
