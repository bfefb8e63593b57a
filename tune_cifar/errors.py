"""The one exception type that means "the user asked for something wrong".

Command-line entry points catch it (see :mod:`tune_cifar.cli`), print its message on one line
and exit with code 2; anything else is a bug and keeps its traceback.
"""


class UsageError(Exception):
    """Bad input: an unknown name, an out-of-range value, a missing or corrupt file."""
