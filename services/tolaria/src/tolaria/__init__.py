"""Tolaria: training jobs. Submit, queue, train wrapped models in worker processes,
checkpoint and resume."""

__version__ = "0.1.0"
