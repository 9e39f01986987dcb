"""The bus envelope and the registry of message contracts.

Every message on every topic is an Envelope `{id, type, version, source, job_id, correlation_id,
ts, payload}`; `type` and `version` name the pydantic contract its payload must fit. A consumer
that cannot decode an entry dead-letters it with the typed error's message.

Payloads are validated as JSON in strict mode: what travels is JSON, so a producer that sends
`"epoch": "3"` or `"alpha": true` has a bug, and the consumer says so instead of guessing.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from esper.exceptions import (
    ConfigError,
    MalformedMessageError,
    MessageValidationError,
    UnknownMessageTypeError,
    UnsupportedVersionError,
)

TOPICS = ("telemetry", "control", "health", "events", "jobs")
TYPE_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")


class Message(BaseModel):
    """Base of every payload. A subclass names its TYPE, VERSION and the TOPIC it travels on.

    Every float must be finite: JSON has no NaN, and a value that could not be measured is `None`
    (missing reads as missing, never as 0 or as a NaN that a serializer turns into null).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    TYPE: ClassVar[str]
    VERSION: ClassVar[int] = 1
    TOPIC: ClassVar[str]

    def upgrade(self) -> Message:
        """This message as its type's current contract: itself, unless it is an older version
        whose contract knows how to read it as the current one (and overrides this), so that
        what the old version lacks is derived once, in the contracts, not by each consumer."""
        return self


M = TypeVar("M", bound=type[Message])
_CONTRACTS: dict[str, dict[int, type[Message]]] = {}


def register(cls: M) -> M:
    """Class decorator: make `cls` the contract for (cls.TYPE, cls.VERSION).

    A changed payload shape is a new VERSION (a new class); the old one stays registered for as
    long as some producer may still send it, so consumers read both during a rolling upgrade.
    """
    name = cls.__name__
    type_ = getattr(cls, "TYPE", None)
    if not isinstance(type_, str) or not TYPE_RE.fullmatch(type_):
        raise ConfigError(f"{name}.TYPE must be a dotted lower-case name like 'a.b', got {type_!r}")
    if not isinstance(cls.VERSION, int) or isinstance(cls.VERSION, bool) or cls.VERSION < 1:
        raise ConfigError(f"{name}.VERSION must be an int ≥ 1, got {cls.VERSION!r}")
    topic = getattr(cls, "TOPIC", None)
    if topic not in TOPICS:
        raise ConfigError(f"{name}.TOPIC must be one of {TOPICS}, got {topic!r}")
    versions = _CONTRACTS.setdefault(type_, {})
    existing = versions.get(cls.VERSION, cls)
    if existing is not cls:
        raise ConfigError(
            f"contract {type_} v{cls.VERSION} is registered twice: by "
            f"{_qualified(existing)} and by {_qualified(cls)}"
        )
    versions[cls.VERSION] = cls
    return cls


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def contracts() -> dict[str, dict[int, type[Message]]]:
    """A copy of the registry: type → version → contract."""
    return {t: dict(v) for t, v in _CONTRACTS.items()}


def contract(type_: str, version: int) -> type[Message]:
    """The contract for (type, version), or the typed error a consumer dead-letters with."""
    versions = _CONTRACTS.get(type_)
    if versions is None:
        raise UnknownMessageTypeError(f"unknown message type {type_!r}")
    try:
        return versions[version]
    except KeyError:
        known = ", ".join(str(v) for v in sorted(versions))
        raise UnsupportedVersionError(
            f"message type {type_!r} has no schema version {version} (known: {known})"
        ) from None


class Envelope(BaseModel):
    """What a stream entry carries. `job_id` is copied out of the payload so that routing and
    filtering by job never need to decode the payload; `correlation_id` ties an effect to its
    cause (a transition or a `decision_taken` to the decision id)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=128)
    type: str = Field(min_length=1, max_length=128)
    version: int = Field(ge=1, le=1_000_000)
    source: str = Field(min_length=1, max_length=128)
    job_id: str | None = Field(default=None, max_length=128)
    correlation_id: str | None = Field(default=None, max_length=128)
    ts: float = Field(default_factory=time.time, ge=0)
    payload: dict[str, Any]

    _message: Message | None = PrivateAttr(default=None)

    @classmethod
    def wrap(
        cls,
        message: Message,
        *,
        source: str,
        job_id: str | None = None,
        correlation_id: str | None = None,
    ) -> Envelope:
        """Put a message in an envelope; `job_id` defaults to the message's own."""
        own_job = getattr(message, "job_id", None)
        if job_id is None:
            job_id = own_job
        elif own_job is not None and own_job != job_id:
            raise ConfigError(
                f"{message.TYPE}: envelope job_id {job_id!r} differs from the payload's {own_job!r}"
            )
        envelope = cls(
            type=message.TYPE,
            version=message.VERSION,
            source=source,
            job_id=job_id,
            correlation_id=correlation_id,
            payload=message.model_dump(mode="json"),
        )
        envelope._message = message
        return envelope

    def __eq__(self, other: object) -> bool:
        """Equal when the fields are: whether the payload was validated yet does not count."""
        if not isinstance(other, Envelope):
            return NotImplemented
        return self.__dict__ == other.__dict__

    @property
    def topic(self) -> str:
        return contract(self.type, self.version).TOPIC

    def message(self) -> Message:
        """The payload validated against its contract (typed errors for unknown/invalid)."""
        if self._message is None:
            model = contract(self.type, self.version)
            try:
                # Strict JSON validation: the payload is what came over the wire.
                self._message = model.model_validate_json(json.dumps(self.payload), strict=True)
            except ValidationError as err:
                raise MessageValidationError(
                    f"{self.type} v{self.version} message {self.id}: {_problems(err)}"
                ) from None
        return self._message

    def current(self) -> Message:
        """message(), upgraded to its type's current contract where an older one says how (a v1
        `event.decision_taken` gets its refusal code): what a consumer acts on."""
        message = self.message()
        try:
            return message.upgrade()
        except ValidationError as err:
            raise MessageValidationError(
                f"{self.type} v{self.version} message {self.id}: cannot be upgraded: "
                f"{_problems(err)}"
            ) from None

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> Envelope:
        """Parse and check an envelope and its payload; raise the MessageError that says why not."""
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MalformedMessageError(f"not JSON: {err}") from None
        if not isinstance(data, dict):
            raise MalformedMessageError(f"not an envelope: a JSON {type(data).__name__}")
        try:
            envelope = cls.model_validate(data, strict=True)
        except ValidationError as err:
            raise MalformedMessageError(f"not an envelope: {_problems(err)}") from None
        envelope.message()
        return envelope


def _problems(err: ValidationError) -> str:
    """`where: what (got value)` for each error, one line, short enough for a dead-letter entry."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(root)"
        got = "" if e["type"] == "missing" else f" (got {_short(e.get('input'))})"
        parts.append(f"{where}: {e['msg']}{got}")
    return "; ".join(parts)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
