"""How Tamiyo's API answers the errors its controller raises; each error brings its own `kind`
and location."""

from __future__ import annotations

from esper.service import ErrorMapping, ErrorTable
from tamiyo.errors import (
    DecisionConflictError,
    InvalidDecisionError,
    UnknownJobError,
    UrzaUnavailableError,
)

ERRORS: ErrorTable = {
    UnknownJobError: ErrorMapping(404),
    DecisionConflictError: ErrorMapping(409),
    InvalidDecisionError: ErrorMapping(422),
    UrzaUnavailableError: ErrorMapping(503),
}
