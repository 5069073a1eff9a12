"""The wsss pipeline: one module per stage, and what they share in ``stages.common``."""

__version__ = "0.1.0"
