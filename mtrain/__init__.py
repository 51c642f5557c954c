"""mtrain: a command-line trainer for Transformer machine translation."""

__version__ = "0.1.0"
