"""Run-time settings shared by the library and the CLI: device choice, seeding and progress bars.

Progress bars go to stderr and are silent when stdout or stderr is not a terminal, or when the user asked for quiet.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch

from kit.errors import UserError

T = TypeVar("T")

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) progress bars for this process."""
    global _quiet
    _quiet = bool(quiet)


def progress_enabled() -> bool:
    """True when a progress bar would be seen by a person: not quiet, and stdout and stderr are terminals."""
    return not _quiet and sys.stdout.isatty() and sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar on stderr when :func:`progress_enabled`, else return it unchanged."""
    if not progress_enabled():
        return iter(iterable)
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, desc=desc, total=total, leave=leave, file=sys.stderr, dynamic_ncols=True))


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a usable :class:`torch.device`.

    ``auto`` picks the first CUDA device when one is present, else the CPU. Asking for CUDA where there is none, or for
    a device index that does not exist, is a :class:`UserError`.
    """
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise UserError(f"unsupported device {spec!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"device {spec!r} requested but CUDA is not available on this machine (use --device cpu)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {spec!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
