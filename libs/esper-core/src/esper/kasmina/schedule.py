"""α schedules: move a seed's α from where it is to a target over K steps."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from esper.exceptions import AlphaRangeError, ConfigError

RampShape = Literal["linear", "cosine"]


@dataclass
class AlphaRamp:
    """α(t) for t = 0..steps, from `start` to `target`; `done` once t reaches `steps`.

    `then_retire` marks the reverse ramp of a retirement: when it completes, the seed is recycled.
    """

    start: float
    target: float
    steps: int
    shape: RampShape = "linear"
    then_retire: bool = False
    t: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ConfigError(f"ramp steps must be an integer ≥ 1, got {self.steps!r}")
        if self.shape not in ("linear", "cosine"):
            raise ConfigError(f"ramp shape must be 'linear' or 'cosine', got {self.shape!r}")
        for name, value in (("start", self.start), ("target", self.target)):
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise AlphaRangeError(f"ramp {name} α={value!r} is not a number")
            if not 0.0 <= value <= 1.0:  # NaN fails this too
                raise AlphaRangeError(f"ramp {name} α={value} is outside [0, 1]")

    @property
    def done(self) -> bool:
        return self.t >= self.steps

    def value(self) -> float:
        frac = min(self.t, self.steps) / self.steps
        if self.shape == "cosine":
            frac = 0.5 - 0.5 * math.cos(math.pi * frac)
        return self.start + (self.target - self.start) * frac

    def advance(self) -> float:
        self.t = min(self.t + 1, self.steps)
        return self.target if self.done else self.value()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlphaRamp:
        return cls(**data)
