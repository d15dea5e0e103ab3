"""The decision policy: how probabilities become a cell label and a slide call.

Every path that decides (``scan``, ``evaluate``, the incremental state, the reports, the
export's cross-validation) calls this one module, so a threshold or a slide rule means the
same thing everywhere. Probabilities are stored; labels and calls are derived from them
with the policy of the run that writes the report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

CELL_RULES = ("argmax", "threshold")
SLIDE_RULES = ("mean", "fraction")
#: A slide with fewer usable cells than this gets the call "insufficient": a handful of
#: cells is too few to call a patient either way (C-NMC's smallest donor has 9 crops).
DEFAULT_MIN_CELLS = 10
#: Version of the rule as a model file stores it (``smearscan.decision``; see
#: docs/model-file.md). Files without a version are version 1, the same shape.
DECISION_VERSION = 1
INSUFFICIENT = "insufficient"
#: Below the cut-off. Not "negative": the model misses some ALL donors, so a slide it does
#: not flag is not ruled out, only not flagged for review (reports before 2026-12-04 said
#: "negative").
NEGATIVE = "not-flagged"
#: A slide some of whose files were not read (an interrupted run, files still being
#: written): no call until a run reads them.
INCOMPLETE = "incomplete"


def suspect_call(positive: str) -> str:
    """The call of a slide flagged for the positive class: ``<positive>-suspect``."""
    return f"{positive}-suspect"


def is_suspect(call: str) -> bool:
    return call.endswith("-suspect")


def call_is_right(call: str, truth: str, positive: str) -> bool:
    """Whether a slide call agrees with a donor's label: flagged if and only if positive
    (``not-flagged`` and ``insufficient`` both count as not flagged)."""
    return (call == suspect_call(positive)) == (truth == positive)


class PolicyError(ValueError):
    """A decision rule that cannot apply to this model (a usage error)."""


@dataclass(frozen=True)
class DecisionPolicy:
    """Labels, the cell rule and the slide rule of one run.

    Cell rule: with a ``threshold`` (two-class models with a positive class only), a cell is
    the positive class when P(positive) >= threshold, else the other class; without one,
    the most probable class. Slide rule (models with a positive class): the slide score is
    the mean P(positive) over its usable cells (``mean``) or the fraction of them labelled
    positive (``fraction``); the slide is ``<positive>-suspect`` when the score is >=
    ``slide_cutoff``, and ``insufficient`` when it has fewer than ``min_cells`` usable
    cells.
    """

    labels: tuple[str, ...]
    positive: str | None = None
    threshold: float | None = None
    slide_rule: str = "fraction"
    slide_cutoff: float = 0.5
    min_cells: int = DEFAULT_MIN_CELLS

    def __post_init__(self) -> None:
        if self.positive is not None and self.positive not in self.labels:
            raise PolicyError(f"positive class {self.positive!r} is not one of {self.labels}")
        if self.threshold is not None:
            if self.positive is None or len(self.labels) != 2:
                raise PolicyError(
                    "a threshold applies only to a two-class model with a positive class; "
                    f"this model has {len(self.labels)} classes "
                    f"({', '.join(self.labels)}) and decides by the most probable class"
                )
            if not (math.isfinite(self.threshold) and 0.0 <= self.threshold <= 1.0):
                raise PolicyError(f"threshold must be in [0, 1], not {self.threshold}")
        if self.slide_rule not in SLIDE_RULES:
            raise PolicyError(f"slide rule must be one of {SLIDE_RULES}, not {self.slide_rule!r}")
        if not (math.isfinite(self.slide_cutoff) and 0.0 <= self.slide_cutoff <= 1.0):
            raise PolicyError(f"slide cut-off must be in [0, 1], not {self.slide_cutoff}")
        if self.min_cells < 1:
            raise PolicyError("the minimum number of cells per slide must be at least 1")

    # ------------------------------------------------------------------ cells

    @property
    def positive_index(self) -> int | None:
        return None if self.positive is None else self.labels.index(self.positive)

    def label_indices(self, probabilities: np.ndarray) -> np.ndarray:
        """Class index per row of an (N, classes) probability array."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if self.threshold is not None:
            pos = self.labels.index(str(self.positive))
            return np.where(probabilities[:, pos] >= self.threshold, pos, 1 - pos)
        return probabilities.argmax(axis=1)

    def slide_tally(
        self, members: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray
    ) -> tuple[int, int, float]:
        """What :meth:`slide_score` and :meth:`slide_call` take, for the rows ``members``
        selects: usable cells, those labelled positive (``predicted``: class indices) and
        their summed P(positive). The scan's summary counts the same three, cell by cell
        (``SlideStats``); evaluation and cross-validation count them here."""
        pos = self.positive_index
        cells = int(members.sum())
        positives = int((predicted[members] == pos).sum())
        return cells, positives, float(probabilities[members, pos].sum())

    def cell_labels(self, probabilities: np.ndarray) -> list[str]:
        return [self.labels[i] for i in self.label_indices(probabilities)]

    def cell_label(self, probabilities: Sequence[float]) -> str:
        if self.threshold is not None:
            pos = self.labels.index(str(self.positive))
            return (
                self.labels[pos] if probabilities[pos] >= self.threshold else self.labels[1 - pos]
            )
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        return self.labels[best]

    # ------------------------------------------------------------------ slides

    def slide_score(self, cells: int, positives: int, positive_sum: float) -> float | None:
        """The slide score from its usable cells: how many, how many labelled positive, and
        the sum of their P(positive). None without a positive class or cells."""
        if self.positive is None or cells == 0:
            return None
        return positive_sum / cells if self.slide_rule == "mean" else positives / cells

    def slide_call(self, cells: int, positives: int, positive_sum: float) -> str | None:
        """``<positive>-suspect``, ``not-flagged`` or ``insufficient``; None without a positive
        class (multi-class models without one make no slide call)."""
        if self.positive is None:
            return None
        if cells < self.min_cells:
            return INSUFFICIENT
        score = self.slide_score(cells, positives, positive_sum)
        return self.suspect_call if score >= self.slide_cutoff else NEGATIVE  # type: ignore[operator]

    @property
    def suspect_call(self) -> str:
        return suspect_call(str(self.positive))

    # ------------------------------------------------------------------ text

    def cell_rule_text(self) -> str:
        if self.threshold is not None:
            other = self.labels[1 - self.labels.index(self.positive)]
            return (
                f"a cell is '{self.positive}' when P({self.positive}) >= {self.threshold:g}, "
                f"else '{other}'"
            )
        return "a cell gets its most probable class"

    def cell_rule_short(self) -> str:
        """The cell rule in a few characters, for a report column."""
        if self.threshold is not None:
            return f"P({self.positive}) >= {self.threshold:g}"
        return "most probable class"

    def slide_rule_text(self) -> str | None:
        if self.positive is None:
            return None
        score = (
            f"mean P({self.positive}) of its usable cells"
            if self.slide_rule == "mean"
            else f"fraction of its usable cells labelled '{self.positive}'"
        )
        return (
            f"a slide is '{self.suspect_call}' when the {score} is at least "
            f"{self.slide_cutoff:g}, and '{NEGATIVE}' below it (not flagged for review, which "
            f"does not rule leukaemia out); it is '{INSUFFICIENT}' when it has fewer than "
            f"{self.min_cells} usable cells"
        )

    # ------------------------------------------------------------------ metadata

    def to_metadata(self, **provenance: str) -> str:
        """The model file's ``smearscan.decision`` entry. The cell threshold is stored here
        and only here (the calibration holds the temperature). ``provenance`` (where the
        rule was fitted, the operating point) travels along for people to read."""
        cell: dict = (
            {"rule": "argmax"}
            if self.threshold is None
            else {"rule": "threshold", "threshold": round(self.threshold, 4)}
        )
        slide = {
            "rule": self.slide_rule,
            "cutoff": round(self.slide_cutoff, 4),
            "min_cells": self.min_cells,
        }
        return json.dumps({"version": DECISION_VERSION, "cell": cell, "slide": slide, **provenance})

    @classmethod
    def from_metadata(
        cls, labels: Sequence[str], positive: str | None, metadata: Mapping[str, str]
    ) -> DecisionPolicy:
        """The rule a model file states; files from before ``smearscan.decision`` existed
        give their calibration's threshold and the fraction rule at 0.5. A threshold applies
        only to a two-class model with a positive class; otherwise the most probable class."""
        from smearscan.modelfile import KEY_CALIBRATION, KEY_DECISION

        text = metadata.get(KEY_DECISION)
        if text:
            decision = json.loads(text)
            version = decision.get("version", 1)
            if version > DECISION_VERSION:
                raise PolicyError(
                    f"the decision rule is version {version}; this smearscan reads up to "
                    f"{DECISION_VERSION}: upgrade smearscan"
                )
            cell, slide = decision.get("cell", {}), decision.get("slide", {})
            threshold = cell.get("threshold") if cell.get("rule") == "threshold" else None
        else:  # legacy: the threshold in the calibration, the fraction rule
            threshold = json.loads(metadata.get(KEY_CALIBRATION) or "{}").get("threshold")
            slide = {"rule": "fraction", "cutoff": 0.5}
        if len(labels) != 2 or not positive:
            threshold = None
        return cls(
            labels=tuple(labels),
            positive=positive,
            threshold=None if threshold is None else float(threshold),
            slide_rule=slide.get("rule", "fraction"),
            slide_cutoff=float(slide.get("cutoff", 0.5)),
            min_cells=int(slide.get("min_cells", DEFAULT_MIN_CELLS)),
        )

    @classmethod
    def from_summary(cls, decision: Mapping) -> DecisionPolicy:
        """The rule of a run, from its summary's ``decision`` (:meth:`to_dict`); what a model
        without a positive class leaves empty takes the defaults (no slide calls anyway)."""
        return cls(
            labels=tuple(decision["labels"]),
            positive=decision["positive_class"],
            threshold=decision["threshold"],
            slide_rule=decision["slide_rule"] or cls.slide_rule,
            slide_cutoff=cls.slide_cutoff
            if decision["slide_cutoff"] is None
            else decision["slide_cutoff"],
            min_cells=decision["min_cells"] or cls.min_cells,
        )

    def to_dict(self) -> dict:
        return {
            "labels": list(self.labels),
            "positive_class": self.positive,
            "cell_rule": "threshold" if self.threshold is not None else "argmax",
            "threshold": self.threshold,
            "slide_rule": self.slide_rule if self.positive else None,
            "slide_cutoff": self.slide_cutoff if self.positive else None,
            "min_cells": self.min_cells if self.positive else None,
            "cell_rule_text": self.cell_rule_text(),
            "slide_rule_text": self.slide_rule_text(),
        }


def policy_for_model(
    labels: Sequence[str],
    positive: str | None,
    metadata: Mapping[str, str],
    *,
    threshold: float | None = None,
    slide_rule: str | None = None,
    slide_cutoff: float | None = None,
    min_cells: int | None = None,
) -> DecisionPolicy:
    """The model's own rule, with any of its numbers overridden by the caller (the command
    line). Raises :class:`PolicyError` for an override that cannot apply."""
    overrides: dict[str, Any] = {
        "threshold": threshold,
        "slide_rule": slide_rule,
        "slide_cutoff": slide_cutoff,
        "min_cells": min_cells,
    }
    return replace(
        DecisionPolicy.from_metadata(labels, positive, metadata),
        **{name: value for name, value in overrides.items() if value is not None},
    )
