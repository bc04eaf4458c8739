"""Errors the pack raises for bad input: one line, naming the file and the problem."""

from collections.abc import Iterator
from contextlib import contextmanager


class LoraRarError(ValueError):
    """Bad input the user can fix: a message of one line that names the file (or layer) and the problem."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class LoraRarFileExists(LoraRarError):
    """The target file exists and the caller did not allow replacing it."""


@contextmanager
def unforeseen_as_error(what: str) -> Iterator[None]:
    """Turn an exception no check foresaw (a torch error on a malformed file) into one line naming ``what``.

    Only a net under the explicit checks: the original exception stays chained for logs and debuggers.
    """
    try:
        yield
    except LoraRarError:
        raise
    except (ArithmeticError, IndexError, KeyError, MemoryError, RuntimeError, TypeError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:300]
        raise LoraRarError(f"{what}: {type(exc).__name__}: {reason} (a malformed input no check caught; "
                           f"please report it)") from exc
