"""Files lmscale ships beside its code: the recipes (`configs/`), DeepSpeed JSONs (`ds_configs/`), the sbatch
template (`slurm/`) and the launcher entry script (`launcher/`). In the repository `lmscale/resources/`
links to the top-level folders; in a wheel they are package data, so an install without the source
tree has them too."""

from __future__ import annotations

from pathlib import Path

RESOURCES = Path(__file__).resolve().parent / "resources"


def resource(relative: str | Path) -> Path:
    """A shipped file by its repository path, e.g. `ds_configs/zero2_bf16.json` (in a checkout, the
    top-level file itself: the links are resolved)."""
    return (RESOURCES / relative).resolve()


def find_file(path: str | Path) -> Path:
    """`path` as given if it exists, else the shipped file of that name (`configs/gpt2-124m.yaml` works
    from any directory once lmscale is installed)."""
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute():
        return given
    shipped = resource(given)
    return shipped if shipped.is_file() else given
