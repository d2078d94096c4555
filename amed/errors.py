"""One exception type for everything a user can fix: bad input, missing files, full disks.

The CLI prints its message as one sentence (no traceback); library callers can catch it.
"""


class AmedError(Exception):
    """A problem with the user's input or environment, with a message saying what to do."""
