"""Command-line pieces every ftz-* tool shares: one-line usage errors and number types.

Stdlib only: the torch-free front ends (ftz-chat, ftz-demo, ftz-serve, ftz-doctor) import it on the device.
"""

from __future__ import annotations

import argparse
import math


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr ("PROG: error: ..."), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def finite_float(text: str) -> float:
    """An argparse type: a float that is a number (not nan, not inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value
