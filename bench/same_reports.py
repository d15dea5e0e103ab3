"""Behaviour unchanged across a refactor: the same reports from two revisions of smearscan.

    python bench/same_reports.py --before REV [--after REV] [--images 2000] [--out FILE]

Each revision is checked out into a temporary git worktree (``--after`` defaults to the
working tree itself) and scans, in its own process with the same interpreter, the examples
and N real crops (written as BMP from ../shared/data/cnmc when present, else from
tests/fixtures), once with a CSV and once with a JSONL report. The reports must be equal
byte for byte; the summary JSON
must be equal once the fields that differ on every run by design are removed (start time,
seconds, rates, the per-stage profile, the model file's path and the revision's version).
The HTML page is built from the summary and rows and is not compared.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from throughput import write_crops  # noqa: E402

#: Summary fields that differ on every run, whatever the code: (path of keys).
PER_RUN = (
    ("started",),
    ("seconds",),
    ("files_per_second",),
    ("profile",),
    ("model", "path"),
    ("smearscan_version",),
)


def without_per_run_fields(summary: dict) -> dict:
    for path in PER_RUN:
        parent = summary
        for key in path[:-1]:
            parent = parent.get(key, {})
        parent.pop(path[-1], None)
    return summary


def scan(checkout: Path, inputs: Path, out: Path) -> None:
    command = [sys.executable, "-m", "smearscan", "scan", str(inputs), "--out", str(out)]
    done = subprocess.run(
        [*command, "--no-html", "-q"],
        cwd=checkout,
        env={"PYTHONPATH": str(checkout), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    if done.returncode not in (0, 3):  # 3: some files unusable, reported as rows
        raise SystemExit(f"scan in {checkout} failed ({done.returncode}): {done.stderr[-2000:]}")


def compare(before: Path, after: Path) -> dict:
    """Reports of one format, before and after: the report byte for byte, the summary
    without its per-run fields."""
    summaries = [
        without_per_run_fields(json.loads(p.with_name(p.stem + ".summary.json").read_text()))
        for p in (before, after)
    ]
    return {
        "report": before.read_bytes() == after.read_bytes(),
        "summary": summaries[0] == summaries[1],
        "files": summaries[1]["overall"]["files"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision before the change")
    parser.add_argument("--after", help="git revision after it [default: the working tree]")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--out", type=Path, help="write the comparison here as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="smearscan-same-") as temp:
        work = Path(temp)
        checkouts = {}
        for name, revision in (("before", args.before), ("after", args.after)):
            if revision is None:
                checkouts[name] = ROOT
                continue
            checkouts[name] = work / name
            subprocess.run(
                ["git", "worktree", "add", "--detach", str(work / name), revision],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
        try:
            crops = write_crops(work / "crops", args.images)
            results = {}
            for label, inputs in (("examples", ROOT / "examples" / "slides"), ("crops", crops)):
                for report in ("csv", "jsonl"):
                    outs = {}
                    for name, checkout in checkouts.items():
                        outs[name] = work / "reports" / name / label / report / f"r.{report}"
                        outs[name].parent.mkdir(parents=True)
                        scan(checkout, inputs, outs[name])
                    results[f"{label} {report}"] = compare(outs["before"], outs["after"])
        finally:
            for name in ("before", "after"):
                if checkouts.get(name, ROOT) != ROOT:
                    subprocess.run(
                        ["git", "worktree", "remove", "--force", str(checkouts[name])],
                        cwd=ROOT,
                        capture_output=True,
                    )
    record = {"before": args.before, "after": args.after or "working tree", **results}
    print(json.dumps(record, indent=2))
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    same = all(r["report"] and r["summary"] for r in results.values())
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
