"""Errors raised for adapters that cannot be accepted; messages name the field, the expected and the given value."""

from __future__ import annotations


class AdapterError(ValueError):
    """The adapter is malformed, does not fit the base model, or breaks a limit."""


class AdapterTooLarge(AdapterError):
    """The upload, or one of its files, is larger than the configured limit."""
