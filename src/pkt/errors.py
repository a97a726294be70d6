"""User-facing errors.

Anything the user can fix (bad input file, unknown model or task, missing data directory, shape that
cannot be transferred) raises :class:`PktError` with a one-line message naming the file/line or the
setting. The CLI prints it without a traceback and exits with status 2; library users can catch it.
"""


class PktError(Exception):
    """An error caused by input or settings, reported as one line (no traceback)."""


class DataError(PktError):
    """Malformed or missing data; the message names the file and line."""


class ModelError(PktError):
    """A model cannot be found, prepared or is of an unsupported architecture."""
