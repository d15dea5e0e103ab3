"""Options shared by several commands, as decorators built once."""

from __future__ import annotations

from pathlib import Path

import click

model_option = click.option(
    "--model",
    "-m",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="SMEARSCAN_MODEL",
    show_envvar=True,
    help="ONNX model [default: the embedded model].",
)
device_option = click.option(
    "--device",
    default="auto",
    envvar="SMEARSCAN_DEVICE",
    show_envvar=True,
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
        "model's, 10].",
    ),
]
qc_option = click.option(
    "--qc",
    "qc_mode",
    type=click.Choice(["default", "strict", "off"]),
    default="default",
    envvar="SMEARSCAN_QC",
    show_envvar=True,
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
