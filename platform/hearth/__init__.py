"""Hearth: a serverless, event-driven platform for data-heavy functions."""

__version__ = "0.1.0"
