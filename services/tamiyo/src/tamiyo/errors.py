"""Why Tamiyo turns down an operator's decision. Each error carries the `kind` and the
`location` the API reports; its class says which status that is (api/errors.py)."""

from __future__ import annotations

Location = list[str | int]


class OperatorError(Exception):
    """An operator's request Tamiyo will not carry out. `kind` is machine-readable
    (`seed_not_active`); `location` is where in the request the problem is."""

    def __init__(self, kind: str, message: str, location: Location) -> None:
        super().__init__(message)
        self.kind = kind
        self.location = location


class UnknownJobError(OperatorError, LookupError):
    """Tamiyo has seen nothing of the job."""


class DecisionConflictError(OperatorError):
    """The request clashes with the job's state or with an earlier decision of the same id."""


class InvalidDecisionError(OperatorError):
    """The decision cannot apply to the job as Tamiyo knows it."""


class UrzaUnavailableError(OperatorError):
    """The decision names a blueprint and Urza could not be asked about it."""
