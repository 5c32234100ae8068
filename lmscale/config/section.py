"""The base of every config section: unknown keys are errors, assignments are validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # A key spelled as a Python keyword (checkpoint.async) is a field with that alias: read and written by
    # its alias everywhere (YAML, overrides, the saved config), never by the field's Python name.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, serialize_by_alias=True)
