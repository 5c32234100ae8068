"""What a run needs that can be known before anything is written: the model (a preset, a local
directory or a Hub id), optional packages the config turns on, and W&B credentials in online mode.

`train`, `launch`, `slurm submit` and `plan` run these checks first, so a failed start is one line and
leaves no run directory behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmscale.config import Config
from lmscale.data.locations import hub_offline, missing_source_problem
from lmscale.errors import ConfigError
from lmscale.methods import method_for

if TYPE_CHECKING:
    from lmscale.parallel.layout import Layout

# `org/name` as the Hub spells a repository id; a local path that exists always wins.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(path: str) -> bool:
    return bool(HUB_ID.match(path)) and not Path(path).expanduser().exists()


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def resolve_hub_model(path: str, key: str) -> str:
    """A Hub id (`org/name`) as the local snapshot directory from the Hugging Face cache (`HF_HOME`),
    downloading it first unless `HF_HUB_OFFLINE` is set; any other path is returned as it is."""
    if not is_hub_id(path):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = hub_offline()
    try:
        return snapshot_download(path, local_files_only=offline)
    except LocalEntryNotFoundError:
        if offline:
            raise ConfigError(
                f"{key}={path} is a Hub id that is not in the Hugging Face cache ({hub_cache()}) and "
                "HF_HUB_OFFLINE is set: download it where there is network (hf download "
                f"{path}) into that cache, or point {key} at a local directory"
            ) from None
        raise ConfigError(
            f"{key}={path}: the Hub could not be reached and the model is not cached: check the network"
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"{key}={path} is not a model on the Hub (or it is private: log in with hf auth login)"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise ConfigError(f"{key}={path} could not be downloaded ({type(exc).__name__}): {exc}") from None


def hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def model_problems(config: Config) -> list[str]:
    """The model source: a known preset, or a directory holding an HF model."""
    from lmscale.model.presets import PRESETS

    path = config.model.path
    if path is None:
        if config.model.preset not in PRESETS:
            return [f"model.preset={config.model.preset!r} is unknown: choose one of {', '.join(PRESETS)}"]
        return []
    if not (Path(path).expanduser() / "config.json").is_file():
        return [f"model.path={path} has no config.json: point it at a directory written by save_pretrained"]
    return []


def package_problems(config: Config) -> list[str]:
    """Optional packages the config turns on."""
    problems = []
    if config.logging.tensorboard and not installed("tensorboard"):
        problems.append(
            "logging.tensorboard=true needs the tensorboard package: pip install tensorboard, "
            "or set logging.tensorboard=false"
        )
    if config.model.attn_implementation == "flash_attention_2":
        from lmscale.model.build import check_attention

        try:
            check_attention(config.model.attn_implementation)
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


def wandb_problems(config: Config) -> list[str]:
    """Online W&B needs credentials; without them wandb would prompt (no stdin in a batch job) or fail
    after the run directory is written."""
    if config.wandb.mode != "online" or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return []
    import wandb

    with contextlib.redirect_stderr(io.StringIO()):  # it says "API key is configured" when it is
        logged_in = wandb.login(prompt=False, verify=False)
    if logged_in:
        return []
    return [
        "wandb.mode=online but no W&B credentials were found (WANDB_API_KEY, ~/.netrc): run wandb login, "
        "or set wandb.mode=offline and wandb sync the run later"
    ]


def resolve_run_config(
    config_path: str | None, overrides: list[str], world_size: int, has_gpu: bool
) -> tuple[Config, dict]:
    """The one config resolution of every command that runs or plans a job: load the recipe with its
    overrides, validate, reconcile with the DeepSpeed JSON for `world_size` ranks on this kind of device,
    and check what a run needs before anything is written. Returns (config, DeepSpeed config)."""
    from lmscale.config import load_config
    from lmscale.parallel.ds_config import resolve

    config, explicit = load_config(config_path, overrides)
    config, ds_config = resolve(config, explicit, world_size, has_gpu)
    return preflight(config), ds_config


def harness_problems(config: Config) -> list[str]:
    """Harness tasks the config asks for must exist (lm-eval installed, names known) before training starts."""
    if not config.eval.harness_tasks:
        return []
    from lmscale.evaluation.harness import check_tasks

    try:
        check_tasks(config.eval.harness_tasks, config.eval.harness_include_path)
    except ConfigError as exc:
        return [f"eval.harness_tasks: {exc}"]
    return []


def preflight(config: Config) -> Config:
    """The config with Hub ids resolved to local snapshots (a new config; the validated one is left as it
    was), after checking everything above; every problem in one error."""
    config = with_local_hub_paths(config)
    problems = model_problems(config) + package_problems(config) + wandb_problems(config)
    problems += harness_problems(config) + reward_problems(config)
    if problems:
        raise ConfigError("; ".join(problems))
    return config


def reward_problems(config: Config) -> list[str]:
    """Whether an online method's reward functions load (a missing file or name fails here, before any rank
    starts, not after the model is built)."""
    if not method_for(config.finetune).online:
        return []
    from lmscale.rewards import load_rewards

    try:
        load_rewards(config.finetune.grpo.rewards)
    except ConfigError as exc:
        return [str(exc)]
    return []


def with_local_hub_paths(config: Config) -> Config:
    """model.path and data.tokenizer as local directories (Hub ids become their cached snapshots)."""
    model, data = config.model, config.data
    if model.path:
        model = model.model_copy(update={"path": resolve_hub_model(model.path, "model.path")})
    if data.tokenizer:
        data = data.model_copy(update={"tokenizer": resolve_hub_model(data.tokenizer, "data.tokenizer")})
    return config.model_copy(update={"model": model, "data": data})


def data_path_problems(config: Config) -> list[str]:
    """Local data files that do not exist (Hub datasets are checked where they are read)."""
    data = config.data
    return [
        problem
        for key, path in data.source_paths()
        if (problem := missing_source_problem(path, key, data.storage_options))
    ]


def layout_problems(config: Config, layout: Layout) -> list[str]:
    """What the model's config rules out of the tensor/sequence/expert layout (the ranks check the built model
    too)."""
    from lmscale.parallel.layout import config_split_problems

    if layout.group == 1 and layout.expert == 1:
        return []
    return config_split_problems(hf_model_config(config), layout)


def hf_model_config(config: Config) -> Any:
    """The HF config of the model the run builds, without building it (a preset's or model.path's)."""
    from lmscale.reporting.sink import quiet_transformers

    quiet_transformers()  # the launcher's console leaves it as it is until here (it costs a second to import)
    if config.model.path is None:
        from lmscale.model.build import preset_config

        return preset_config(config.model.preset, config.data.vocab_size, config.data.max_seq_len, 0, 0)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(config.model.path, trust_remote_code=config.model.trust_remote_code)


def launch_problems(config: Config, layout: Layout) -> list[str]:
    """What the launcher checks once, before any rank starts, beyond what every command checks."""
    return data_path_problems(config) + model_fit_problems(config, layout)


def model_fit_problems(config: Config, layout: Layout) -> list[str]:
    """What the model rules out of the layout and the model options: what `lmscale slurm submit` checks too
    (local data paths are left to the nodes, which may see other file systems than the login node)."""
    return layout_problems(config, layout) + tiled_mlp_problems(config)


def tiled_mlp_problems(config: Config) -> list[str]:
    """model.tiled_mlp on MLPs it cannot tile (mixture-of-experts layers, dropout inside the MLP), found on the
    model built on the meta device (no memory; about a second) with the check the ranks make on the real one:
    a batch job learns it when it is submitted, not after its wait in the queue."""
    if not config.model.tiled_mlp:
        return []
    import torch
    from transformers import AutoModelForCausalLM

    from lmscale.model.build import apply_model_options
    from lmscale.model.tiled_mlp import block_mlps, check_tileable

    hf_config = hf_model_config(config)
    try:
        apply_model_options(hf_config, config.model)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                hf_config, trust_remote_code=config.model.trust_remote_code
            )
        check_tileable(block_mlps(model))
    except ConfigError as exc:
        return [str(exc)]
    return []
