"""The errors a user acts on, raised before or instead of training; the command line shows
their message and exits with status 2."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message names the difference."""


class DivergenceError(ValueError):
    """Training diverged (a non-finite loss); nothing of the period was saved."""
