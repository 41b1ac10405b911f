"""Integer rounding shared by packages that must not import each other (data pipeline, sequence parallelism)."""

from __future__ import annotations


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= `n` (`multiple` > 0)."""
    return -(-n // multiple) * multiple
