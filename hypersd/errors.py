"""The one exception type the command line turns into a clear message and exit code 2, and
the one-line warning (input used but not whole, such as a prompt cut to the encoder's window;
a damaged checkpoint passed over for the previous one), and the one-line note (a choice
made for the user)."""

import sys


class UserError(Exception):
    """Bad input from the user: the message names the problem and what to do about it."""


def warn(message: str) -> None:
    """One line on stderr: something was used, or passed over, not quite as given."""
    print(f"hypersd: warning: {message}", file=sys.stderr)


def note(message: str) -> None:
    """One line on stderr: a choice made for the user (such as the recipe a LoRA was made for)."""
    print(f"hypersd: {message}", file=sys.stderr)
