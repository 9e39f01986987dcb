"""Nissa: the observability service of Esper (metrics, service health, job reports)."""

__version__ = "0.1.0"
