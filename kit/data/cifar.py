"""``cifar10:DIR`` and ``cifar100:DIR``: the CIFAR-10 / CIFAR-100 "python version" batches.

CIFAR-10: ``data_batch_1`` .. ``data_batch_5`` (train), ``test_batch`` and ``batches.meta`` (``label_names``), in
``DIR`` or ``DIR/cifar-10-batches-py``. CIFAR-100: ``train``, ``test`` and ``meta`` (``fine_label_names``; labels are
the 100 fine labels), in ``DIR`` or ``DIR/cifar-100-python``. Each batch holds ``data``, a uint8 N x 3072 array
(3x32x32, channel-major), and its labels; the split is the files' own. Images are 3x32x32 scaled to [0, 1].

The files are pickles: they are read by :func:`kit.data.unpickle.unpickle_cifar`, a restricted unpickler that only
reconstructs NumPy arrays, so a crafted batch cannot run code (see :mod:`kit.data.unpickle`). Every entry is then
checked (dtype, shape, label count and range, names) before use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kit.data._common import Arrays, check_label_range, labels_tensor, u8_to_tensor
from kit.data.unpickle import unpickle_cifar
from kit.errors import UserError
from kit.io import require_dir

__all__ = ["load"]


def _entry(d: dict[Any, Any], key: str, path: Path) -> Any:
    for k in (key.encode("ascii"), key):  # bytes keys in the real (Python 2) files; str if re-saved in Python 3
        if k in d:
            return d[k]
    found = ", ".join(sorted(k.decode("ascii", "replace") if isinstance(k, bytes) else str(k) for k in d))
    raise UserError(f"{path} has no '{key}' entry (found: {found or 'nothing'})")


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = unpickle_cifar(path)
    data = _entry(d, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{path}: 'data' must be a uint8 N x 3072 array, got {desc}")
    raw_labels = _entry(d, label_key, path)
    try:
        labels = np.asarray(raw_labels)
    except Exception as e:
        raise UserError(f"{path}: '{label_key}' is not a list of integers") from e
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise UserError(f"{path}: '{label_key}' is not a list of integers")
    if labels.shape[0] != data.shape[0]:
        raise UserError(f"{path} holds {data.shape[0]} images but {labels.shape[0]} labels")
    check_label_range(labels, num_classes, path)
    return data, labels.astype(np.int64)


def _cifar_names(path: Path, key: str, num_classes: int) -> tuple[str, ...]:
    raw = _entry(unpickle_cifar(path), key, path)
    if not isinstance(raw, (list, tuple)):
        raise UserError(f"{path}: '{key}' is not a list of names")
    names = []
    for item in raw:
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: class name {item!r} is not UTF-8") from e
        if not isinstance(item, str):
            raise UserError(f"{path}: '{key}' holds a {type(item).__name__}, not a name")
        names.append(item)
    if len(names) != num_classes:
        raise UserError(f"{path}: '{key}' lists {len(names)} classes, expected {num_classes}")
    return tuple(names)


def load(kind: str, root: Path, split: str) -> Arrays:
    """The train or test images of a CIFAR-10 or CIFAR-100 folder, with the class names of its meta file.

    Parameters
    ----------
    kind : str
        ``"cifar10"`` or ``"cifar100"``.
    root : pathlib.Path
        The folder the spec names (or its parent: ``cifar-10-batches-py`` / ``cifar-100-python`` is looked for).
    split : str
        ``"train"`` or ``"test"``.

    Returns
    -------
    Arrays
        Images (N, 3, 32, 32) float32 in [0, 1], int64 labels, the 10 or 100 class names.

    Raises
    ------
    UserError
        If the folder or a file is missing, refused by the restricted unpickler, or malformed.
    """
    require_dir(root, f"{kind} folder")
    if kind == "cifar10":
        sub, meta, names_key, label_key = "cifar-10-batches-py", "batches.meta", "label_names", "labels"
        num_classes = 10
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        sub, meta, names_key, label_key = "cifar-100-python", "meta", "fine_label_names", "fine_labels"
        num_classes = 100
        files = ["train" if split == "train" else "test"]
    if (root / sub).is_dir():
        root = root / sub
    names = _cifar_names(root / meta, names_key, num_classes)
    parts = [_cifar_batch(root / name, label_key, num_classes) for name in files]
    data = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
    labels = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts])
    if data.shape[0] == 0:
        raise UserError(f"{kind} {split} split in {root} holds no images")
    return u8_to_tensor(data.reshape(-1, 3, 32, 32)), labels_tensor(labels), names
