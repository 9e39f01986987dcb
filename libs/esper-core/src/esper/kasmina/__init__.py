"""Kasmina: seed slots inside host layers."""

from typing import TYPE_CHECKING

from esper._lazy import lazy_exports

if TYPE_CHECKING:
    from esper.kasmina.layer import KasminaLayer, SeedInfo
    from esper.kasmina.lifecycle import LifecycleEvent, LifecycleManager
    from esper.kasmina.schedule import AlphaRamp
    from esper.kasmina.state import StateLayout
    from esper.kasmina.states import LEGAL_TRANSITIONS, RUNNING_STATES, BlendMode, SeedState

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

_WHERE = {
    "KasminaLayer": "esper.kasmina.layer",
    "SeedInfo": "esper.kasmina.layer",
    "LEGAL_TRANSITIONS": "esper.kasmina.states",
    "LifecycleEvent": "esper.kasmina.lifecycle",
    "LifecycleManager": "esper.kasmina.lifecycle",
    "AlphaRamp": "esper.kasmina.schedule",
    "RUNNING_STATES": "esper.kasmina.states",
    "BlendMode": "esper.kasmina.states",
    "SeedState": "esper.kasmina.states",
    "StateLayout": "esper.kasmina.state",
}
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
