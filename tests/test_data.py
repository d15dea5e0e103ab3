from pathlib import Path

import numpy as np
import pytest
from conftest import CNMC

from export.data import (
    Sample,
    discover_dataset,
    grouped_folds,
    load_arrays,
    patient_folds,
    patient_of,
    split_by_patient,
)
from smearscan.preprocess import Recipe


def synthetic_samples(n_all: int = 32, n_hem: int = 16) -> list[Sample]:
    rng = np.random.default_rng(1)
    samples = []
    for label, count, prefix in (("all", n_all, ""), ("hem", n_hem, "H")):
        for p in range(count):
            for i in range(int(rng.integers(5, 60))):
                samples.append(
                    Sample(Path(f"{label}/UID_{prefix}{p}_{i}_1.bmp"), label, f"{prefix}{p}")
                )
    return samples


def test_patient_parsing():
    root = Path("/data")
    assert patient_of(Path("/data/fold_0/all/UID_11_10_1_all.bmp"), root) == "11"
    assert patient_of(Path("/data/fold_0/hem/UID_H24_1_2_hem.bmp"), root) == "H24"
    assert patient_of(Path("/data/slide7/blast/cell1.png"), root) == "slide7"


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n_folds", [3, 4, 5])
def test_folds_never_share_a_patient_and_cover_every_class(seed, n_folds):
    samples = synthetic_samples()
    folds = grouped_folds(samples, n_folds, seed)
    everyone = {s.patient for s in samples}
    assert set().union(*folds) == everyone
    assert sum(len(f) for f in folds) == len(everyone)
    for fold in range(n_folds):
        train, val = split_by_patient(samples, n_folds, fold, seed)
        assert not {s.patient for s in train} & {s.patient for s in val}
        assert {s.label for s in val} == {"all", "hem"}
        assert len(train) + len(val) == len(samples)


def test_split_is_deterministic_for_a_seed():
    samples = synthetic_samples()
    assert grouped_folds(samples, 4, 7) == grouped_folds(samples, 4, 7)
    assert grouped_folds(samples, 4, 7) != grouped_folds(samples, 4, 8)


def test_too_few_patients_is_a_clear_error():
    with pytest.raises(ValueError, match="too few"):
        grouped_folds(synthetic_samples(n_hem=2), 3, 0)


def release_layout(root: Path, patients: dict[str, list[tuple[str, str]]]) -> list[Sample]:
    """C-NMC's release layout: ``fold_K/<label>/UID_<patient>_...``, as files on disk."""
    for folder, members in patients.items():
        for patient, label in members:
            target = root / folder / label / f"UID_{patient}_1_1_{label}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"")
    return [
        Sample(path, path.parent.name, patient_of(path, root))
        for path in sorted(root.rglob("*.png"))
    ]


def test_a_split_by_folder_holds_out_each_top_level_folder(tmp_path):
    samples = release_layout(
        tmp_path,
        {
            "fold_0": [("1", "all"), ("2", "all"), ("H1", "hem")],
            "fold_1": [("3", "all"), ("H2", "hem")],
            "fold_2": [("4", "all"), ("H3", "hem"), ("H4", "hem")],
        },
    )
    folds = patient_folds(samples, 3, seed=0, split="folders", root=tmp_path)
    assert folds == [{"1", "2", "H1"}, {"3", "H2"}, {"4", "H3", "H4"}]
    train, val = split_by_patient(samples, 3, 2, 0, "folders", tmp_path)
    assert {s.patient for s in val} == {"4", "H3", "H4"}
    assert {s.patient for s in train} == {"1", "2", "H1", "3", "H2"}
    # the seed does not move a split by folder; it moves the random donor split
    assert patient_folds(samples, 3, seed=5, split="folders", root=tmp_path) == folds


def test_a_split_by_folder_refuses_a_wrong_fold_count_and_a_patient_in_two_folders(tmp_path):
    samples = release_layout(
        tmp_path, {"fold_0": [("1", "all"), ("H1", "hem")], "fold_1": [("2", "all")]}
    )
    with pytest.raises(ValueError, match="needs --folds 2"):
        patient_folds(samples, 4, 0, "folders", tmp_path)
    leaked = release_layout(tmp_path, {"fold_1": [("1", "all")]})
    with pytest.raises(ValueError, match="more than one top-level folder"):
        patient_folds(leaked, 2, 0, "folders", tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        patient_folds(samples, 2, 0, "images", tmp_path)


def test_discover_fixture_dataset():
    samples = discover_dataset(CNMC)
    assert len(samples) == 24
    assert {s.label for s in samples} == {"all", "hem"}
    assert {s.patient for s in samples} == {"1", "3", "19", "H6", "H7", "H8"}


def test_one_class_is_an_error(tmp_path):
    (tmp_path / "all").mkdir()
    (tmp_path / "all" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="two classes"):
        discover_dataset(tmp_path)


def test_unreadable_images_are_skipped(cnmc_copy):
    (cnmc_copy / "all" / "UID_1_99_1_all.png").write_bytes(b"broken")
    samples = discover_dataset(cnmc_copy)
    x, kept = load_arrays(samples, Recipe())
    assert len(samples) == 25 and len(kept) == 24 and x.shape == (24, 128, 128, 3)
    assert x.dtype == np.uint8
