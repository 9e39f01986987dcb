"""A service as a real process for tests and benchmarks: `esper.processes.service`, which the
local stack runs on too, under the name tests have always imported."""

from esper.processes.service import ServiceProcess, ServiceStartError

__all__ = ["ServiceProcess", "ServiceStartError"]
