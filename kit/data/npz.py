"""``npz:FILE``: a NumPy ``.npz`` archive of images and labels.

The archive holds either ``x`` and ``y`` (split deterministically from the seed, with
:data:`kit.data._common.TEST_FRACTION` going to ``test``) or ``x_train``, ``y_train``, ``x_test`` and ``y_test`` (its
own split). Images are N x C x H x W, N x H x W x C (read so when the last axis is 1, 3 or 4 and the second is not) or N x H x W
(one channel), either uint8 (0..255,
scaled to [0, 1]) or float with every value finite and in [0, 1]; labels are 1-D integers. An optional
``class_names`` string array names the classes; without it, the classes are ``"0"`` .. ``"K-1"`` for the largest
label K-1 (at most 100 000 classes).

The archive is opened with ``allow_pickle=False``: an object array (which would need pickle) is refused, never
loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kit.data._common import SPLITS, Arrays, check_label_range, labels_tensor, split_indices, u8_to_tensor
from kit.errors import UserError
from kit.io import require_file

__all__ = ["load"]

# Most classes an npz without ``class_names`` may imply by its largest label (names "0".."N-1" are generated).
_MAX_INFERRED_CLASSES = 100_000


def _npz_array(z: Any, key: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(z[key])
    except ValueError as e:  # "Object arrays cannot be loaded when allow_pickle=False"
        raise UserError(f"{path}: array '{key}' cannot be loaded without pickle (object arrays are refused)") from e
    except Exception as e:
        raise UserError(f"cannot read array '{key}' from {path}: {type(e).__name__}: {e}") from e


def _npz_images(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    """Validate one image array and return it as uint8 or float32 (N, C, H, W); float values checked in [0, 1]."""
    if x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim == 4:
        if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)  # N x H x W x C
    else:
        raise UserError(f"{path}: '{key}' has shape {x.shape}; expected N x C x H x W, N x H x W x C or N x H x W")
    if x.shape[0] == 0 or 0 in x.shape[1:]:
        raise UserError(f"{path}: '{key}' has shape {x.shape}, which holds no images")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.dtype.kind != "f":
        raise UserError(f"{path}: '{key}' has dtype {x.dtype}; expected uint8 (0..255) or float in [0, 1]")
    xf = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(xf).all():
        raise UserError(f"{path}: '{key}' holds NaN or infinite values")
    lo, hi = float(xf.min()), float(xf.max())
    if lo < 0.0 or hi > 1.0:
        raise UserError(f"{path}: float '{key}' has values in [{lo:g}, {hi:g}]; they must lie in [0, 1]")
    return xf


def _npz_labels(y: np.ndarray, key: str, n: int, path: Path) -> np.ndarray:
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise UserError(f"{path}: '{key}' must be a 1-D integer array, got {y.dtype} {y.shape}")
    if y.shape[0] != n:
        raise UserError(f"{path}: '{key}' holds {y.shape[0]} labels for {n} images")
    return y.astype(np.int64)


def load(path: Path, split: str, seed: int) -> Arrays:
    """One split of an ``.npz`` archive.

    Parameters
    ----------
    path : pathlib.Path
        The archive the spec names.
    split : str
        ``"train"`` or ``"test"``.
    seed : int
        Seed of the train/test split of an archive with ``x, y``; ignored for one with its own split.

    Returns
    -------
    Arrays
        Images (N, C, H, W) float32 in [0, 1], int64 labels, the class names.

    Raises
    ------
    UserError
        If the file is missing, not an ``.npz`` archive, holds object arrays, or its arrays are malformed.
    """
    require_file(path, "npz file")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # not a zip / pickled data refused / unreadable
        raise UserError(f"cannot read npz file {path}: {type(e).__name__}: {e}") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise UserError(f"{path} is a single .npy array, not an .npz archive with 'x' and 'y'")
    with z:
        keys = set(z.files)
        split_keys = {"x_train", "y_train", "x_test", "y_test"}
        if keys & split_keys:
            missing = sorted(split_keys - keys)
            if missing:
                raise UserError(f"{path} has some of x_train, y_train, x_test, y_test but lacks {', '.join(missing)}")
            xs = {s: _npz_images(_npz_array(z, f"x_{s}", path), f"x_{s}", path) for s in SPLITS}
            ys = {s: _npz_labels(_npz_array(z, f"y_{s}", path), f"y_{s}", xs[s].shape[0], path) for s in SPLITS}
            if xs["train"].shape[1:] != xs["test"].shape[1:]:
                raise UserError(
                    f"{path}: x_train images are {xs['train'].shape[1:]} but x_test images are {xs['test'].shape[1:]}"
                )
            x, y = xs[split], ys[split]
            all_y = np.concatenate([ys["train"], ys["test"]])
        elif {"x", "y"} <= keys:
            x_all = _npz_images(_npz_array(z, "x", path), "x", path)
            all_y = _npz_labels(_npz_array(z, "y", path), "y", x_all.shape[0], path)
            idx = split_indices(x_all.shape[0], seed, split, path)
            x, y = x_all[idx], all_y[idx]
        else:
            raise UserError(
                f"{path} must hold arrays x, y or x_train, y_train, x_test, y_test; it holds: "
                f"{', '.join(sorted(keys)) or 'nothing'}"
            )
        names: tuple[str, ...] | None = None
        if "class_names" in keys:
            cn = _npz_array(z, "class_names", path)
            if cn.ndim != 1 or cn.dtype.kind not in "US" or cn.shape[0] == 0:
                raise UserError(
                    f"{path}: 'class_names' must be a non-empty 1-D string array, got {cn.dtype} {cn.shape}"
                )
            try:
                names = tuple(s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in cn.tolist())
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: 'class_names' is not UTF-8") from e
    if names is None:
        if int(all_y.min()) < 0:
            raise UserError(f"{path}: label {int(all_y.min())} is negative; labels must be class indices 0, 1, ...")
        if int(all_y.max()) >= _MAX_INFERRED_CLASSES:
            raise UserError(
                f"{path}: label {int(all_y.max())} implies more than {_MAX_INFERRED_CLASSES} classes; "
                "store a 'class_names' array if there really are that many"
            )
        names = tuple(str(i) for i in range(int(all_y.max()) + 1))
    check_label_range(all_y, len(names), path)
    xt = u8_to_tensor(x) if x.dtype == np.uint8 else torch.from_numpy(np.array(x, dtype=np.float32, copy=True))
    return xt, labels_tensor(y), names
