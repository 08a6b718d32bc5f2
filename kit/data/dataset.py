"""The :class:`Dataset` type: one split of an image-classification dataset, held in memory.

A :class:`Dataset` holds images ``x`` (contiguous float32 CPU tensor, (N, C, H, W), values in [0, 1]) and labels
``y`` (int64 class indices), with the class names, the spec it was loaded from and its split. It draws seeded subsets
(:meth:`Dataset.subset`), builds seeded DataLoaders (:meth:`Dataset.loader`) and carries a content fingerprint
(:func:`fingerprint_arrays`: sha256 over the images and labels, independent of the file format they came from).

Every format of :mod:`kit.data` ends in this type; none of them is imported here.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from kit.data._common import SPLITS, check_seed
from kit.errors import UserError

__all__ = ["Dataset", "fingerprint_arrays"]

logger = logging.getLogger(__name__)

_FINGERPRINT_TAG = "otkit.data.fingerprint/v1"


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """One split of an image-classification dataset, held in memory.

    Parameters
    ----------
    x : torch.Tensor
        Images, float32, shape (N, C, H, W), values in [0, 1], contiguous, on the CPU.
    y : torch.Tensor
        Class indices, int64, shape (N,), each in ``range(len(class_names))``.
    class_names : tuple of str
        Human-readable name of each class; its length is the number of classes.
    spec : str
        The spec string the dataset was loaded from, e.g. ``"digits:16"``.
    split : str
        ``"train"`` or ``"test"``.

    Notes
    -----
    Instances compare by identity (tensors have no single truth value). The fingerprint is computed on first use
    and cached on the instance.
    """

    x: torch.Tensor
    y: torch.Tensor
    class_names: tuple[str, ...]
    spec: str
    split: str
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # These are programming errors (the format loaders validate user data first), so they are not UserError.
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise TypeError("Dataset.x and Dataset.y must be torch tensors")
        if self.x.dtype != torch.float32 or self.x.ndim != 4:
            raise ValueError(f"Dataset.x must be float32 (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}")
        if self.x.device.type != "cpu" or not self.x.is_contiguous():
            raise ValueError("Dataset.x must be a contiguous CPU tensor")
        if self.y.dtype != torch.int64 or self.y.ndim != 1 or self.y.device.type != "cpu":
            raise ValueError(f"Dataset.y must be an int64 (N,) CPU tensor, got {self.y.dtype} {tuple(self.y.shape)}")
        if self.y.shape[0] != self.x.shape[0]:
            raise ValueError(f"Dataset has {self.x.shape[0]} images but {self.y.shape[0]} labels")
        names = tuple(str(n) for n in self.class_names)
        object.__setattr__(self, "class_names", names)
        if not names:
            raise ValueError("Dataset.class_names is empty")
        if self.y.numel() and (int(self.y.min()) < 0 or int(self.y.max()) >= len(names)):
            raise ValueError(f"Dataset.y holds labels outside 0..{len(names) - 1}")
        if self.split not in SPLITS:
            raise ValueError(f"Dataset.split must be one of {SPLITS}, got {self.split!r}")

    def __repr__(self) -> str:
        return (
            f"Dataset(spec={self.spec!r}, split={self.split!r}, n={len(self)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(class_names)``."""
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image, (C, H, W)."""
        c, h, w = (int(s) for s in self.x.shape[1:])
        return (c, h, w)

    @property
    def fingerprint(self) -> str:
        """``"sha256:<hex>"`` over this split's images and labels (see :func:`fingerprint_arrays`); cached."""
        if self._fingerprint is None:
            object.__setattr__(self, "_fingerprint", fingerprint_arrays(self.x, self.y))
        assert self._fingerprint is not None  # for type checkers; set just above
        return self._fingerprint

    def require_fit(self, input_shape: Sequence[int], num_classes: int, what: str) -> None:
        """Refuse, before any work, a model (``what``) whose input shape or class count is not this dataset's.

        Raises
        ------
        UserError
            Naming both shapes or both counts.
        """
        if list(self.input_shape) != [int(v) for v in input_shape]:
            raise UserError(f"{what} takes inputs {'x'.join(map(str, input_shape))} but {self.spec} has "
                            f"{'x'.join(map(str, self.input_shape))}")
        if self.num_classes != int(num_classes):
            raise UserError(f"{what} predicts {num_classes} classes but {self.spec} has {self.num_classes}")

    def subset(self, n: int, seed: int = 0, notice: bool = True) -> Dataset:
        """The first ``n`` images of a seeded random permutation.

        Parameters
        ----------
        n : int
            Number of images to keep; ``n >= len(self)`` returns ``self`` unchanged.
        seed : int, optional
            Seed of the permutation (``numpy.random.default_rng``), by default 0.
        notice : bool, optional
            Log a notice when ``n`` exceeds the dataset (a request larger than the data is stated, not silently
            shrunk); ``False`` where ``n`` is documented as a cap.

        Returns
        -------
        Dataset
            A new dataset with the same class names, spec and split, in permutation order.

        Raises
        ------
        UserError
            If ``n`` is not an integer >= 1 or ``seed`` is not an integer >= 0.
        """
        self._check_subset(n, seed)
        if n > len(self) and notice:  # a stated notice, never a silent change of what was asked
            logger.warning("note: %d examples requested but %s (%s split) has %d; using all %d", n, self.spec,
                           self.split, len(self), len(self))
        if n >= len(self):
            return self
        return self._take(np.random.default_rng(int(seed)).permutation(len(self))[: int(n)])

    def stratified(self, n: int, seed: int = 0) -> Dataset:
        r"""``n`` images with the classes in the dataset's proportions: per class, the first of a seeded permutation.

        Class ``c`` with :math:`N_c` of the :math:`N` images gets :math:`\lfloor n N_c / N \rfloor` of them, and the
        images still missing go to the classes with the largest remainders (ties: the smaller class index). The
        result keeps the permutation's order. ``n >= len(self)`` returns ``self``.

        Raises
        ------
        UserError
            If ``n`` is not an integer >= 1 or ``seed`` is not an integer >= 0.
        """
        self._check_subset(n, seed)
        if n >= len(self):
            return self
        perm = np.random.default_rng(int(seed)).permutation(len(self))
        labels = self.y.numpy()[perm]
        classes, counts = np.unique(labels, return_counts=True)
        share = n * counts / len(self)
        take = np.floor(share).astype(np.int64)
        order = np.lexsort((classes, -(share - take)))  # largest remainder first, then the smaller class
        take[order[: int(n) - int(take.sum())]] += 1
        keep = np.zeros(len(perm), dtype=bool)
        for c, k in zip(classes, take):
            keep[np.flatnonzero(labels == c)[:k]] = True
        return self._take(perm[keep])

    def _check_subset(self, n: Any, seed: Any) -> None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise UserError(f"subset size must be an integer >= 1, got {n!r} (dataset {self.spec})")
        check_seed(seed)

    def _take(self, positions: np.ndarray) -> Dataset:
        """The images at ``positions``, in that order (same class names, spec and split)."""
        idx = torch.from_numpy(positions.astype(np.int64))
        return Dataset(x=self.x.index_select(0, idx).contiguous(), y=self.y.index_select(0, idx),
                       class_names=self.class_names, spec=self.spec, split=self.split)

    def loader(self, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False) -> DataLoader:
        """A DataLoader over ``TensorDataset(x, y)``.

        Parameters
        ----------
        batch_size : int
            Images per batch, >= 1.
        shuffle : bool
            Reshuffle every epoch, with a ``torch.Generator`` seeded with ``seed`` (so the sequence of epochs is
            reproducible).
        seed : int, optional
            Seed of the shuffling generator, by default 0. Ignored when ``shuffle`` is false.
        drop_last : bool, optional
            Drop the last incomplete batch, by default False.

        Returns
        -------
        torch.utils.data.DataLoader
            Yields ``(x, y)`` batches of shape (B, C, H, W) and (B,).

        Raises
        ------
        UserError
            If ``batch_size`` is not an integer >= 1 or ``seed`` is not an integer >= 0.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UserError(f"batch size must be an integer >= 1, got {batch_size!r}")
        check_seed(seed)
        generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
        return DataLoader(
            TensorDataset(self.x, self.y),
            batch_size=int(batch_size),
            shuffle=bool(shuffle),
            generator=generator,
            drop_last=bool(drop_last),
        )


def fingerprint_arrays(x: torch.Tensor, y: torch.Tensor) -> str:
    """Content hash of images and labels, independent of the file format they came from.

    The sha256 covers a short text header (format tag, shapes, dtypes), then ``x`` as contiguous little-endian
    float32 bytes, then ``y`` as little-endian int64 bytes.

    Parameters
    ----------
    x : torch.Tensor
        Images; converted to float32 (values unchanged, no rescaling) before hashing.
    y : torch.Tensor
        Labels; converted to int64 before hashing.

    Returns
    -------
    str
        ``"sha256:<64 hex digits>"``.
    """
    xa = x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    ya = y.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy()
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        xa = xa.astype("<f4")
        ya = ya.astype("<i8")
    h = hashlib.sha256()
    header = f"{_FINGERPRINT_TAG}\nx float32 {list(xa.shape)}\ny int64 {list(ya.shape)}\n"
    h.update(header.encode("ascii"))
    h.update(np.ascontiguousarray(xa).data)
    h.update(np.ascontiguousarray(ya).data)
    return "sha256:" + h.hexdigest()
