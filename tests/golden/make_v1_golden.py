# Kept for the record: it ran once, at commit cf6297f, to write the v1 files; run today it would write the current format.
"""Write format-v1 model files and their scores with the code as of cf6297f (before the detector contract)."""
import json, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, "tests")
from synthetic import texture
from patchcore import PatchCore, PatchCoreEnsemble, PatchCoreConfig


def main() -> None:
    out = Path("tests/golden")
    rng = np.random.default_rng(0)
    train = [texture(rng) for _ in range(6)]
    rng = np.random.default_rng(7)
    test = [texture(rng, defect=(i % 2 == 1)) for i in range(6)]
    small = dict(resize=64, crop=56, coreset_ratio=0.25, seed=0)
    cases = {
        "v1_default": dict(small),                                  # scoring paper + image_top_k 20 (the old default)
        "v1_paper_max": dict(small, image_top_k=1),                 # the paper's image score
        "v1_official_top20": dict(small, scoring="official"),       # old --scoring official (top-20 mean, squared L2)
        "v1_official_max": dict(small, scoring="official", image_top_k=1, threshold_fpr=0.25),
    }
    expected = {}
    for name, settings in cases.items():
        model = PatchCore(**settings).fit(train)
        model.save(out / f"{name}.safetensors")
        expected[name] = {"scores": model.score_samples(test).tolist(),
                          "map_sums": [float(m.sum()) for m in model.anomaly_maps(test)],
                          "threshold": model.threshold_}
    ens = PatchCoreEnsemble([PatchCoreConfig(**small), PatchCoreConfig(**small, backbone="efficientnet_lite1")], seed=0).fit(train)
    ens.save(out / "v1_ensemble.safetensors")
    expected["v1_ensemble"] = {"scores": ens.score_samples(test).tolist(),
                               "map_sums": [float(m.sum()) for m in ens.anomaly_maps(test)], "threshold": None}
    (out / "v1_expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(json.dumps(expected)[:500])


if __name__ == "__main__":
    main()
