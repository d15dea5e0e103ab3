"""Markdown table of training runs (the ablation table in docs/ablation.md).

python -m export.summarize_runs runs/abl_* [--baseline runs/abl_bbox_w125_bn]
"""

from __future__ import annotations

import argparse
import json
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args(argv)
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
