"""The one exception type users see: a clear message naming the file, row or field, never a stack trace."""


class DeeplightError(Exception):
    """A user-facing error (bad input, bad setting). The CLI prints its message and exits with status 2."""
