"""Errors a user can act on. The CLI prints their message and exits non-zero, no traceback."""


class SemdedupError(Exception):
    """Base class of the errors semdedup reports to its user."""


class ConfigError(SemdedupError):
    """The arguments or the job spec are wrong."""


class InputError(SemdedupError):
    """The input embeddings are unusable; the message names the file and the problem."""


class StorageError(SemdedupError):
    """Reading or writing a location failed (disk full, access denied, no such bucket,
    unreachable endpoint, retries exhausted); the message names the path."""
