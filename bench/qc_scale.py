"""How many real crops quality control refuses at other magnifications (a script, not a test).

    python bench/qc_scale.py [--per-donor 10] [--model PATH] [--out FILE]

Every donor's first crops of ../shared/data/cnmc are rescaled around the frame centre as
another microscope magnification would show them (the shift suite's ``rescale``), then
measured and checked by the model's default QC limits. The shift suite validates the model's
labels at 0.8x and 1.25x (at least 90 % unchanged), so QC should refuse few crops there.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.augment import rescale  # noqa: E402
from smearscan.inference import load_classifier  # noqa: E402
from smearscan.modelfile import KEY_QC  # noqa: E402
from smearscan.preprocess import framed_and_resized, gray_of, read_image  # noqa: E402
from smearscan.qc import QualityControl, measure  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "cnmc"
SCALES = (0.8, 1.0, 1.25, 1.4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-donor", type=int, default=10)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    info = load_classifier(args.model, device="cpu").info
    qc = QualityControl.from_metadata(info.metadata.get(KEY_QC), "default")
    assert qc is not None, "the model has no QC limits"
    with open(SHARED / "manifest.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: r["path"])
    taken: Counter[str] = Counter()
    paths = []
    for row in rows:
        if taken[row["patient"]] < args.per_donor:
            taken[row["patient"]] += 1
            paths.append(SHARED / row["path"])
    result: dict = {"crops": len(paths), "donors": len(taken), "scales": {}}
    for scale in SCALES:
        reasons: Counter[str] = Counter()
        refused = 0
        for path in paths:
            image = rescale(read_image(str(path), order="bgr"), scale)
            gray = gray_of(image, "bgr")
            resized = framed_and_resized(image, info.recipe, "bgr", gray)
            found = qc.reasons(measure(gray, resized, info.recipe.background_threshold))
            refused += bool(found)
            reasons.update(reason.split(" (")[0] for reason in found)
        result["scales"][f"{scale:g}x"] = {
            "refused": refused,
            "rate": round(refused / len(paths), 4),
            "reasons": dict(reasons.most_common()),
        }
        print(
            f"{scale:g}x: {refused} of {len(paths)} refused ({refused / len(paths):.1%})",
            dict(reasons.most_common(3)),
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
