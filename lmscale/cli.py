"""`lmscale` command line: each subcommand maps to one module."""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

from tqdm import tqdm

from lmscale import __version__
from lmscale.errors import ConfigError, LmscaleError, is_write_failure, write_failure_line
from lmscale.fast_exit import skip_final_collection
from lmscale.reporting.sink import configure_console
from lmscale.resources import find_file


def _add_run_arguments(parser: argparse.ArgumentParser, force: bool = True) -> None:
    parser.add_argument("config", nargs="?", help="YAML recipe (default: the embedded tiny CPU recipe)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4 zero.stage=2"
    )
    if force:
        parser.add_argument("--force", action="store_true", help="replace an existing run in output_dir")


DEBUG_HELP = "show Python tracebacks for lmscale errors"


def _gpus_per_node_argument(parser: argparse.ArgumentParser, old_name: str | None, **kwargs) -> None:
    """`--gpus-per-node` is the one name for ranks per node in every command; the name a command had
    before still parses (hidden), so existing scripts keep working."""
    parser.add_argument("--gpus-per-node", dest="gpus_per_node", type=int, **kwargs)
    if old_name:
        parser.add_argument(old_name, dest="gpus_per_node", type=int, help=argparse.SUPPRESS)


def _subcommands(parser: argparse.ArgumentParser, dest: str):
    """Subparsers that all take `--debug` too, so it may stand before or after the subcommand (its
    default is suppressed there, so an absent one does not reset the main parser's value)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    actions = parser.add_subparsers(dest=dest, required=True)
    actions.add_parser = partial(actions.add_parser, parents=[common])
    return actions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmscale", description="Train transformer LMs on DeepSpeed.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("--version", action="version", version=f"lmscale {__version__}")
    commands = _subcommands(parser, "command")
    train = commands.add_parser("train", help="train in this process (debug mode: one GPU, or CPU)")
    _add_run_arguments(train)
    profile = commands.add_parser(
        "profile",
        help="train a config's first B steps in this process, steps A to B traced by the torch profiler "
        "(a scratch run beside output_dir)",
    )
    _add_run_arguments(profile, force=False)  # its scratch directory is always replaced
    profile.add_argument("--steps", required=True, help="A:B, the 1-based steps to record (e.g. 5:7)")
    launch = commands.add_parser("launch", help="train on several ranks/nodes through DeepSpeed's launcher")
    _add_run_arguments(launch)
    _gpus_per_node_argument(
        launch,
        "--nproc",
        default=None,
        help="ranks per node: GPUs or CPU processes (default 1, or the hostfile's slots)",
    )
    launch.add_argument("--hostfile", help="DeepSpeed hostfile ('host slots=N' lines) for several nodes")
    launch.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")
    launch.add_argument(
        "--node-rank",
        type=int,
        default=None,
        help="with --hostfile: start only this node's ranks, no ssh (run on each node)",
    )
    launch.add_argument(
        "--master-addr", help="with --node-rank: the address of node 0; with --elastic: the rendezvous node's"
    )
    launch.add_argument(
        "--elastic",
        metavar="MIN:MAX",
        help="run under torchrun's elastic agent on MIN to MAX nodes (the same command on each): a dead rank or "
        "node restarts the job in place from its last checkpoint, on the ranks that remain",
    )
    launch.add_argument(
        "--max-restarts", type=int, default=None, help="with --elastic: restarts after failures (default 3)"
    )
    launch.add_argument(
        "--last-call",
        type=int,
        default=None,
        metavar="SECONDS",
        help="with --elastic: how long a (re)start waits for more nodes once MIN have joined (default 30)",
    )
    report = commands.add_parser(
        "report", help="print a run's summary and draw its dashboard (report.png) next to metrics.jsonl"
    )
    report.add_argument("run_dir", help="the output_dir of an lmscale run")
    report.add_argument("--out", help="directory for report.png (default: the run dir)")
    _add_tool_commands(commands)
    _add_config_commands(commands)
    _add_slurm_commands(commands)
    sweep = commands.add_parser(
        "sweep", help="hyperparameter search: grid, random or Bayesian, each trial a real run"
    )
    sweep.add_argument("spec", help="the sweep's YAML (base, method, trials, metric, overrides, space)")
    plan = commands.add_parser(
        "plan", help="per-GPU memory of ZeRO 0-3 (+offload) for a config, and what fits"
    )
    plan.add_argument("config", nargs="?", help="YAML recipe (default: the embedded tiny CPU recipe)")
    plan.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    _gpus_per_node_argument(plan, "--gpus", default=None, help="GPUs per node (required)")
    plan.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    plan.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    plan.add_argument(
        "--cpu-mem", type=float, default=512.0, help="GiB of host memory per node (default 512)"
    )
    plan.add_argument("--json", action="store_true", help="print the rows as JSON")
    return parser


def _add_config_commands(commands) -> None:
    config = commands.add_parser("config", help="every config key with its default, or a resolved config")
    actions = _subcommands(config, "config_command")
    actions.add_parser("keys", help="list every key, its default and what it does")
    show = actions.add_parser("show", help="print the resolved config as YAML")
    show.add_argument("config", nargs="?", help="YAML recipe (default: the embedded tiny CPU recipe)")
    show.add_argument("overrides", nargs="*", help="dotted key=value overrides")


def _add_slurm_commands(commands) -> None:
    slurm = commands.add_parser("slurm", help="SLURM batch jobs: submit, status, cancel")
    actions = _subcommands(slurm, "slurm_command")
    submit = actions.add_parser("submit", help="render the sbatch script into the run dir and submit it")
    submit.add_argument("config", nargs="?", help="YAML recipe (default: the embedded tiny CPU recipe)")
    submit.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    submit.add_argument("--nodes", type=int, default=1, help="nodes to allocate")
    _gpus_per_node_argument(submit, None, default=1, help="GPUs per node = ranks per node (default 1)")
    submit.add_argument(
        "--cpu", action="store_true", help="CPU ranks: request no GPUs (--gpus-per-node ranks each)"
    )
    submit.add_argument("--cpus-per-task", type=int, help="CPUs for each node's task (all its ranks)")
    submit.add_argument("--partition", help="SLURM partition")
    submit.add_argument("--account", help="SLURM account")
    submit.add_argument("--time", help="time limit, e.g. 24:00:00")
    submit.add_argument(
        "--signal-seconds",
        type=int,
        default=120,
        help="send USR1 this long before the time limit (checkpoint)",
    )
    submit.add_argument("--master-port", type=int, help="rendezvous port (default: 20000 + job id %% 20000)")
    submit.add_argument("--job-name", default="lmscale", help="SLURM job name (default lmscale)")
    submit.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    for name, text in (
        ("status", "the run's job: queued, running, or how it ended"),
        ("cancel", "scancel the run's job"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("run_dir", help="the output_dir of the submitted run")


def _add_tool_commands(commands) -> None:
    """Commands around a run: see the LR schedule, export it, and use its model."""
    schedule = commands.add_parser("schedule", help="print (and plot) the LR schedule a config gives")
    schedule.add_argument("config", nargs="?", help="YAML recipe (default: the embedded tiny CPU recipe)")
    schedule.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. schedule.name=wsd")
    schedule.add_argument("--plot", help="write the curve to this PNG")
    export = commands.add_parser("export", help="write a run's checkpoint as an HF save_pretrained model")
    export.add_argument("run_dir", help="the output_dir of an lmscale run")
    export.add_argument("--out", required=True, help="directory for the HF model and its tokenizer")
    export.add_argument("--checkpoint", help="a checkpoint tag (step_N), path, or 'best' (default: newest)")
    export.add_argument("--force", action="store_true", help="replace a non-empty --out")
    export.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        help="precision of the written weights (default: the run's training precision)",
    )
    export.add_argument(
        "--merge",
        action="store_true",
        help="LoRA runs: fold the adapter into the base and write a whole model",
    )
    _add_model_commands(commands)


def _add_model_commands(commands) -> None:
    """Commands that use a trained model: evaluate it, score records with it, generate with it."""
    evaluate = commands.add_parser("eval", help="held-out loss/perplexity/entropy, and BLEU/ROUGE on tasks")
    evaluate.add_argument("target", help="an exported model directory, or a run's output_dir")
    evaluate.add_argument("--data", help="evaluate this whole file instead of the run's held-out split")
    evaluate.add_argument("--tasks", help="jsonl of {prompt, reference} pairs to score with BLEU and ROUGE")
    evaluate.add_argument("--batches", type=int, help="score only the first N held-out batches")
    evaluate.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    evaluate.add_argument(
        "--harness", help="lm-evaluation-harness task(s), comma-separated (e.g. hellaswag,arc_easy)"
    )
    evaluate.add_argument("--include-path", help="with --harness: a directory of your own lm-eval task YAMLs")
    evaluate.add_argument(
        "--limit", type=int, help="with --harness: score only the first N documents per task"
    )
    evaluate.add_argument("--num-fewshot", type=int, help="with --harness: few-shot examples per prompt")
    score = commands.add_parser("score", help="score records with a reward model (an export, or a run)")
    score.add_argument("target", help="a reward model's export, or its run's output_dir")
    score.add_argument("--data", required=True, help="jsonl records: {messages} or {prompt, completion}")
    score.add_argument("--out", help="where to write the scored records (default: DATA.rewards.jsonl)")
    score.add_argument("--max-tokens", type=int, default=8192, help="padded tokens per batch (default 8192)")
    generate = commands.add_parser("generate", help="sample text from an exported model (or a run)")
    generate.add_argument("target", help="an exported model directory, or a run's output_dir")
    given = generate.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", help="text to continue (with --chat: the user's message)")
    given.add_argument(
        "--messages",
        help="a JSON file of a conversation ([{role, content}, ...] or {messages: [...]}) ending with a user "
        "turn: the model writes the assistant's reply, through the tokenizer's chat template",
    )
    generate.add_argument(
        "--chat",
        action="store_true",
        help="--prompt is a user message: render it with the tokenizer's chat template and print the reply",
    )
    generate.add_argument(
        "--max-new-tokens", type=int, default=100, help="tokens to add, within the model's positions"
    )
    generate.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    generate.add_argument("--top-k", type=int, default=50, help="0 = off")
    generate.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def split_config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """argparse puts a first `key=value` into `config` when no recipe is given; move it back."""
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        return None, [args.config, *args.overrides]
    # A shipped recipe's name becomes its path, so launched ranks and sbatch scripts find it too.
    config = str(find_file(args.config)) if args.config else None
    return config, list(args.overrides)


def _train(args: argparse.Namespace) -> int:
    from lmscale.training import worker

    config_path, overrides = split_config_and_overrides(args)
    worker.run(config_path, overrides, force=args.force)
    return 0


def _profile(args: argparse.Namespace) -> int:
    """The config's first B steps in a scratch run directory beside its own (`<output_dir>-profile-stepsA-B`,
    replaced by the next profile of the same steps), with steps A to B traced (lmscale.training.profiling)."""
    from lmscale.config.loading import load_config
    from lmscale.training import worker

    first, last = step_range(args.steps)
    config_path, overrides = split_config_and_overrides(args)
    config, _ = load_config(config_path, overrides)
    profiled = [
        f"train.profile_steps=[{first},{last}]",
        f"train.max_steps={last}",
        "train.max_tokens=null",
        "train.epochs=null",
        "train.eval_batches=1",  # its evaluations are not what is measured
        f"output_dir={config.output_dir}-profile-steps{first}-{last}",
    ]
    if config.schedule.warmup_steps >= last:  # the LR's shape does not change what a step computes
        profiled.append("schedule.warmup_steps=0")
    worker.run(config_path, [*overrides, *profiled], force=True)
    return 0


def step_range(text: str) -> tuple[int, int]:
    first, colon, last = text.partition(":")
    if not (colon and first.isdigit() and last.isdigit()) or not 1 <= int(first) <= int(last):
        raise LmscaleError(f"--steps {text}: give A:B with 1 <= A <= B, e.g. --steps 5:7")
    return int(first), int(last)


def _launch(args: argparse.Namespace) -> int:
    from lmscale.jobs.elastic import ElasticNodes
    from lmscale.jobs.launch import LaunchFlags, launch_job
    from lmscale.reporting.sink import configure_console

    # The launcher reads no data; it imports transformers only for a split model's config (quieted there).
    configure_console(is_rank_zero=True, libraries=())
    config_path, overrides = split_config_and_overrides(args)
    if args.elastic is None and (args.max_restarts is not None or args.last_call is not None):
        raise ConfigError("--max-restarts and --last-call go with --elastic MIN:MAX: add it, or drop them")
    elastic = ElasticNodes.parse(args.elastic, args.max_restarts, args.last_call) if args.elastic else None
    flags = LaunchFlags(
        args.gpus_per_node,
        args.hostfile,
        args.node_rank,
        args.master_addr,
        args.master_port,
        args.force,
        elastic,
    )
    return launch_job(config_path, overrides, flags)


def _report(args: argparse.Namespace) -> int:
    from lmscale.reporting.report import report
    from lmscale.reporting.sink import print_summary_table

    summary, dashboard = report(args.run_dir, args.out)
    print_summary_table(summary)
    print(dashboard)
    return 0


def _schedule(args: argparse.Namespace) -> int:
    from lmscale.config import load_config
    from lmscale.training.schedules import schedule_command

    config_path, overrides = split_config_and_overrides(args)
    schedule_command(load_config(config_path, overrides)[0], Path(args.plot) if args.plot else None)
    return 0


def _export(args: argparse.Namespace) -> int:
    from lmscale.checkpointing.export import export

    checkpoint = export(
        Path(args.run_dir), Path(args.out), args.checkpoint, args.force, args.merge, args.dtype
    )
    print(f"exported {checkpoint} to {args.out}: {hf_loader(Path(args.out))}.from_pretrained({args.out!r})")
    return 0


def hf_loader(exported: Path) -> str:
    """The transformers (or peft) class that loads an export: a causal LM, or a sequence classifier."""
    import json

    if (exported / "adapter_config.json").is_file():
        task = json.loads((exported / "adapter_config.json").read_text(encoding="utf-8")).get("task_type")
        return "AutoPeftModelForSequenceClassification" if task == "SEQ_CLS" else "AutoPeftModelForCausalLM"
    architectures = (
        json.loads((exported / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    )
    classifier = any(name.endswith("ForSequenceClassification") for name in architectures)
    return "AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM"


def _eval(args: argparse.Namespace) -> int:
    from lmscale.evaluation.command import eval_command, harness_command

    if args.harness:
        tasks = [task.strip() for task in args.harness.split(",") if task.strip()]
        harness_command(Path(args.target), tasks, args.include_path, args.limit, args.num_fewshot, args.json)
        return 0
    tasks_path = Path(args.tasks) if args.tasks else None
    eval_command(Path(args.target), args.data, tasks_path, args.batches, args.json)
    return 0


def _score(args: argparse.Namespace) -> int:
    from lmscale.evaluation.scoring import score_command

    if args.max_tokens < 1:
        raise LmscaleError(f"--max-tokens {args.max_tokens} must be at least 1")
    out = score_command(
        Path(args.target), Path(args.data), Path(args.out) if args.out else None, args.max_tokens
    )
    print(out)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from lmscale.evaluation.inference import Sampling, generate_command

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    messages = Path(args.messages) if args.messages else None
    print(generate_command(Path(args.target), args.prompt, messages, args.chat, sampling))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from lmscale.planning.command import plan_command
    from lmscale.planning.plan import GIB, Hardware
    from lmscale.runs.run import StartChecks, open_run

    if args.gpus_per_node is None:
        raise LmscaleError("lmscale plan needs --gpus-per-node N: the GPUs of each node to plan for")
    if args.gpus_per_node < 1 or args.nodes < 1 or args.gpu_mem <= 0 or args.cpu_mem <= 0:
        raise LmscaleError("--gpus-per-node and --nodes must be at least 1, --gpu-mem and --cpu-mem positive")
    config_path, overrides = split_config_and_overrides(args)
    world_size = args.gpus_per_node * args.nodes
    # Planned for GPUs; a plan writes nothing, so the run directory is not checked.
    run = open_run(config_path, overrides, world_size, has_gpu=True, checks=StartChecks.NONE)
    hardware = Hardware(args.gpus_per_node, args.nodes, args.gpu_mem * GIB, args.cpu_mem * GIB)
    plan_command(run.config, hardware, args.json)
    return 0


def _config(args: argparse.Namespace) -> int:
    from lmscale.config import config_to_yaml, load_config
    from lmscale.config.reference import print_config_keys

    if args.config_command == "keys":
        print_config_keys()
        return 0
    config_path, overrides = split_config_and_overrides(args)
    print(config_to_yaml(load_config(config_path, overrides)[0]), end="")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from lmscale.jobs.sweep import run_sweep

    run_sweep(Path(args.spec))
    return 0


def _slurm(args: argparse.Namespace) -> int:
    from lmscale.jobs import slurm

    if args.slurm_command == "status":
        print(slurm.status(Path(args.run_dir)))
        return 0
    if args.slurm_command == "cancel":
        print(f"cancelled job {slurm.cancel(Path(args.run_dir))}")
        return 0
    config_path, overrides = split_config_and_overrides(args)
    job = slurm.SlurmJob(
        run_dir=Path("."),
        config_path=config_path,
        overrides=overrides,
        nodes=args.nodes,
        ranks_per_node=args.gpus_per_node,
        cpu=args.cpu,
        cpus_per_task=args.cpus_per_task,
        partition=args.partition,
        account=args.account,
        time=args.time,
        signal_seconds=args.signal_seconds,
        master_port=args.master_port,
        job_name=args.job_name,
    )
    print(slurm.submit_job(job, args.dry_run), end="")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; `key=value` overrides may stand before or after the flags.

    argparse ends a positional list at the first flag, so overrides after one come back unparsed;
    they join the others in the order given (a later value of a key still wins).
    """
    parser = build_parser()
    args, unparsed = parser.parse_known_args(argv)
    if unparsed and hasattr(args, "overrides") and all(is_override(token) for token in unparsed):
        args.overrides = [*args.overrides, *unparsed]
    elif unparsed:
        parser.error(f"unrecognized arguments: {' '.join(unparsed)}")
    return args


def is_override(token: str) -> bool:
    return "=" in token and not token.startswith("-")


# The HF libraries a command that reads no data uses (the others use both).
HF_LIBRARIES_USED = {"plan": (), "config": (), "schedule": (), "report": ()}  # plan quiets its own


def main(argv: list[str] | None = None) -> int:
    skip_final_collection()
    try:
        return run_command(argv)
    except BrokenPipeError:
        # The reader went away (`lmscale config keys | head`): what it read is what it wanted. Point
        # stdout at /dev/null so the interpreter's final flush cannot raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def run_command(argv: list[str] | None = None) -> int:
    """Parse the command line and run its subcommand; an LmscaleError becomes one line and its exit code."""
    args = parse_args(argv)  # first: --help and --version need no torch (it takes most of a second to import)
    from lmscale.parallel.engine import select_accelerator

    select_accelerator()  # before anything imports deepspeed, here or in the ranks a launch starts
    handlers = {
        "train": _train,
        "profile": _profile,
        "launch": _launch,
        "report": _report,
        "schedule": _schedule,
        "export": _export,
        "eval": _eval,
        "generate": _generate,
        "score": _score,
        "slurm": _slurm,
        "plan": _plan,
        "sweep": _sweep,
        "config": _config,
    }
    try:
        if args.command not in ("train", "profile", "launch"):  # those configure it per rank
            configure_console(
                is_rank_zero=True, libraries=HF_LIBRARIES_USED.get(args.command, ("datasets", "transformers"))
            )
        return handlers[args.command](args)
    except LmscaleError as exc:
        if args.debug:
            raise
        tqdm.write(f"lmscale: error: {exc}", file=sys.stderr)  # clears an open progress bar line first
        return exc.exit_code
    except OSError as exc:  # a full disk or a read-only place (report --out, export --out, a run's files)
        if args.debug or not is_write_failure(exc):
            raise
        tqdm.write(f"lmscale: error: {write_failure_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
