"""The one exception type a user's mistake turns into."""


class UserError(Exception):
    """A problem the user can fix: the CLI prints its message as one sentence and exits non-zero.

    Raise it with a complete sentence that says what is wrong and, when it helps, what to do.
    """

    exit_code = 2
