"""The kit's one user-facing exception.

Anything a user can cause (a missing file, a malformed dataset, an unknown model name, a negative epsilon, a pickle that
would run code) raises :class:`UserError` with a one-line message that names the culprit. The CLI turns it into
``Error: <message>`` on stderr and exit status 2. Bugs are not ``UserError`` and keep their traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit status 2 by the CLI."""

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line message from a wrapped exception is folded.
        super().__init__(" ".join(str(message).split()))
