"""Command line: a thin click layer over the smearscan library.

Heavy modules (numpy, OpenCV, onnxruntime) are imported inside commands so that
``smearscan --help`` stays fast. Every command that reads crops follows one contract for
signals and failures (see :class:`SignalGuard` and :func:`final_line`): the last line on
stderr always summarises the run, whatever happened.
"""

from smearscan.cli.commands import cli, main
from smearscan.cli.shell import Environment, SignalGuard

__all__ = ["Environment", "SignalGuard", "cli", "main"]
