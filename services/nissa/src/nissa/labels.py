"""Bounded label values: every label Nissa exports takes values from a set that cannot grow with
its input. Values from a fixed vocabulary pass as they are; anything else is folded into a few
names, or into `other` once a per-label budget of distinct values is spent."""

from __future__ import annotations

import re

OTHER = "other"

#: Error types the bus writes into dead-letter records, by the reason label they become. Handler
#: exceptions carry the handler's own exception class name, which is open-ended: `handler_error`.
DEAD_LETTER_REASONS = {
    "MalformedMessageError": "malformed",
    "UnknownMessageTypeError": "unknown_type",
    "UnsupportedVersionError": "unsupported_version",
    "MessageValidationError": "invalid_payload",
    "MaxDeliveriesExceeded": "max_deliveries",
    "HandlerTimeout": "handler_timeout",
}
HANDLER_ERROR = "handler_error"

#: Tolaria gives each job its own consumer group on the control topic (`tolaria-job-<job id>`).
#: One series per job would be unbounded; they are summed into one `tolaria-job` group.
JOB_GROUP_PREFIX = "tolaria-job-"
JOB_GROUP = "tolaria-job"

_SAFE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


def dead_letter_reason(error_type: str) -> str:
    return DEAD_LETTER_REASONS.get(error_type, HANDLER_ERROR)


def fold_group(group: str) -> str:
    return JOB_GROUP if group.startswith(JOB_GROUP_PREFIX) else group


class Budget:
    """At most `limit` distinct values of one label; later new values read `other`.

    Values are admitted first come, first served and never evicted: a series must not change its
    label from one scrape to the next, and the bound matters more than which values made it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self.limit or not _SAFE.match(value):
            return OTHER
        self._seen.add(value)
        return value
