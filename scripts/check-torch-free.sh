#!/usr/bin/env bash
# The torch-free install of the README ("Export and deploy"), checked end to end: a second venv with the
# package (no dependencies) plus numpy, pillow and onnxruntime scores an exported model, and its files
# match those of the full install.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check --no-deps .
"$work/venv/bin/pip" install --quiet --disable-pip-version-check numpy pillow onnxruntime
if "$work/venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "check-torch-free: torch is importable in the runtime venv" >&2
    exit 1
fi
.venv/bin/python -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from synthetic import make_mvtec; make_mvtec(Path(sys.argv[1]), n_train=6)" "$work/data"
.venv/bin/patchcore fit "$work/data" -o "$work/model.safetensors" --resize 64 --crop 56 --coreset-ratio 0.25 --threshold-fpr 0.2
.venv/bin/patchcore export "$work/model.safetensors" -o "$work/model.onnx"
"$work/venv/bin/patchcore" predict "$work/model.onnx" "$work/data/test" -o "$work/onnx" --maps --overlays
.venv/bin/patchcore predict "$work/model.safetensors" "$work/data/test" -o "$work/torch" --maps --overlays
.venv/bin/python - "$work/torch" "$work/onnx" <<'PY'
import csv, sys
from pathlib import Path
import numpy as np
torch_out, onnx_out = map(Path, sys.argv[1:])
files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
assert files(torch_out) == files(onnx_out), "the two installs wrote different files"
read = lambda root: list(csv.DictReader(open(root / "scores.csv", newline="")))
for want, have in zip(read(torch_out), read(onnx_out)):
    assert want["is_anomalous"] == have["is_anomalous"], (want, have)
    assert abs(float(want["score"]) - float(have["score"])) <= 1e-4 * abs(float(want["score"])), (want, have)
for npy in torch_out.rglob("*.npy"):
    want, have = np.load(npy), np.load(onnx_out / npy.relative_to(torch_out))
    assert np.abs(want - have).max() <= 1e-3 * want.max(), npy
print(f"check-torch-free: {len(read(onnx_out))} images scored without torch, same files and scores as with torch")
PY
