"""What the two commands (``train``, ``evaluate``) share: argument parsing
that raises instead of exiting, argument types, the device, the ``error:``
exit, the patch report, and writing JSON. Printing is theirs to do."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from typing import Optional

import torch


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


def resolve_device(name: Optional[str]) -> torch.device:
    """``--device``: the named device, or cuda when available, else cpu;
    :class:`UsageError` for a name torch does not know or a CUDA device
    that is not there."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"argument --device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"argument --device: {name}: no CUDA device is visible")
    return device


def fail(message: str, parser: Optional[argparse.ArgumentParser] = None) -> int:
    """Print ``error: <message>`` (after the usage line, with ``parser``) to
    stderr; the exit code of a failed command, 2."""
    if parser is not None:
        parser.print_usage(sys.stderr)
    print(f"error: {message}", file=sys.stderr)
    return 2


def patch_for_kernels(model, kernels: str) -> None:
    """``patch_model`` when ``kernels == "fused"``, printing its report (and
    saying so when a module has no fast path here)."""
    if kernels != "fused":
        print("kernels: reference (PyTorch modules, not patched)")
        return
    from ..nn import patch_model

    with warnings.catch_warnings():  # said below, in one line
        warnings.filterwarnings("ignore", message="patch_model: no fused kernel")
        report = patch_model(model)
    print("kernels: fused")
    print(report)
    if report.eager:
        print(f"warning: no fused kernel here for {', '.join(report.eager)}: the fast path is "
              f"not taken, they run the eager reference")


def write_json(path: str, value) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value
