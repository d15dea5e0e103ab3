"""The embedding distance on donors the network never saw (a script, not a test).

    python bench/qc_embedding.py [--run export/default_model] [--per-donor 10] [--out FILE]

For each fold model of a cross-validation run: the whitening and the limits are fitted on
the crops of the donors it trained on, exactly as ``export.to_onnx`` fits them for a
shipped file (``export.embedding``, ``smearscan.qc.fit_embedding``), and applied to the
donors it never saw: every crop as it is (false refusals, target <= 0.5 %), and a few crops
per donor under the shift suite's validated shifts (target <= 1 %) and under inputs the
model cannot judge (what it catches). The shifts are bench/qc_scale.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from qc_scale import shifted  # noqa: E402

from export.data import discover_dataset, load_arrays  # noqa: E402
from export.embedding import Whitening, embeddings_of  # noqa: E402
from export.parents import cv_folds  # noqa: E402
from export.to_onnx import load_keras, read_recipe  # noqa: E402
from smearscan.preprocess import (  # noqa: E402
    framed_and_resized,
    gray_of,
    model_pixels,
    read_image,
    unit_range,
)
from smearscan.qc import fit_embedding  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "cnmc"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "export" / "default_model")
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--per-donor", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    samples = discover_dataset(args.data)
    result: dict = {"run": str(args.run), "folds": [], "shifts": {}}
    refused = {"default": 0, "strict": 0}
    unseen = 0
    per_donor: dict[str, float] = {}
    shift_counts: dict[str, list[int]] = {}
    started = time.time()
    for fold_dir in cv_folds(args.run):
        config = json.loads((fold_dir / "config.json").read_text())
        recipe = read_recipe(config)
        held_out = set(config["split"]["val_patients"])
        model = load_keras(fold_dir / "model.keras")
        x, kept = load_arrays(samples, recipe)
        kept_samples = [samples[i] for i in kept]
        seen = np.array([s.patient not in held_out for s in kept_samples])
        embeddings = embeddings_of([model], unit_range(x))
        del x
        whitening = Whitening.fit(embeddings[seen])
        limits = fit_embedding(whitening.distances(embeddings[seen]), whitening.method)["limits"]
        distances = whitening.distances(embeddings[~seen])
        donors = np.array([s.patient for s in kept_samples])[~seen]
        fold = {
            "fold": fold_dir.name,
            "unseen_donors": len(held_out),
            "unseen_crops": int(len(distances)),
            "limits": limits,
        }
        for mode, limit in limits.items():
            count = int((distances > limit).sum())
            fold[f"refused_{mode}"] = count
            refused[mode] += count
        for donor in sorted(set(donors)):
            per_donor[donor] = round(
                float((distances[donors == donor] > limits["default"]).mean()), 4
            )
        unseen += len(distances)
        result["folds"].append(fold)
        # a few crops of each unseen donor, shifted
        taken: dict[str, int] = {}
        picks = []
        for sample in kept_samples:
            if sample.patient in held_out and taken.get(sample.patient, 0) < args.per_donor:
                taken[sample.patient] = taken.get(sample.patient, 0) + 1
                picks.append(sample)
        inputs: dict[str, list[np.ndarray]] = {}
        for index, sample in enumerate(picks):
            original = read_image(str(sample.path), order="bgr")
            for name, shift in shifted(index).items():
                image = shift(original)
                gray = gray_of(image, "bgr")
                resized = framed_and_resized(image, recipe, "bgr", gray)
                inputs.setdefault(name, []).append(model_pixels(resized, recipe))
        for name, images in inputs.items():
            shifted_distances = whitening.distances(
                embeddings_of([model], unit_range(np.stack(images)))
            )
            counts = shift_counts.setdefault(name, [0, 0, 0])
            counts[0] += int((shifted_distances > limits["default"]).sum())
            counts[1] += int((shifted_distances > limits["strict"]).sum())
            counts[2] += len(images)
        print(f"{fold_dir.name}: {fold} ({time.time() - started:.0f} s)", flush=True)
    result["unseen_crops"] = unseen
    for mode, count in refused.items():
        result[f"false_refusals_{mode}"] = {"crops": count, "rate": round(count / unseen, 5)}
    result["worst_donor_default"] = max(per_donor.items(), key=lambda item: item[1])
    result["per_donor_refused_default"] = per_donor
    for name, (default, strict, total) in shift_counts.items():
        result["shifts"][name] = {
            "crops": total,
            "refused_default": round(default / total, 4),
            "refused_strict": round(strict / total, 4),
        }
        print(f"{name}: default {default / total:.1%}, strict {strict / total:.1%} of {total}")
    print(json.dumps({k: v for k, v in result.items() if k.startswith("false")}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
