"""The one exception type for mistakes a user can fix.

Everything gdw raises because of bad input (a wrong label, a missing file, an
invalid hyper-parameter, an unknown name) is a :class:`UserError`. It is a
``ValueError``, so library users can catch it as one; the command line turns
it into a one-line message and exit code 2, with no traceback.
"""


class UserError(ValueError):
    """Bad input that the user can fix; the message says what is wrong."""


def one_line(e: BaseException, limit: int = 200) -> str:
    """``Type: message`` of an exception on one line, at most ``limit`` characters
    (a wrapped error's text inside a UserError)."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
