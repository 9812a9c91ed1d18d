"""The project's own error type: a user mistake, told in one sentence, exit code 2 from the CLI."""

from __future__ import annotations


class TetherError(Exception):
    """A problem with the user's input (file, key, value, path) that they can fix.

    The message is one sentence that names the file, key or line and says what is allowed.
    The CLI prints it without a traceback and exits with code 2.
    """

    exit_code = 2


class ConfigError(TetherError):
    """A YAML config that does not parse or does not validate."""


class DataError(TetherError):
    """A dataset file or row that cannot be used."""


class ModelLoadError(TetherError):
    """A model path that is missing, not a model, or unsafe to load."""


class RankError(TetherError):
    """A user error the processes of a launched run reported; the launching CLI tells it once.

    ``exit_code`` is the ranks' own: 2 for an error, 130 for a stop by Ctrl-C.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
