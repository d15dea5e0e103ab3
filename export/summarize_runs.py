"""Markdown tables of training runs: the ablation table in docs/ablation.md, or, with
``--cv``, the grouped cross-validation of one configuration over its patient folds.

python -m export.summarize_runs runs/abl_*
python -m export.summarize_runs --cv export/default_run runs/cv_fold1 runs/cv_fold2 ...
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path


def describe(config: dict) -> str:
    args, recipe = config["args"], config["recipe"]
    parts = [f"crop {recipe['crop']}", f"width {args['width']}"]
    parts.append("BN" if args.get("batch_norm") else "no BN")
    if recipe.get("log_enhance"):
        parts.append("LoG")
    parts.append(f"aug {args['augment']}")
    return ", ".join(parts)


CV_COLUMNS = ("val_weighted_f1", "val_roc_auc", "val_sensitivity", "val_specificity")


def cv_table(runs: list[Path]) -> str:
    """Per fold: the last epoch (no choice made on the validation patients: the honest
    estimate) and the best epoch by validation weighted F1 (optimistic); then mean and
    standard deviation over the folds."""
    lines = [
        "| run | fold | validation patients (images) | last epoch: weighted F1 | ROC AUC | "
        "sensitivity | specificity | best epoch | its weighted F1 | its ROC AUC |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    last_rows, best_rows = [], []
    for run in runs:
        config = json.loads((run / "config.json").read_text())
        with open(run / "history.csv", newline="") as handle:
            history = list(csv.DictReader(handle))
        last = [float(history[-1][c]) for c in CV_COLUMNS]
        best_epoch = max(history, key=lambda row: float(row["val_weighted_f1"]))
        best = [float(best_epoch[c]) for c in CV_COLUMNS]
        last_rows.append(last)
        best_rows.append(best)
        split = config["split"]
        lines.append(
            f"| `{run.name}` | {config['args']['fold']} | {len(split['val_patients'])} "
            f"({split['val_images']}) | {last[0]:.4f} | {last[1]:.4f} | {last[2]:.4f} | "
            f"{last[3]:.4f} | {best_epoch['epoch']}/{len(history)} | {best[0]:.4f} | "
            f"{best[1]:.4f} |"
        )
    if len(runs) > 1:
        for name in ("mean", "sd"):
            pick = statistics.mean if name == "mean" else statistics.stdev
            last = [pick(col) for col in zip(*last_rows, strict=True)]
            best = [pick(col) for col in zip(*best_rows, strict=True)]
            lines.append(
                f"| **{name}** | | | {last[0]:.4f} | {last[1]:.4f} | {last[2]:.4f} | "
                f"{last[3]:.4f} | | {best[0]:.4f} | {best[1]:.4f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument(
        "--cv", action="store_true", help="the runs are folds of one configuration: mean and sd"
    )
    args = parser.parse_args(argv)
    if args.cv:
        print(cv_table(args.runs))
        return 0
    print("| run | configuration | best epoch | weighted F1 | ROC AUC | sensitivity | "
          "specificity | accuracy | minutes |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        if not (run / "metrics.json").exists():
            continue
        config = json.loads((run / "config.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        v = metrics["validation"]
        print(
            f"| `{run.name}` | {describe(config)} | {metrics['best_epoch']}/"
            f"{config['args']['epochs']} | {v['weighted_f1']:.4f} | {v['roc_auc']:.4f} | "
            f"{v['sensitivity']:.4f} | {v['specificity']:.4f} | {v['accuracy']:.4f} | "
            f"{metrics['train_seconds'] / 60:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
