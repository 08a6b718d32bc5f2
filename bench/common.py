"""Shared set-up for the benchmarks: models trained on the embedded digits data, and a timer."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from kit.checkpoint import load_twin
from kit.defenses.trainer import TrainConfig, train

CACHE = Path(__file__).resolve().parent / ".cache"


def digits_model(defense: str = "standard", epochs: int = 10, **params) -> torch.nn.Module:
    """A cnn-small trained on digits:16 (cached in bench/.cache between runs)."""
    CACHE.mkdir(exist_ok=True)
    tag = "-".join(f"{k}{v}" for k, v in sorted(params.items()))
    path = CACHE / f"cnn-small-digits16-{defense}-{epochs}{'-' + tag if tag else ''}.safetensors"
    if not path.exists():
        train(TrainConfig(defense=defense, arch="cnn-small", data="digits:16", epochs=epochs, defense_params=params),
              path)
    return load_twin(path)[0]


def timed(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls (seconds), after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best
