"""The built-in blueprints as the policy sees them.

Urza registers the built-ins at start-up, so they are in every Urza: Tamiyo falls back on them
when Urza cannot be asked, and an in-process controller without Urza chooses from them alone.
"""

from __future__ import annotations

from esper.blueprints import BUILTIN_BLUEPRINTS
from esper.policy.choice import BlueprintInfo


def builtin_catalogue() -> list[BlueprintInfo]:
    return [
        BlueprintInfo(spec.name, tuple(spec.hosts), spec.default_blend, spec.widens)
        for spec in BUILTIN_BLUEPRINTS.values()
    ]
