"""HostSignature's old home: it is a wire contract now, defined in `esper.contracts.kernels`.
This module stays so that code importing it from here keeps working."""

from esper.contracts.kernels import HostSignature

__all__ = ["HostSignature"]
