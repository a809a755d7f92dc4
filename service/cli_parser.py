"""The argument parser every vqtok command uses: a usage error is one line and exit status 2.

argparse's own parser prints the usage block and then the error (two or more lines); a user who
mistyped a flag needs the one line that says which flag and what was wrong, and `--help` for
the rest. Torch-free and web-stack-free: training's CLIs use it too.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

USAGE_ERROR = 2


class CliParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors read ``PROG: error: MESSAGE (see PROG --help)``."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())  # argparse messages may wrap
        print(f"{self.prog}: error: {text} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(USAGE_ERROR)
