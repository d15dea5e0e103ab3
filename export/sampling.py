"""Which crops each training epoch draws (both trainers, the TF and the JAX one)."""

from __future__ import annotations

import numpy as np

from export.config import Sampling
from export.size_reading import area_matched_weights


def epoch_indices(
    patients: np.ndarray,
    y: np.ndarray,
    sampling: Sampling,
    rng: np.random.Generator,
    areas: np.ndarray | None = None,
) -> np.ndarray:
    """Indices for one training epoch.

    ``donors``: every class gets the same number of draws and each of its donors the same
    share of them, drawn with replacement where a donor has fewer crops, so a donor with
    20 crops weighs as much as one with 400 and the classes are even. ``donors-area``: the
    same number of draws per class, each crop drawn with its ``area_matched_weights``
    (``areas``: each crop's cell area), so that every donor still weighs the same before
    the area weight and size no longer tells the class. Otherwise up to ``per_patient``
    crops per patient without replacement, then ``oversample`` evens the classes if asked.
    """
    indices = np.arange(len(y))
    classes = sorted(set(y.tolist()))
    if sampling.needs_areas:
        if areas is None or len(areas) != len(y):
            raise ValueError(f"--balance {sampling.balance} needs every crop's cell area")
        weights = area_matched_weights(patients, y, areas)
        per_class = _draws_per_class(patients, y, sampling)
        chosen = [
            rng.choice(
                indices[y == label],
                size=per_class,
                p=weights[y == label] / weights[y == label].sum(),
            )
            for label in classes
        ]
        return rng.permutation(np.concatenate(chosen))
    if sampling.balance == "donors":
        donors = sorted(set(zip(patients.tolist(), y.tolist(), strict=True)))
        per_class = _draws_per_class(patients, y, sampling)
        chosen = []
        for label in classes:
            members_of_class = [p for p, c in donors if c == label]
            per_donor = max(1, int(np.ceil(per_class / len(members_of_class))))
            for patient in members_of_class:
                members = indices[(patients == patient) & (y == label)]
                replace = len(members) < per_donor
                chosen.append(rng.choice(members, size=per_donor, replace=replace))
        return rng.permutation(np.concatenate(chosen))
    if sampling.per_patient:
        chosen = []
        for patient in np.unique(patients):
            members = indices[patients == patient]
            take = min(len(members), sampling.per_patient)
            chosen.append(rng.choice(members, size=take, replace=False))
        indices = np.concatenate(chosen)
    if sampling.balance == "oversample":
        present, counts = np.unique(y[indices], return_counts=True)
        target = counts.max()
        parts = [rng.choice(indices[y[indices] == c], size=target, replace=True) for c in present]
        indices = np.concatenate(parts)
    return rng.permutation(indices)


def _draws_per_class(patients: np.ndarray, y: np.ndarray, sampling: Sampling) -> int:
    """A class's draws in a balanced epoch: ``per_patient`` (0: the mean crops per donor)
    times the number of patients, shared evenly by the classes."""
    donors = set(zip(patients.tolist(), y.tolist(), strict=True))
    per_patient = sampling.per_patient or max(1, len(y) // max(len(donors), 1))
    return per_patient * len(set(patients.tolist())) // len(set(y.tolist()))
