"""Training-process machinery: executing control decisions on a MorphableModel and reporting
telemetry. Independent of HTTP and Redis: the job runner passes in callables to emit and publish.
"""

from esper.training.orchestrator import SeedOrchestrator, SeedRecord
from esper.training.providers import KernelProvider, LocalKernelProvider
from esper.training.telemetry import TelemetryReporter

__all__ = [
    "KernelProvider",
    "LocalKernelProvider",
    "SeedOrchestrator",
    "SeedRecord",
    "TelemetryReporter",
]
