"""``digits`` and ``digits:N``: the 8x8 handwritten digits of scikit-learn (UCI optdigits test set), embedded.

The 1797 images ship inside the kit as ``kit/data/digits.npz`` (no download, no scikit-learn at run time): grey levels
0..16 as uint8 (1797, 8, 8) ``images`` and uint8 (1797,) ``labels``, ten classes ``"0"`` .. ``"9"``, exactly
scikit-learn's ``load_digits()`` (``scripts/make_digits_npz.py`` wrote the file from it; the test suite checks both
the fingerprint :data:`DIGITS_SHA256` and, where scikit-learn is installed, the equality). ``digits`` gives them as
1x8x8 images scaled to [0, 1]; ``digits:N`` resizes them to 1xNxN (bilinear, no antialiasing, clamped to [0, 1])
for any integer ``N >= 4``. The set has no fixed train/test split: it is split deterministically from the seed
(:data:`kit.data._common.TEST_FRACTION` goes to ``test``).

The raw arrays are read on first use and cached per process.
"""

from __future__ import annotations

import functools
import hashlib
import re
from importlib import resources

import numpy as np
import torch

from kit.data._common import DIGIT_CLASSES, Arrays, labels_tensor, split_indices
from kit.errors import UserError

__all__ = ["DIGITS_FILE", "DIGITS_SHA256", "digits_sha256", "load"]

_MIN_DIGITS_SIZE = 4

#: The embedded arrays' file, in this package.
DIGITS_FILE = "digits.npz"

#: :func:`digits_sha256` of the embedded arrays: the content, whatever zlib compressed the file.
DIGITS_SHA256 = "fc70cdb317ba73e7578178a8306756fb0936536e10fc9bbf9920d4a19dd041ec"


def digits_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    """Fingerprint of the digits arrays' content: sha256 over, per array (``images`` then ``labels``), a line
    ``name dtype shape`` and its C-order bytes. Independent of how (or whether) a file compressed them."""
    h = hashlib.sha256(b"otkit.digits/1\n")
    for name, a in (("images", images), ("labels", labels)):
        a = np.ascontiguousarray(a)
        h.update(f"{name} {a.dtype.str} {'x'.join(map(str, a.shape))}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """The digits as read-only (1797, 8, 8) float64 in 0..16 and (1797,) int64 (as scikit-learn gives them); cached
    per process.

    Raises
    ------
    UserError
        If the embedded file is missing or is not the kit's (a damaged install).
    """
    source = resources.files(__package__) / DIGITS_FILE
    try:
        with source.open("rb") as f, np.load(f, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"the embedded digits ({source}) cannot be read ({type(e).__name__}: {e}); reinstall "
                        "otkit") from e
    if digits_sha256(images, labels) != DIGITS_SHA256:
        raise UserError(f"the embedded digits ({source}) are not the kit's (fingerprint differs); reinstall otkit")
    images = images.astype(np.float64)
    target = labels.astype(np.int64)
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
