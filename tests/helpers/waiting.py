"""Waiting in tests: poll a condition until it holds."""

from __future__ import annotations

import time


def wait_for(predicate, timeout: float = 30.0, step: float = 0.1, what="condition"):
    """``predicate()``'s first truthy value, polled every ``step`` s.

    The predicate runs at least once, and once more when ``timeout`` s have passed; then an
    AssertionError names ``what`` — a string, or a callable that gives one at that moment (a
    log tail that is only worth reading on failure). A predicate may itself raise (a child
    process that died) to stop the wait early."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {said}")
        time.sleep(step)
