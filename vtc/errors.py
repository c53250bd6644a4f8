"""Errors raised by vtc."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration, input or model that vtc cannot work with.

    The message always names the offending stage / field / value and what is allowed. Raised before any hook
    is attached (or after they are all removed), so the user's model is never left modified.
    """
