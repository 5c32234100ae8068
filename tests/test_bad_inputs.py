"""The bad-input catalogue: each case exits non-zero with one line naming the problem and the fix, shows no
traceback, and leaves an existing run directory exactly as it was."""

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from lmscale import cli
from lmscale.config import Config, config_to_yaml


@pytest.fixture(autouse=True)
def _environment(restore_environment):
    """Every test here runs commands in-process (see conftest.restore_environment)."""


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A finished-looking run: its files must not change whatever bad input comes next."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(config_to_yaml(Config(output_dir=str(run))))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    return run


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def jsonl(tmp_path: Path, name: str, lines: list[str]) -> str:
    return write(tmp_path, name, "\n".join(lines) + "\n")


def checkpoint(run_dir: Path, step: int, marker: str) -> str:
    """A checkpoint of another run whose rank-1 shard lost its tail after it was complete."""
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"\0" * 10)
    files = {"zero_pp_rank_1_mp_rank_00_optim_states.pt": 4096}
    (path / "COMPLETE").write_text(marker.replace("%s", json.dumps(files)))
    return str(path)


# A GRPO run on a file of prompts (with each case's own settings after it)
GRPO_TRAIN = ["train", "{fresh}", "data.path={prompts_jsonl}", "data.format=prompt", "finetune.method=grpo"]

# (case id, argv after `lmscale` ({run} = the existing run, {fresh} = a new output_dir, files filled in),
#  fragments the one error line must hold)
CASES = [
    ("unknown key", ["train", "{run}", "train.learning_rate=1"], ["train.learning_rate: unknown key"]),
    ("wrong type", ["train", "{run}", "train.max_steps=many"], ["train.max_steps='many'"]),
    ("zero stage 5", ["train", "{run}", "zero.stage=5"], ["zero.stage=5"]),
    (
        "profile steps backwards",
        ["train", "{run}", "train.profile_steps=[5,3]"],
        ["train.profile_steps=[5, 3]"],
    ),
    (
        "profile past the end",
        ["train", "{run}", "train.max_steps=10", "train.profile_steps=[5,30]"],
        ["<= train.max_steps (10)"],
    ),
    ("profile steps unreadable", ["profile", "{run}", "--steps", "5-7"], ["--steps 5-7: give A:B"]),
    ("zero micro batch", ["train", "{run}", "train.micro_batch_size=0"], ["train.micro_batch_size=0"]),
    (
        "fp16 without a GPU",
        ["train", "{run}", "precision=fp16"],
        ["precision=fp16 needs a GPU", "precision=bf16"],
    ),
    ("unknown precision", ["train", "{run}", "precision=fp8"], ["precision='fp8'"]),
    ("negative lr", ["train", "{run}", "optim.lr=-1"], ["optim.lr=-1"]),
    ("warm-up past the end", ["train", "{run}", "schedule.warmup_steps=500"], ["shorten the warm-up"]),
    ("offload without ZeRO-2", ["train", "{run}", "zero.offload=cpu", "zero.stage=1"], ["set zero.stage=2"]),
    ("min_lr above lr", ["train", "{run}", "schedule.min_lr=1"], ["set min_lr <= lr"]),
    (
        "global batch mismatch",
        ["train", "{run}", "train.global_batch_size=7"],
        ["global_batch_size=7", "unset"],
    ),
    ("override without =", ["train", "{run}", "optim.lr"], ["not key=value"]),
    ("keep_last below 2", ["train", "{run}", "checkpoint.keep_last=1"], ["checkpoint.keep_last=1"]),
    ("missing recipe", ["train", "{missing}.yaml"], ["does not exist"]),
    ("malformed recipe", ["train", "{bad_yaml}"], ["line 3 is not valid YAML"]),
    ("recipe that is a list", ["train", "{list_yaml}"], ["must hold a mapping"]),
    (
        "missing deepspeed json",
        ["train", "{run}", "deepspeed_config=ds_configs/nope.json"],
        ["does not exist"],
    ),
    ("malformed deepspeed json", ["train", "{run}", "deepspeed_config={bad_json}"], ["is not valid JSON"]),
    (
        "json contradicts a set key",
        ["train", "{run}", "deepspeed_config=ds_configs/zero2_bf16.json", "zero.stage=3"],
        ["zero.stage=3 but", "says 2"],
    ),
    (
        "json with an optimizer",
        ["train", "{run}", "deepspeed_config={optimizer_json}"],
        ["sets optimizer: remove it"],
    ),
    ("missing data path", ["train", "{fresh}", "data.path={missing}.txt"], ["data.path=", "does not exist"]),
    ("budget below max_seq_len", ["train", "{run}", "data.max_tokens_per_batch=100"], ["raise the budget"]),
    (
        "path and sources",
        ["train", "{run}", "data.path=x.txt", "data.sources=[{{path: y.txt}}]"],
        ["use data.sources alone"],
    ),
    (
        "streaming near-dedup",
        ["train", "{run}", "data.streaming=true", "data.near_dedup=true"],
        ["does not stream"],
    ),
    (
        "malformed jsonl",
        ["train", "{fresh}", "data.path={bad_jsonl}", "data.cache_dir={cache}"],
        ["line 2", "on_bad_record=skip"],
    ),
    (
        "missing text field",
        ["train", "{fresh}", "data.path={other_field}", "data.cache_dir={cache}"],
        ["set data.text_field"],
    ),
    (
        "no files match the glob",
        ["train", "{fresh}", "data.path={tmp}", "data.glob=*.csv", "data.cache_dir={cache}"],
        ["fix data.glob"],
    ),
    (
        "empty after cleaning",
        ["train", "{fresh}", "data.path={tiny_docs}", "data.cache_dir={cache}"],
        ["empty after cleaning"],
    ),
    (
        "corrupt tokenizer",
        [
            "train",
            "{fresh}",
            "data.tokenizer={bad_tokenizer}",
            "data.path={good_jsonl}",
            "data.cache_dir={cache}",
        ],
        ["holds no loadable tokenizer"],
    ),
    (
        "resume path missing",
        ["train", "{run}", "checkpoint.resume={missing}"],
        ["checkpoint.resume=", "does not exist"],
    ),
    (
        "existing run with resume none",
        ["train", "{run}", "checkpoint.resume=none"],
        ["already holds a run", "--force"],
    ),
    (
        "resume with another model",
        ["train", "{run}", "model.preset=tiny-llama"],
        ["model.preset='tiny-llama'"],
    ),
    ("output_dir under a file", ["train", "output_dir={good_jsonl}/run"], ["which is a file"]),
    (
        "garbled hostfile",
        ["launch", "--gpus-per-node", "2", "{run}", "--hostfile", "{bad_hostfile}"],
        ["line 2", "host slots=N"],
    ),
    ("missing hostfile", ["launch", "{run}", "--hostfile", "{missing}"], ["does not exist"]),
    (
        "hostfile host that does not resolve",
        ["launch", "{run}", "--hostfile", "{unresolvable_hostfile}"],
        ["no-such-node.invalid does not resolve"],
    ),
    (
        "hostfile host that is unreachable",
        ["launch", "{run}", "--hostfile", "{unreachable_hostfile}"],
        ["192.0.2.1 is unreachable over ssh", "--node-rank"],
    ),
    (
        "node rank outside the hostfile",
        [
            "launch",
            "{run}",
            "--hostfile",
            "{unreachable_hostfile}",
            "--node-rank",
            "2",
            "--master-addr",
            "10.0.0.1",
        ],
        ["--node-rank 2 needs 0 <= rank < 1"],
    ),
    ("no ranks", ["launch", "--gpus-per-node", "0", "{run}"], ["--gpus-per-node 0"]),
    ("report of no run", ["report", "{tmp}"], ["has no metrics.jsonl"]),
    (
        "unknown preset, before any data work",
        ["train", "{fresh}", "model.preset=gpt-5", "data.path={missing}"],
        ["model.preset='gpt-5' is unknown: choose one of tiny-gpt2"],
    ),
    (
        "plan of a model dir without config.json",
        ["plan", "model.path={tmp}", "--gpus-per-node", "1"],
        ["has no config.json"],
    ),
    (
        "Hub id not in the cache, offline",
        ["train", "{fresh}", "model.path=nobody-here/no-such-model"],
        ["model.path=nobody-here/no-such-model is a Hub id that is not in the Hugging Face cache"],
    ),
    (
        "misspelt key gets a suggestion",
        ["train", "{fresh}", "train.lrr=1e-3"],
        ["train.lrr: unknown key; did you mean optim.lr?"],
    ),
    (
        "unknown harness task in training",
        ["train", "{fresh}", "eval.harness_tasks=[no_such_task]"],
        ["eval.harness_tasks: unknown harness task(s) no_such_task"],
    ),
    (
        "unknown harness task in eval",
        ["eval", "{tmp}", "--harness", "no_such_task"],
        ["unknown harness task(s)"],
    ),
    (
        "lengths of training given twice",
        ["train", "{fresh}", "train.max_tokens=1000"],
        ["set exactly one of train.max_steps, train.max_tokens, train.epochs", "train.max_steps=null"],
    ),
    (
        "truncated checkpoint shard",
        ["train", "{run}", "checkpoint.resume={truncated_checkpoint}"],
        [
            "is damaged",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt has 10 bytes of the 4096 written",
            "delete",
        ],
    ),
    (
        "unreadable checkpoint marker",
        ["train", "{run}", "checkpoint.resume={garbled_checkpoint}"],
        ["unreadable COMPLETE marker", "delete"],
    ),
    (
        "GRPO without reward functions",
        GRPO_TRAIN,
        ["finetune.method=grpo needs finetune.grpo.rewards", "lmscale.rewards:exact_answer"],
    ),
    (
        "GRPO reward file missing",
        [
            *GRPO_TRAIN,
            "finetune.grpo.rewards=[{tmp}/nowhere.py:score]",
        ],
        ["reward function", "nowhere.py does not exist"],
    ),
    (
        "GRPO reward function misnamed",
        [
            *GRPO_TRAIN,
            "finetune.grpo.rewards=[lmscale.rewards:exact_answr]",
        ],
        ["lmscale.rewards has no function 'exact_answr'"],
    ),
    (
        "GRPO counted in tokens",
        [
            *GRPO_TRAIN,
            "finetune.grpo.rewards=[lmscale.rewards:exact_answer]",
            "train.max_steps=null",
            "train.max_tokens=1000",
        ],
        ["samples its own data", "set train.max_steps"],
    ),
    (
        "GRPO weights do not match the functions",
        [
            *GRPO_TRAIN,
            "finetune.grpo.rewards=[lmscale.rewards:exact_answer]",
            "finetune.grpo.reward_weights=[1,2]",
        ],
        ["reward_weights has 2 weights for 1 reward functions"],
    ),
    (
        "GRPO completions do not split into micro-batches",
        [
            *GRPO_TRAIN,
            "finetune.grpo.rewards=[lmscale.rewards:exact_answer]",
            "finetune.grpo.prompts_per_step=1",
            "finetune.grpo.group_size=3",
            "train.grad_accum_steps=2",
        ],
        ["each rank's 3 completions", "train.grad_accum_steps=2 micro-batches"],
    ),
    (
        "GRPO reward function that needs a field the records lack",
        [
            *GRPO_TRAIN,
            "finetune.grpo.rewards=[{needs_solution}:check]",
            "finetune.grpo.max_new_tokens=8",
            "data.max_seq_len=32",
            "data.vocab_size=300",
        ],
        ["reward function", "check raised TypeError", "solution"],
    ),
    (
        "GRPO prompt format without a prompt field",
        [
            "train",
            "{fresh}",
            "data.path={other_field}",
            "data.format=prompt",
            "finetune.method=grpo",
            "finetune.grpo.rewards=[lmscale.rewards:exact_answer]",
        ],
        ["has none of the fields 'prompt', 'messages'", "data.prompt_field"],
    ),
    (
        "a prompt conversation that ends with the reply",
        [
            *GRPO_TRAIN,
            "data.path={assistant_last}",
            "finetune.grpo.rewards=[lmscale.rewards:exact_answer]",
        ],
        ["line 2", "must end with a user turn"],
    ),
]


@pytest.mark.parametrize(("argv", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, run_dir, capsys, offline_hub, argv, fragments):
    files = {
        "run": f"output_dir={run_dir}",
        "fresh": f"output_dir={tmp_path / 'fresh'}",  # data problems are found before a new run dir is made
        "tmp": str(tmp_path),
        "cache": str(tmp_path / "cache"),
        "missing": str(tmp_path / "missing"),
        "bad_yaml": write(tmp_path, "bad.yaml", "train:\n  lr: [1, 2\n"),
        "list_yaml": write(tmp_path, "list.yaml", "- 1\n- 2\n"),
        "bad_json": write(tmp_path, "bad.json", '{"zero_optimization": {"stage": 2,}}'),
        "optimizer_json": write(tmp_path, "opt.json", json.dumps({"optimizer": {"type": "Adam"}})),
        "bad_jsonl": jsonl(
            tmp_path, "bad.jsonl", ['{"text": "a fine first line of text"}', '{"text": broken']
        ),
        "good_jsonl": jsonl(
            tmp_path, "good.jsonl", [json.dumps({"text": f"document number {i} " * 4}) for i in range(20)]
        ),
        "other_field": jsonl(tmp_path, "other.jsonl", [json.dumps({"body": "x"}), json.dumps({"body": "y"})]),
        "prompts_jsonl": jsonl(
            tmp_path,
            "prompts.jsonl",
            [json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) for i in range(50)],
        ),
        "needs_solution": write(
            tmp_path,
            "needs_solution.py",
            "def check(prompts, completions, solution, **_):\n    return [0.0] * len(completions)\n",
        ),
        "assistant_last": jsonl(
            tmp_path,
            "chat_prompts.jsonl",
            [
                json.dumps({"messages": [{"role": "user", "content": f"q{i}"}], "answer": "a"})
                if i != 1
                else json.dumps(
                    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
                )
                for i in range(50)
            ],
        ),
        "tiny_docs": jsonl(tmp_path, "tiny.jsonl", [json.dumps({"text": f"x{i}"}) for i in range(10)]),
        "bad_tokenizer": str(tmp_path / "tokenizer"),
        "bad_hostfile": write(tmp_path, "hostfile", "node1 slots=2\nnode2 slots two\n"),
        "unresolvable_hostfile": write(
            tmp_path, "hostfile2", "localhost slots=1\nno-such-node.invalid slots=1\n"
        ),
        "unreachable_hostfile": write(
            tmp_path, "hostfile3", "192.0.2.1 slots=1\n"
        ),  # TEST-NET-1: never routed
    }
    files["truncated_checkpoint"] = checkpoint(
        tmp_path / "other", 4, '{"step": 4, "world_size": 2, "files": %s}'
    )
    files["garbled_checkpoint"] = checkpoint(tmp_path / "other", 2, '{"step": 2, "world_')
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{ truncated")
    before = snapshot(run_dir)
    code = cli.main([part.format(**files) for part in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lmscale: error:")]
    assert code != 0
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert snapshot(run_dir) == before
    assert not (tmp_path / "fresh").exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["output_dir"] == str(run_dir)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["logging.tensorboard=true"], ["logging.tensorboard=true needs the tensorboard package"]),
        (["wandb.mode=online"], ["wandb.mode=online but no W&B credentials were found", "wandb login"]),
    ],
    ids=["tensorboard not installed", "W&B online without credentials"],
)
def test_missing_package_or_credentials_writes_nothing(
    tmp_path, run_dir, capsys, monkeypatch, argv, fragments
):
    """What the config turns on is checked before the run dir is touched (new or existing)."""
    import lmscale.runs.preflight

    monkeypatch.setattr(lmscale.runs.preflight, "installed", lambda package: package != "tensorboard")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no W&B settings
    before = snapshot(run_dir)
    for output_dir in (run_dir, tmp_path / "fresh"):
        code = cli.main(["train", f"output_dir={output_dir}", *argv])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lmscale: error:")]
        assert code == 2 and len(lines) == 1 and all(f in lines[0] for f in fragments), lines
    assert snapshot(run_dir) == before and not (tmp_path / "fresh").exists()


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 25


def test_master_port_in_use(tmp_path, run_dir, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = snapshot(run_dir)
        code = cli.main(
            ["launch", "--gpus-per-node", "2", "--master-port", str(port), f"output_dir={run_dir}"]
        )
    err = capsys.readouterr().err
    assert code != 0 and f"--master-port {port} is in use on this host" in err and "Traceback" not in err
    assert snapshot(run_dir) == before
