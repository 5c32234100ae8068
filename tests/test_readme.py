"""The README documents every config key and the two set-up commands that CI runs."""

from pathlib import Path

from pydantic import BaseModel

from lmscale.config import Config

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def dotted_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        name = field.alias or name  # a key spelled as a Python keyword (checkpoint.async)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += dotted_fields(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_every_config_key_is_documented():
    missing = [key for key in dotted_fields(Config) if f"`{key}`" not in README]
    assert not missing, f"README lacks {missing}"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    command = 'pip install torch==2.13.0 && pip install -e ".[test]" && ruff check . && python -m pytest'
    assert command in README and command in ci
