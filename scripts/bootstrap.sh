#!/usr/bin/env bash
# Create .venv (once) and install the package with its test and serve extras. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# torch and torchvision pinned to the CPU-capable builds this project is tested with.
.venv/bin/pip install --quiet --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test,serve,ray]"
