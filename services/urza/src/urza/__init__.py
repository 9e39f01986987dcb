"""Urza: the blueprint registry and kernel registry service of Esper."""

__version__ = "0.1.0"
