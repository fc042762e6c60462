"""`make install` for the tests: from a copy of the source tree (so a concurrent run in the
checkout cannot share its build directory), into a staging DESTDIR."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PREFIX = "/opt/supervisor_mail"
# Build products and caches are not part of a source tree.
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                 ".pytest_cache", ".ruff_cache")


def copy_source(target: Path) -> Path:
    shutil.copytree(ROOT, target, ignore=IGNORED)
    return target


def make(source: Path, target: str, **variables: str) -> subprocess.CompletedProcess:
    """Run one make target of the copied source tree; fail the test with its output."""
    args = ["make", "--no-print-directory", "-C", str(source), target,
            *(f"{k}={v}" for k, v in variables.items())]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"make {target} failed:\n{proc.stdout[-3000:]}{proc.stderr}"
    return proc


def staged_prefix(stage: Path, prefix: Path) -> Path:
    """Where PREFIX lands inside the staging tree."""
    return Path(str(stage) + str(prefix))
