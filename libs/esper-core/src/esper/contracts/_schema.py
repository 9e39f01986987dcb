"""Helpers the contract modules share to build their models and JSON Schemas; not vocabulary
(that is `esper.contracts.vocabulary`), and not for use outside `esper.contracts`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


def when(field: str, condition: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema `if/then` on one field, so that a model validator's rule is also in proto/
    for readers that are not pydantic."""
    return {
        "if": {"properties": {field: condition}, "required": [field]},
        "then": then,
    }


def fields_are(**schemas: dict[str, Any]) -> dict[str, Any]:
    """The `then` half of `when`: what the named fields must be."""
    return {"properties": schemas}


NULL: dict[str, Any] = {"type": "null"}


class Part(BaseModel):
    """Base of the records nested in a message: the same rules as `Message`."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
