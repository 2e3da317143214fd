"""The one exception type users see.

Anything raised as `SdlabError` is a problem with the user's input (a file, a
name, a parameter) and its message is one line that says what is wrong and what
to do. The CLI prints it without a traceback and exits non-zero.
"""


class SdlabError(Exception):
    """A user-facing error with a one-line message."""
