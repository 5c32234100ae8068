"""What lmscale export refuses before it reads a checkpoint (no processes, no training)."""

import pytest

from lmscale.checkpointing.export import export
from lmscale.checkpointing.rundir import RunDir
from lmscale.config import Config, config_to_yaml
from lmscale.errors import LmscaleError


def test_an_adapter_of_a_preset_base_is_exported_merged_only(tmp_path):
    """A LoRA adapter names its base by path; a preset's fresh base weights live only in the run."""
    run = tmp_path / "run"
    run.mkdir()
    config = Config.model_validate({"output_dir": str(run), "finetune": {"lora": {"r": 4}}})
    RunDir(run).config.write_text(config_to_yaml(config))
    with pytest.raises(
        LmscaleError, match="LoRA adapters on model.preset=tiny-gpt2, .*export it with --merge"
    ):
        export(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
