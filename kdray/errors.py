"""User-facing errors.

Every mistake a user can make (a bad config key, a malformed data file, a checkpoint that does not match the data)
raises a subclass of :class:`KdrayError` whose message names the problem: the file, row, column or key, and what was
expected. The CLI and the job scripts print the message and exit with status 2 instead of a traceback.
"""


class KdrayError(Exception):
    """Base class of every error caused by user input rather than by a bug."""


class ConfigError(KdrayError, ValueError):
    """A configuration key is unknown, has the wrong type, or is out of range."""


class DataError(KdrayError, ValueError):
    """An input data file is missing, malformed, or leaves nothing to train on."""


class CheckpointError(KdrayError, ValueError):
    """A checkpoint directory is missing, incomplete, corrupt, or does not match the data."""
