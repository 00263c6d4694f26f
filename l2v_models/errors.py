"""The command line's error for a problem with the user's input.

Every `l2v` command raises `UsageError` for input a user can fix (a missing file, a bad line, a
bad option value); the dispatcher (l2v_models.cli) prints it as one `l2v: error: ...` line and
exits with code 2.
"""


class UsageError(Exception):
    """A problem with the user's input: reported in one line, exit code 2."""
