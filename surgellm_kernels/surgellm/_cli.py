"""What the commands share: argument parsing that raises instead of exiting,
the ``error:`` exit, their output lines, the patch report, and writing JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Optional


class UsageError(Exception):
    """A bad command-line argument."""


class ArgumentParser(argparse.ArgumentParser):
    """Raises :class:`UsageError` instead of printing and exiting."""

    def error(self, message):
        raise UsageError(message)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def fail(message: str, parser: Optional[argparse.ArgumentParser] = None) -> int:
    """Print ``error: <message>`` (after the usage line, with ``parser``) to
    stderr; the exit code of a failed command, 2."""
    if parser is not None:
        parser.print_usage(sys.stderr)
    print(f"error: {message}", file=sys.stderr)
    return 2


def say(message: str) -> None:
    """A command's line of output (stdout, flushed: torchrun interleaves ranks)."""
    print(message, flush=True)


def patch_for_kernels(model, kernels: str, verbose: bool = True) -> None:
    """``patch_model`` when ``kernels == "fused"``, printing its report (and
    saying so when a module has no fast path here) when ``verbose``."""
    if kernels != "fused":
        if verbose:
            say("kernels: reference (PyTorch modules, not patched)")
        return
    from ..nn import patch_model

    with warnings.catch_warnings():  # said below, in one line
        warnings.filterwarnings("ignore", message="patch_model: no fused kernel")
        report = patch_model(model)
    if verbose:
        say("kernels: fused")
        say(str(report))
        if report.eager:
            say(
                f"warning: no fused kernel here for {', '.join(report.eager)}: the fast path "
                f"is not taken, they run the eager reference"
            )


def write_json(path: str, value) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
