"""The one exception type that means "the user asked for something wrong".

Command-line entry points catch it (see :mod:`tune_cifar.cli`), print its message on one line
and exit with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class UsageError(Exception):
    """Bad input: an unknown name, an out-of-range value, a missing or corrupt file."""


def os_reason(error: OSError) -> str:
    """What went wrong, in the OS's words (``No space left on device``); an OSError without an
    errno (pyarrow's, some of torch's) by the first line of its message."""
    return os.strerror(error.errno) if error.errno else str(error).splitlines()[0]
