"""What every picture of the pack shares: text drawn as given.

Names in pictures come from files and workflows (strangers' LoRA names, labels); matplotlib would read a
``$...$`` pair in them as a formula, draw it wrongly or fail the whole picture. :func:`plain_text` turns that
parsing off for one drawing call.
"""

from __future__ import annotations

import functools

import matplotlib


def plain_text(draw):
    """Decorator: ``draw`` runs with matplotlib's math-text parsing off (every Text it creates keeps it off)."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)
    return wrapper
