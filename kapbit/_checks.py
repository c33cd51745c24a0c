"""Checks of constructor arguments shared by several parts, so each reads and words alike."""

from __future__ import annotations


def at_least_one(**counts: int | None) -> None:
    """Raise ValueError naming the first of ``counts`` below 1 (``None`` means unset)."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value!r}")
