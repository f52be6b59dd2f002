"""What several test files share beyond the synthetic images: running the command line as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(*args: object, timeout: float = 300, cwd: object = None) -> subprocess.CompletedProcess:
    """``patchcore ARGS...`` in a fresh interpreter (this venv's), output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "patchcore.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def snapshot(root: Path) -> dict[str, object]:
    """Every file (its bytes), link (its target), folder and special file under ``root``: what must not change."""
    state: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            state[str(path)] = "-> " + os.readlink(path)
        elif path.is_file():
            state[str(path)] = path.read_bytes()
        elif path.is_dir():
            state[str(path)] = "dir"
        else:
            state[str(path)] = "special"
    return state
