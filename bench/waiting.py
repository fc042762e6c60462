"""What the benchmarks share: waiting for a condition, and giving up with one line."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def wait(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.01) -> Any:
    """The first truthy result of ``predicate``; exit with one line after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(step)
    raise SystemExit(f"{Path(sys.argv[0]).stem}: timed out after {timeout}s waiting for {what}")
