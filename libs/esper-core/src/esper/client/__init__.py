"""HTTP clients of Esper's services."""

from esper.client.urza import UrzaClient

__all__ = ["UrzaClient"]
