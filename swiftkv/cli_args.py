"""Argument helpers shared by the command-line files (``cli.py`` and each room's ``cli.py``), below all of
them so none imports another for them."""

from __future__ import annotations

import argparse
import math

from swiftkv.config import LayoutRequest

DTYPE_HELP = "auto (default: bf16 only where the CPU multiplies bf16 natively, else float32), float32, bfloat16"


def check_range(option: str, value: float, low: float, high: float = float("inf"), low_open: bool = False) -> None:
    """``ValueError`` unless ``value`` is a finite number in [low, high] (``(low, high]`` with ``low_open``): a
    command line's numbers checked before any model is loaded (``inf``, ``nan`` and negative sizes included)."""
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bounds = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high != float("inf") else "")
        raise ValueError(f"{option} must be a finite number {bounds}, got {value}")


def add_swiftkv_layout_args(p: argparse.ArgumentParser) -> None:
    """``-l`` / ``--swiftkv-fraction`` (one of them) and ``-G``: read back with :func:`layout_request`."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--num-key-value-layers", "-l", type=int, help="l: layers that keep their own KV")
    g.add_argument("--swiftkv-fraction", type=float, help="fraction of layers made SwiftKV (default 0.5)")
    p.add_argument("--key-value-group-size", "-G", type=int, default=1, help="AcrossKV group size G (default 1)")


def layout_request(args: argparse.Namespace) -> LayoutRequest:
    """The layout the arguments of :func:`add_swiftkv_layout_args` ask for."""
    return LayoutRequest(args.num_key_value_layers, args.swiftkv_fraction, args.key_value_group_size)
