"""The one exception type a user ever sees: a one-line message, exit code 2."""


class UserError(Exception):
    """Bad input: config, data, adapter files or CLI arguments. The message names the fix."""
