"""User-facing errors: one line that says what went wrong and where."""


class RagopsError(Exception):
    """An error caused by input or configuration, reported to the user as one line (no traceback)."""

    exit_code = 1


class UsageError(RagopsError):
    """A command line that names something that does not exist (an architecture): exit code 2, like
    the command line parser's own usage errors."""

    exit_code = 2


class ConfigError(RagopsError):
    """params.yaml is invalid: the message names the bad key."""


class DataError(RagopsError):
    """Input data is unusable: the message names the file (and line) and the problem."""


class ValidationFailed(RagopsError):
    """A Great Expectations gate failed: the message says which expectation failed on how many rows."""
