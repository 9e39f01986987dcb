"""Tamiyo: the adaptation controller. It reads training telemetry and seed events, decides per
job when and where to grow a seed and whether a seed earned its place, and publishes decisions."""

__version__ = "0.1.0"
