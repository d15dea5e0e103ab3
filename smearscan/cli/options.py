"""Options shared by several commands, as decorators built once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

#: A setting a cron job may give through the environment is this prefix and its option's
#: name: ``--max-qc-rate`` is ``SMEARSCAN_MAX_QC_RATE``.
ENV_PREFIX = "SMEARSCAN_"


def setting_option(*decls: str, **attrs: Any) -> Callable:
    """A click option that may also come from ``SMEARSCAN_<NAME>``, shown in ``--help``.

    Opt-in per option, not click's ``auto_envvar_prefix``: that would let any option (an
    output path, the threshold) be changed silently by a stray variable in a cron job's
    environment, and would put the command's name into every variable
    (``SMEARSCAN_SCAN_WORKERS``), renaming the documented ones."""
    name = next(d for d in decls if d.startswith("--"))[2:].replace("-", "_").upper()
    return click.option(*decls, envvar=ENV_PREFIX + name, show_envvar=True, **attrs)


model_option = setting_option(
    "--model",
    "-m",
    type=click.Path(path_type=Path, dir_okay=False),
    help="ONNX model [default: the embedded model].",
)
device_option = setting_option(
    "--device",
    default="auto",
    show_default=True,
    help="auto, cpu, cuda or cuda:N.",
)
threshold_option = click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    help="Cut-off on P(positive class) for two-class models [default: the model's "
    "operating point]. A usage error for models without a positive class.",
)
slide_options = [
    click.option(
        "--slide-rule",
        type=click.Choice(["mean", "fraction"]),
        help="Slide score: mean P(positive) of its usable cells, or the fraction of them "
        "labelled positive [default: the model's rule].",
    ),
    click.option(
        "--slide-threshold",
        "slide_cutoff",
        type=click.FloatRange(0, 1),
        help="Cut-off on the slide score that flags a slide [default: the model's].",
    ),
    click.option(
        "--min-cells",
        type=click.IntRange(min=1),
        help="Fewer usable cells than this: the slide call is 'insufficient' [default: the "
        "model's; 'smearscan model info' shows it].",
    ),
]
qc_option = setting_option(
    "--qc",
    "qc_mode",
    type=click.Choice(["default", "strict", "off"]),
    default="default",
    show_default=True,
    help="Quality control against the model's training range: 'strict' refuses more "
    "borderline crops, 'off' classifies every decodable crop (marked in the summary).",
)


def apply_options(options: list):
    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function

    return decorate
