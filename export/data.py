"""Training data discovery, patient parsing and patient-disjoint splits.

Images of one patient are near-duplicates, so every split here is grouped by patient: an
image-level split inflates accuracy and is never offered.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smearscan.names import is_image_path
from smearscan.preprocess import (
    ImageDecodeError,
    Recipe,
    load_and_preprocess,
    preprocess,
    read_image,
    stored_uint8,
)

log = logging.getLogger(__name__)

CNMC_PATIENT = re.compile(r"^UID_(H?\d+)_", re.IGNORECASE)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    patient: str


def patient_of(path: Path, root: Path) -> str:
    """C-NMC names carry the patient (``UID_<patient>_...``); otherwise the folder above the
    label folder is the slide/patient."""
    match = CNMC_PATIENT.match(path.name)
    if match:
        return match.group(1)
    slide = path.parent.parent
    try:
        rel = slide.relative_to(root)
    except ValueError:
        rel = slide
    return str(rel) if str(rel) != "." else path.parent.parent.name or "root"


def discover_dataset(root: str | Path) -> list[Sample]:
    """Every image under ``root``; the folder that directly holds an image is its label."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"training data folder not found: {root}")
    samples = [
        Sample(path, path.parent.name, patient_of(path, root))
        for path in sorted(root.rglob("*"))
        if path.is_file() and is_image_path(path)
    ]
    labels = sorted({s.label for s in samples})
    if len(labels) < 2:
        raise ValueError(
            f"need at least two classes (label folders) under {root}, found {labels or 'none'}"
        )
    return samples


def patient_labels(samples: list[Sample]) -> dict[str, str]:
    """Majority label per patient (in C-NMC every patient has one label)."""
    per_patient: dict[str, Counter] = {}
    for sample in samples:
        per_patient.setdefault(sample.patient, Counter())[sample.label] += 1
    return {p: c.most_common(1)[0][0] for p, c in per_patient.items()}


def grouped_folds(samples: list[Sample], n_folds: int, seed: int) -> list[set[str]]:
    """Partition patients into ``n_folds`` folds, stratified by the patient's label.

    Patients of each class are shuffled with the seed and dealt round-robin, largest first
    within a shuffled order, so each fold gets a similar share of each class.
    """
    labels = patient_labels(samples)
    counts = Counter(s.patient for s in samples)
    rng = np.random.default_rng(seed)
    folds: list[set[str]] = [set() for _ in range(n_folds)]
    fold_images = [0] * n_folds
    for label in sorted(set(labels.values())):
        patients = sorted(p for p, lab in labels.items() if lab == label)
        if len(patients) < n_folds:
            raise ValueError(
                f"class {label!r} has {len(patients)} patients: too few for {n_folds} "
                "patient-disjoint folds"
            )
        rng.shuffle(patients)
        # deal patients of this class one per fold, giving each next patient to the fold
        # with the fewest images of this class so far among those with the fewest patients
        class_images = [0] * n_folds
        class_patients = [0] * n_folds
        for patient in patients:
            fold = min(
                range(n_folds),
                key=lambda k: (class_patients[k], class_images[k], fold_images[k]),
            )
            folds[fold].add(patient)
            class_patients[fold] += 1
            class_images[fold] += counts[patient]
            fold_images[fold] += counts[patient]
    return folds


def folder_folds(samples: list[Sample], root: Path, n_folds: int) -> list[set[str]]:
    """The data folder's top-level folders as the folds, in name order.

    C-NMC's release folds (``fold_0/1/2``) are separate acquisition batches (fold 2's normal
    cells are larger), so holding one out is the closest thing in the training data to a
    lab's new batch; random donor folds mix the batches and cannot show that shift.
    """
    folder_of: dict[str, set[str]] = {}
    for sample in samples:
        top = sample.path.relative_to(root).parts[0]
        folder_of.setdefault(sample.patient, set()).add(top)
    spread = sorted(p for p, tops in folder_of.items() if len(tops) > 1)
    if spread:
        raise ValueError(
            f"patients in more than one top-level folder of {root} ({', '.join(spread[:5])}): "
            "a split by folder would put one patient on both sides"
        )
    tops = sorted({next(iter(t)) for t in folder_of.values()})
    if len(tops) != n_folds:
        raise ValueError(
            f"a split by folder needs --folds {len(tops)} (the top-level folders of {root}: "
            f"{', '.join(tops)}), not {n_folds}"
        )
    return [{p for p, t in folder_of.items() if top in t} for top in tops]


#: How patients are dealt into folds: ``donors`` (random, stratified by class) or
#: ``folders`` (the data folder's top-level folders; see ``folder_folds``).
SPLITS = ("donors", "folders")


def patient_folds(
    samples: list[Sample], n_folds: int, seed: int, split: str = "donors", root: Path | None = None
) -> list[set[str]]:
    """The patients of each fold under the chosen split."""
    if split == "folders":
        if root is None:
            raise ValueError("a split by folder needs the data folder")
        return folder_folds(samples, root, n_folds)
    if split != "donors":
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return grouped_folds(samples, n_folds, seed)


def split_by_patient(
    samples: list[Sample],
    n_folds: int = 4,
    fold: int = 0,
    seed: int = 0,
    split: str = "donors",
    root: Path | None = None,
) -> tuple[list[Sample], list[Sample]]:
    """(train, validation) with validation = patients of fold ``fold``; never shares a patient."""
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in [0, {n_folds})")
    val_patients = patient_folds(samples, n_folds, seed, split, root)[fold]
    train = [s for s in samples if s.patient not in val_patients]
    val = [s for s in samples if s.patient in val_patients]
    return train, val


def load_arrays(
    samples: list[Sample],
    recipe: Recipe,
    workers: int = 2,
    normalise: Callable[[str, np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Preprocess samples into a uint8 array (N, S, S, 3); returns it and the kept indices.
    With ``normalise`` (donor, decoded BGR crop -> crop), each crop passes through it first
    (per-slide colour normalisation).

    Unreadable images are skipped and counted in the log rather than stopping training.
    """

    def one(sample: Sample) -> np.ndarray | None:
        try:
            if normalise is None:
                image = load_and_preprocess(sample.path, recipe)
            else:
                decoded = normalise(sample.patient, read_image(sample.path, order="bgr"))
                image = preprocess(decoded, recipe, order="bgr")
        except ImageDecodeError as exc:
            log.warning("skipping %s: %s", sample.path, exc)
            return None
        return stored_uint8(image)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, samples))
    kept = [i for i, r in enumerate(results) if r is not None]
    skipped = len(samples) - len(kept)
    if skipped:
        log.warning("skipped %d unreadable image(s) of %d", skipped, len(samples))
    size = recipe.input_size
    if not kept:
        return np.zeros((0, size, size, 3), np.uint8), kept
    return np.stack([r for r in results if r is not None]), kept


def donor_sample(samples: list, per_donor: int, seed: int = 0) -> list:
    """Up to ``per_donor`` crops of each donor, the same ones on every run."""
    rng = np.random.default_rng(seed)
    by_donor: dict[str, list] = {}
    for sample in samples:
        by_donor.setdefault(sample.patient, []).append(sample)
    kept = []
    for donor in sorted(by_donor):
        members = by_donor[donor]
        if len(members) > per_donor:
            members = [
                members[i] for i in sorted(rng.choice(len(members), per_donor, replace=False))
            ]
        kept.extend(members)
    return kept
