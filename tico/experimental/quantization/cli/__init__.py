"""tico-sq, the command line: ``quantize``, ``eval``, ``report`` and ``demo``.

This package only parses arguments and prints; loading, calibrating, converting, saving and scoring are
library functions (``loading``, ``calibration``, ``workflow``, ``evaluation``) shared with scripts.
"""

from tico.experimental.quantization.cli.main import CliError, build_parser, main

__all__ = ["main", "build_parser", "CliError"]
