"""The exceptions of a run that cannot start as configured: bad settings or bad input files.

``python -m train`` prints any of them as one ``error: ...`` line and exits with code 2; anything else
that escapes is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """A run's settings or inputs are wrong (an unknown key, a bad value, a model or data set that does
    not exist, a corrupt data file); the message says what to change."""


class WorkdirError(InputError, OSError):
    """The workdir cannot hold the run: not writable, too little free space, or another run's."""


class MissingDataError(InputError, FileNotFoundError):
    """A data set's files are not where the config says, and cannot be downloaded."""
