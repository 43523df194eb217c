"""The runner every command line of the package exits through: ``run(job)`` calls ``job()`` and exits with its
status.

``adapters.cli`` (the ``bnfold`` console script), ``python -m adapters.torch`` and ``python -m adapters.onnx`` all
end in ``run``; it lives here, in a module that imports none of them, so that none of the three imports another
only to exit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn


def run(job: Callable[[], int]) -> NoReturn:
    """Exit with ``job()``'s status; a reader of stdout that goes away early (``| head``) ends the program
    quietly instead of with a traceback, as Python's documentation recommends."""
    try:
        status = job()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        status = 1
    sys.exit(status)
