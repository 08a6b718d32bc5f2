"""Helpers shared by the dataset formats: splits, seeds, label checks and the uint8 -> float conversion.

Every format module of :mod:`kit.data` returns its split as :data:`Arrays` (images, labels, class names) built with
these helpers, so all formats convert, validate and split the same way. This module imports no format module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kit.errors import UserError

__all__ = [
    "DIGIT_CLASSES",
    "SPLITS",
    "TEST_FRACTION",
    "Arrays",
    "check_label_range",
    "check_seed",
    "labels_tensor",
    "split_indices",
    "u8_to_tensor",
]

#: The two splits a dataset has.
SPLITS: tuple[str, ...] = ("train", "test")

#: Fraction of the images that a seeded split puts in ``test``.
TEST_FRACTION = 0.25

#: Class names of the ten digits (scikit-learn's digits, MNIST).
DIGIT_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))

#: What a format's loader returns: images float32 (N, C, H, W) in [0, 1], labels int64 (N,), class names.
Arrays = tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]


def check_seed(seed: object) -> None:
    """Refuse a seed that is not an integer >= 0 (bool included) with a :class:`~kit.errors.UserError`."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be an integer >= 0, got {seed!r}")


def u8_to_tensor(a: np.ndarray) -> torch.Tensor:
    """uint8 (N, C, H, W) -> contiguous float32 tensor in [0, 1]; the one conversion every uint8 format uses."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # astype copy: writable, owned
    return t.div_(255.0)


def labels_tensor(y: np.ndarray) -> torch.Tensor:
    """Labels -> an int64 tensor that owns a writable copy of them."""
    return torch.from_numpy(np.array(y, dtype=np.int64, copy=True))


def check_label_range(y: np.ndarray, num_classes: int, source: Path | str) -> None:
    """Refuse a label outside ``0 .. num_classes - 1``, naming ``source`` (the file or spec) in the message."""
    if y.size == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise UserError(
            f"{source}: label {bad} is out of range for {num_classes} classes (expected 0..{num_classes - 1})"
        )


def split_indices(n: int, seed: int, split: str, source: Path | str) -> np.ndarray:
    """Sorted indices of ``split`` in a seeded TEST_FRACTION split of ``n`` items (same seed -> same split)."""
    if n < 2:
        raise UserError(f"{source} holds {n} image(s); a seeded train/test split needs at least 2")
    n_test = min(max(int(round(n * TEST_FRACTION)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    return np.sort(idx)
