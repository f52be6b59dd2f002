"""benchmarks/accuracy.py on a tiny MVTec-layout set with real-looking defects: the masked path end to end."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import accuracy

from synthetic import SMALL, make_mvtec_realistic


def test_the_table_has_image_pixel_and_pro_figures_per_setting(tmp_path, capsys):
    data = make_mvtec_realistic(tmp_path / "parts")
    small = json.dumps({**SMALL, "coreset_ratio": 0.5})
    multi = json.dumps({**SMALL, "coreset_ratio": 0.5, "global_layers": ["blocks.2"]})
    out = tmp_path / "out"
    code = accuracy.main(
        ["--data", str(data), "--setting", f"small={small}", "--setting", f"multi={multi}", "--out", str(out)]
    )
    assert code == 0
    rows = json.loads((out / "accuracy.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["small", "multi"]
    for row in rows:
        assert 0 <= row["image_auroc"] <= 1 and 0 <= row["pixel_auroc"] <= 1 and 0 <= row["pro"] <= 1
        assert set(row["by_type"]) == {"cut-paste", "noise-blend", "scratch", "colour", "texture"}
    printed = capsys.readouterr().out
    assert "| parts | small |" in printed and "| parts | multi |" in printed
    assert (out / "accuracy.csv").read_text().splitlines()[0].startswith("data,setting,image_auroc")
