"""(Re)create the peers' virtual environments outside the repo, from the package registries.

Each peer gets its own venv under the peers dir (default ~/.cache/patchcore-bench/NAME) with the same
torch and torchvision as ours, so framework versions never explain a difference. A venv counts as
ready only once its marker file records the exact package list it was built with.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DEFAULT_PEERS_DIR = Path.home() / ".cache" / "patchcore-bench"

# What each peer's runner imports, and nothing more. anomalib's own dependencies (lightning, kornia,
# ...) come with it: its PatchcoreModel module imports the whole anomalib.models package.
PEER_PACKAGES = {
    "anomalib": ["anomalib==2.7.0"],
    # The official code is not installed (its requirements pin nothing and pull pretrainedmodels);
    # its src/ goes on sys.path and these cover what src/patchcore/{patchcore,common,sampler}.py import.
    "official": ["timm", "faiss-cpu", "scipy", "tqdm"],
}


def torch_pins() -> list[str]:
    """Our own torch/torchvision versions, pinned for the peers."""
    import torch
    import torchvision

    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}"]


def env_python(peers_dir: Path, name: str) -> Path:
    return Path(peers_dir) / name / "bin" / "python"


def ensure_env(peers_dir: Path, name: str, log, allow_setup: bool = True) -> Path:
    """Python of peer ``name``'s venv, creating or completing it first when needed."""
    venv = Path(peers_dir) / name
    python = env_python(peers_dir, name)
    packages = torch_pins() + PEER_PACKAGES[name]
    marker = venv / ".bench-ready"
    wanted = "\n".join(packages)
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    if not allow_setup:
        raise RuntimeError(f"{name} environment missing or incomplete at {venv} (run without --no-setup)")
    log(f"setting up {name} environment in {venv} (a few minutes) ...")
    venv.parent.mkdir(parents=True, exist_ok=True)
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(venv)], log)
    # torch first and alone: the peer packages then see it satisfied and do not pull another build.
    _run([str(python), "-m", "pip", "install", "--quiet", *packages[:2]], log)
    _run([str(python), "-m", "pip", "install", "--quiet", *packages], log)
    marker.write_text(wanted)
    return python


def _run(cmd: list[str], log) -> None:
    log("  $ " + " ".join(cmd))
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"command failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
