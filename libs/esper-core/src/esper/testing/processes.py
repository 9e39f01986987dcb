"""Ending a child process gracefully or as a crash: `esper.processes.control`, under the name
tests have always imported."""

from esper.processes.control import kill, terminate

__all__ = ["kill", "terminate"]
