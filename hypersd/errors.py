"""The one exception type the command line turns into a clear message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and what to do about it."""
