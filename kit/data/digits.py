"""``digits`` and ``digits:N``: scikit-learn's embedded 8x8 handwritten digits.

The 1797 images ship inside scikit-learn (no download, no files), grey levels 0..16, ten classes ``"0"`` .. ``"9"``.
``digits`` gives them as 1x8x8 images scaled to [0, 1]; ``digits:N`` resizes them to 1xNxN (bilinear, no
antialiasing, clamped to [0, 1]) for any integer ``N >= 4``. The set has no fixed train/test split: it is split
deterministically from the seed (:data:`kit.data._common.TEST_FRACTION` goes to ``test``).

scikit-learn is imported on first use only (it is slow to import), and the raw arrays are cached per process.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import torch

from kit.data._common import DIGIT_CLASSES, Arrays, labels_tensor, split_indices
from kit.errors import UserError

__all__ = ["load"]

_MIN_DIGITS_SIZE = 4


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as read-only (1797, 8, 8) float64 in 0..16 and (1797,) int64; cached per process."""
    from sklearn.datasets import load_digits  # slow import; only when digits are asked for

    d = load_digits()
    images = np.array(d.images, dtype=np.float64)
    target = np.array(d.target, dtype=np.int64)
    images.setflags(write=False)
    target.setflags(write=False)
    return images, target


def load(spec: str, arg: str | None, split: str, seed: int) -> Arrays:
    """One seeded split of the digits, at 8x8 or resized to ``arg`` x ``arg``.

    Parameters
    ----------
    spec : str
        The whole spec, for messages.
    arg : str or None
        The text after ``digits:`` (the size), or None for 8x8.
    split : str
        ``"train"`` or ``"test"``.
    seed : int
        Seed of the train/test split.

    Returns
    -------
    Arrays
        Images (N, 1, S, S) float32 in [0, 1], int64 labels, the class names ``"0"`` .. ``"9"``.

    Raises
    ------
    UserError
        If the size is not an integer >= 4.
    """
    size = 8
    if arg is not None:
        text = arg.strip()
        if not re.fullmatch(r"[0-9]+", text):
            raise UserError(f"dataset spec {spec!r}: digits size must be an integer >= {_MIN_DIGITS_SIZE}, got {arg!r}")
        size = int(text)
        if size < _MIN_DIGITS_SIZE:
            raise UserError(f"dataset spec {spec!r}: digits size must be an integer >= {_MIN_DIGITS_SIZE}, got {size}")
    images, target = _digits_raw()
    idx = split_indices(len(target), seed, split, spec)
    x = torch.from_numpy((images[idx] / 16.0).astype(np.float32)).unsqueeze(1).contiguous()
    if size != 8:
        x = torch.nn.functional.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=False
        ).clamp_(0.0, 1.0).contiguous()
    return x, labels_tensor(target[idx]), DIGIT_CLASSES
