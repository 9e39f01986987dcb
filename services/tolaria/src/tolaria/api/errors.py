"""How Tolaria's API answers the errors its job store and spec checks raise, on every route."""

from __future__ import annotations

from fastapi import Request

from esper.service import ErrorMapping, ErrorTable, path_param
from tolaria.errors import Location, RunReportError, SpecError
from tolaria.jobstore import JobStateError, UnknownJobError


def _in_body(request: Request, exc: Exception) -> Location:
    """A spec error's location starts at the spec; the spec is the request body."""
    assert isinstance(exc, SpecError)
    return ["body", *exc.location[1:]]


ERRORS: ErrorTable = {
    UnknownJobError: ErrorMapping(404, "unknown_job", path_param("job_id")),
    JobStateError: ErrorMapping(409, "conflict", path_param("job_id")),
    SpecError: ErrorMapping(422, "invalid_spec", _in_body),
    RunReportError: ErrorMapping(422, "invalid_report"),
}
