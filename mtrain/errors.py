"""The one exception type for user mistakes; the CLI prints it as a single line."""


class MtrainError(Exception):
    """A user error (bad input, bad config, missing file): shown as one line, no traceback."""
