"""Errors the pack raises for bad input: one line, naming the file and the problem."""


class LoraRarError(ValueError):
    """Bad input the user can fix: a message of one line that names the file (or layer) and the problem."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class LoraRarFileExists(LoraRarError):
    """The target file exists and the caller did not allow replacing it."""
