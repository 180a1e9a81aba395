"""Shared job plumbing: turn any expected failure into one clear line on stderr and exit status 1/2."""
from __future__ import annotations

import sys
from typing import Callable

from pipeline.io.fileio import UnsafePathError
from pipeline.io.images import BadImageError


def root_cause(error: BaseException) -> BaseException:
    """The user-facing exception inside Ray's wrappers (RayTaskError, WorkerGroupError, ...)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "cause", None) or error.__cause__
        if isinstance(inner, BaseException):
            error = inner
            continue
        errors = getattr(error, "worker_failures", None)
        if isinstance(errors, dict) and errors:
            error = next(iter(errors.values()))
            continue
        break
    return error


def run_job(work: Callable[[], None]) -> int:
    """Run a job body; bad input and known failures print `error: <one line>` instead of a traceback."""
    expected = (BadImageError, UnsafePathError, FileNotFoundError, ValueError, RuntimeError, OSError)
    try:
        work()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - unwrapped below, re-raised when not expected
        cause = root_cause(error)
        if not isinstance(cause, expected):
            raise
        message = str(cause).strip().splitlines()
        print(f"error: {message[-1] if message and 'Traceback' in message[0] else (message or [''])[0]}",
              file=sys.stderr)
        return 1
    return 0
