"""What several test files share beyond the synthetic images: running the command line as a user would."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: object, timeout: float = 300, cwd: object = None) -> subprocess.CompletedProcess:
    """``patchcore ARGS...`` in a fresh interpreter (this venv's), output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "patchcore.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )
