"""One exception type for mistakes a user can fix: the CLI prints its message, never a traceback."""


class UserError(Exception):
    """A bad input or a missing step; the message says what to do."""
