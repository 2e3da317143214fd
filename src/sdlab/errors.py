"""The one exception type users see.

Anything raised as `SdlabError` is a problem with the user's input (a file, a
name, a parameter) and its message is one line that says what is wrong and what
to do. The CLI prints it without a traceback and exits non-zero.
"""


class SdlabError(Exception):
    """A user-facing error with a one-line message."""


class MissingDependency(SdlabError):
    """An optional package a feature needs is not installed (see `sdlab.optional.require`).

    The CLI exits with 2, as for a usage error: the command cannot run as installed, and
    the message names the command that installs what it needs.
    """


class UsageError(SdlabError):
    """The command cannot run as asked (`sdlab serve` on a port already in use, ...): the CLI
    exits with 2, as for a usage error argparse finds."""
