"""Errors Tolaria raises about a submitted job spec."""

from __future__ import annotations

from collections.abc import Sequence

from esper.exceptions import ConfigError

Location = list[str | int]


def format_location(location: Sequence[str | int]) -> str:
    """`["spec", "morphogenesis", "layers", 1]` → `spec.morphogenesis.layers[1]`."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


class SpecError(ConfigError):
    """A job spec that cannot be run as written: a layer the model lacks, a file that is missing
    or malformed, a model too large for its data. The API answers it with 422.

    `location` is the path into the submitted document (`["spec", "dataset", "path"]`), in the
    style of pydantic's error locations, so clients can point at the offending field.
    """

    def __init__(self, location: Sequence[str | int], message: str) -> None:
        self.location: Location = list(location)
        self.message = message
        super().__init__(f"{format_location(self.location)}: {message}")

    def __reduce__(self) -> tuple[type[SpecError], tuple[Location, str]]:
        # Jobs are checked in worker processes too; the default reduce would call __init__ with
        # the formatted string as the only argument.
        return (type(self), (self.location, self.message))


class RunReportError(ConfigError):
    """An external run's report that cannot be taken (another job's, an event the run may not
    send): 422, with `location` in the request body."""

    def __init__(self, location: Sequence[str | int], message: str) -> None:
        self.location: Location = list(location)
        self.message = message
        super().__init__(f"{format_location(self.location)}: {message}")
