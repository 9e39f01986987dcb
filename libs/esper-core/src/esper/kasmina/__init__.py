"""Kasmina: seed slots inside host layers."""

from esper.kasmina.layer import KasminaLayer, SeedInfo
from esper.kasmina.lifecycle import LEGAL_TRANSITIONS, LifecycleEvent, LifecycleManager
from esper.kasmina.schedule import AlphaRamp
from esper.kasmina.state import RUNNING_STATES, BlendMode, SeedState, StateLayout

__all__ = [
    "LEGAL_TRANSITIONS",
    "RUNNING_STATES",
    "AlphaRamp",
    "BlendMode",
    "KasminaLayer",
    "LifecycleEvent",
    "LifecycleManager",
    "SeedInfo",
    "SeedState",
    "StateLayout",
]
