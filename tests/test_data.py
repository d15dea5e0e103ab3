from pathlib import Path

import numpy as np
import pytest
from conftest import CNMC

from export.data import (
    Sample,
    discover_dataset,
    grouped_folds,
    load_arrays,
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
                samples.append(Sample(Path(f"{label}/UID_{prefix}{p}_{i}_1.bmp"), label,
                                      f"{prefix}{p}"))  # fmt: skip
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
