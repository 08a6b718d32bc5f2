"""Image-classification datasets selected by a spec string.

A *spec* names a dataset kind and, for most kinds, where it lives on disk:

=====================  =====================================================================================
``digits``             scikit-learn's 8x8 digits (1797 images, shipped with scikit-learn), 1x8x8
``digits:N``           the same, resized to 1xNxN (bilinear), any integer ``N >= 4``
``mnist:DIR``          the four MNIST IDX files, plain or ``.gz``
``fashion-mnist:DIR``  the four Fashion-MNIST IDX files, plain or ``.gz``
``cifar10:DIR``        the CIFAR-10 "python version" batches (``DIR`` or ``DIR/cifar-10-batches-py``)
``cifar100:DIR``       the CIFAR-100 "python version" files (``DIR`` or ``DIR/cifar-100-python``)
``npz:FILE``           a NumPy ``.npz`` archive holding ``x, y`` or ``x_train, y_train, x_test, y_test``
``folder:DIR``         one sub-folder of PNG/JPEG images per class, optionally under ``train/`` and ``test/``
=====================  =====================================================================================

Every loader returns a :class:`Dataset` whose ``x`` is a contiguous float32 CPU tensor of shape (N, C, H, W) with
values in [0, 1] and whose ``y`` is an int64 tensor of class indices. Formats without a fixed train/test split
(``digits``, ``npz`` with ``x, y``, ``folder`` without ``train/`` and ``test/``) are split deterministically from a
seed: 25 % of the images go to ``test``.

Anything wrong with the user's files or spec raises :class:`kit.errors.UserError` naming the file or spec at fault.
CIFAR batches are pickles; they are read with a restricted unpickler that only reconstructs NumPy arrays, so a
crafted batch cannot run code.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import logging
import pickle
import re
import struct
import sys
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from kit.errors import UserError
from kit.io import require_dir, require_file

__all__ = [
    "Dataset",
    "dataset_kinds",
    "fingerprint_arrays",
    "load_dataset",
    "parse_spec",
]

logger = logging.getLogger(__name__)

_KINDS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "npz", "folder")
_PATH_KINDS: frozenset[str] = frozenset({"mnist", "fashion-mnist", "cifar10", "cifar100", "npz", "folder"})
_SPLITS: tuple[str, ...] = ("train", "test")

#: Fraction of the images that a seeded split puts in ``test``.
TEST_FRACTION = 0.25
_MIN_DIGITS_SIZE = 4

_FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_DIGIT_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))
_IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg"})
# Pillow modes kept as one grey channel; every other mode is converted to RGB.
_GREY_MODES: frozenset[str] = frozenset({"L", "1"})
_FINGERPRINT_TAG = "otkit.data.fingerprint/v1"
# Most classes an npz without ``class_names`` may imply by its largest label (names "0".."N-1" are generated).
_MAX_INFERRED_CLASSES = 100_000


# --------------------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------------------


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
        # These are programming errors (the loaders below validate user data first), so they are not UserError.
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
        if self.split not in _SPLITS:
            raise ValueError(f"Dataset.split must be one of {_SPLITS}, got {self.split!r}")

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
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise UserError(f"subset size must be an integer >= 1, got {n!r} (dataset {self.spec})")
        _check_seed(seed)
        if n > len(self) and notice:  # a stated notice, never a silent change of what was asked
            logger.warning("note: %d examples requested but %s (%s split) has %d; using all %d", n, self.spec,
                           self.split, len(self), len(self))
        if n >= len(self):
            return self
        perm = np.random.default_rng(int(seed)).permutation(len(self))[: int(n)]
        idx = torch.from_numpy(perm.astype(np.int64))
        return Dataset(
            x=self.x.index_select(0, idx).contiguous(),
            y=self.y.index_select(0, idx),
            class_names=self.class_names,
            spec=self.spec,
            split=self.split,
        )

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
        _check_seed(seed)
        generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
        return DataLoader(
            TensorDataset(self.x, self.y),
            batch_size=int(batch_size),
            shuffle=bool(shuffle),
            generator=generator,
            drop_last=bool(drop_last),
        )


# --------------------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------------------


def dataset_kinds() -> list[str]:
    """The dataset kinds a spec may name.

    Returns
    -------
    list of str
        ``["digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "npz", "folder"]``.
    """
    return list(_KINDS)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split a spec string into its kind and argument.

    Parameters
    ----------
    spec : str
        ``KIND`` or ``KIND:ARG``; only the first ``:`` separates (so paths may contain colons). The kind is
        case-insensitive.

    Returns
    -------
    tuple of (str, str or None)
        The lower-case kind and the argument, e.g. ``("mnist", "/data/mnist")`` or ``("digits", None)``.

    Raises
    ------
    UserError
        If the kind is unknown (the message lists the known kinds), the argument after ``:`` is empty, or a kind
        that reads files has no path.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"empty dataset spec {spec!r}; known kinds: {', '.join(_KINDS)}")
    head, sep, arg = spec.partition(":")
    kind = head.strip().lower()
    if kind not in _KINDS:
        raise UserError(f"unknown dataset kind {head.strip()!r} in spec {spec!r}; known kinds: {', '.join(_KINDS)}")
    if sep and not arg.strip():
        raise UserError(f"dataset spec {spec!r} has nothing after ':'")
    if not sep:
        if kind in _PATH_KINDS:
            what = "FILE" if kind == "npz" else "DIR"
            raise UserError(f"dataset spec {spec!r} needs a path: use {kind}:{what}")
        return kind, None
    return kind, arg


def load_dataset(spec: str, split: str = "train", seed: int = 0) -> Dataset:
    """Load one split of the dataset a spec names.

    Parameters
    ----------
    spec : str
        See the module docstring, e.g. ``"digits:16"``, ``"mnist:/data/mnist"``, ``"npz:faces.npz"``.
    split : str, optional
        ``"train"`` (default) or ``"test"``.
    seed : int, optional
        Seed of the train/test split for formats without a fixed split, by default 0. Formats with a fixed split
        ignore it.

    Returns
    -------
    Dataset
        The split, with ``spec`` and ``split`` recorded.

    Raises
    ------
    UserError
        For a bad spec, split or seed, and for any missing, unreadable or malformed file (the message names it).
    """
    kind, arg = parse_spec(spec)
    if split not in _SPLITS:
        raise UserError(f"unknown split {split!r} for dataset {spec!r}; use 'train' or 'test'")
    _check_seed(seed)
    seed = int(seed)
    if kind == "digits":
        x, y, names = _load_digits(spec, arg, split, seed)
    elif kind in ("mnist", "fashion-mnist"):
        x, y, names = _load_idx_dataset(kind, _user_path(arg), split)
    elif kind in ("cifar10", "cifar100"):
        x, y, names = _load_cifar(kind, _user_path(arg), split)
    elif kind == "npz":
        x, y, names = _load_npz(_user_path(arg), split, seed)
    else:  # folder (parse_spec admits nothing else)
        x, y, names = _load_folder(_user_path(arg), split, seed)
    ds = Dataset(x=x, y=y, class_names=names, spec=spec, split=split)
    logger.debug("loaded %r", ds)
    return ds


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


# --------------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------------


def _check_seed(seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be an integer >= 0, got {seed!r}")


def _user_path(arg: str | None) -> Path:
    # parse_spec guarantees an argument for every path kind.
    return Path(str(arg)).expanduser()


def _u8_to_tensor(a: np.ndarray) -> torch.Tensor:
    """uint8 (N, C, H, W) -> contiguous float32 tensor in [0, 1]; the one conversion every uint8 format uses."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # astype copy: writable, owned
    return t.div_(255.0)


def _labels_tensor(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(y, dtype=np.int64, copy=True))


def _check_label_range(y: np.ndarray, num_classes: int, source: Path | str) -> None:
    if y.size == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise UserError(
            f"{source}: label {bad} is out of range for {num_classes} classes (expected 0..{num_classes - 1})"
        )


def _split_indices(n: int, seed: int, split: str, source: Path | str) -> np.ndarray:
    """Sorted indices of ``split`` in a seeded TEST_FRACTION split of ``n`` items (same seed -> same split)."""
    if n < 2:
        raise UserError(f"{source} holds {n} image(s); a seeded train/test split needs at least 2")
    n_test = min(max(int(round(n * TEST_FRACTION)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    return np.sort(idx)


# --------------------------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------------------------


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


def _load_digits(
    spec: str, arg: str | None, split: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    size = 8
    if arg is not None:
        text = arg.strip()
        if not re.fullmatch(r"[0-9]+", text):
            raise UserError(f"dataset spec {spec!r}: digits size must be an integer >= {_MIN_DIGITS_SIZE}, got {arg!r}")
        size = int(text)
        if size < _MIN_DIGITS_SIZE:
            raise UserError(f"dataset spec {spec!r}: digits size must be an integer >= {_MIN_DIGITS_SIZE}, got {size}")
    images, target = _digits_raw()
    idx = _split_indices(len(target), seed, split, spec)
    x = torch.from_numpy((images[idx] / 16.0).astype(np.float32)).unsqueeze(1).contiguous()
    if size != 8:
        x = torch.nn.functional.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=False
        ).clamp_(0.0, 1.0).contiguous()
    return x, _labels_tensor(target[idx]), _DIGIT_CLASSES


# --------------------------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX)
# --------------------------------------------------------------------------------------------------------------------

_IDX_UBYTE = 0x08
_READ_CHUNK = 1 << 24


def _read_exact(f: Any, count: int) -> bytearray:
    """Read up to ``count`` bytes in chunks (never pre-allocating what a bogus header promises)."""
    buf = bytearray()
    while len(buf) < count:
        chunk = f.read(min(_READ_CHUNK, count - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes (plain, or gzipped when the name ends in ``.gz``)."""
    opener: Any = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise UserError(f"{path} is truncated: {len(head)} bytes, too short for an IDX header")
            if head[0] != 0 or head[1] != 0:
                raise UserError(f"{path} is not an IDX file: bad magic number 0x{head.hex()}")
            if head[2] != _IDX_UBYTE:
                raise UserError(f"{path}: IDX data type code 0x{head[2]:02x} is not 0x08 (unsigned byte)")
            ndim = head[3]
            if ndim != expected_ndim:
                raise UserError(f"{path}: IDX file has {ndim} dimension(s), expected {expected_ndim}")
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise UserError(f"{path} is truncated inside its IDX header")
            dims = struct.unpack(f">{ndim}i", raw_dims)
            if any(d < 0 for d in dims):
                raise UserError(f"{path}: IDX header has a negative dimension {dims}")
            count = int(np.prod(dims, dtype=object))
            payload = _read_exact(f, count)
            if len(payload) < count:
                raise UserError(
                    f"{path} is truncated: its IDX header {dims} promises {count} bytes of data, found {len(payload)}"
                )
            if f.read(1):
                raise UserError(f"{path}: more data than its IDX header {dims} promises")
    except UserError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read IDX file {path}: {e}") from e
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def _find_idx(root: Path, kind: str, base: str) -> Path:
    sub = "MNIST" if kind == "mnist" else "FashionMNIST"
    for folder in (root, root / "raw", root / sub / "raw"):  # as distributed, or torchvision's layouts
        for name in (base, base + ".gz"):
            p = folder / name
            if p.is_file():
                return p
    raise UserError(f"{kind} folder {root} has no {base} (nor {base}.gz)")


def _load_idx_dataset(kind: str, root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    require_dir(root, f"{kind} folder")
    prefix = "train" if split == "train" else "t10k"
    img_path = _find_idx(root, kind, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find_idx(root, kind, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(img_path, 3)
    labels = _read_idx(lbl_path, 1)
    if images.shape[0] == 0:
        raise UserError(f"{img_path} holds no images")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise UserError(f"{img_path}: images have an empty size {images.shape[1]}x{images.shape[2]}")
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"{img_path} holds {images.shape[0]} images but {lbl_path} holds {labels.shape[0]} labels")
    names = _FASHION_CLASSES if kind == "fashion-mnist" else _DIGIT_CLASSES
    _check_label_range(labels, len(names), lbl_path)
    return _u8_to_tensor(images[:, None, :, :]), _labels_tensor(labels), names


# --------------------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (restricted pickle)
# --------------------------------------------------------------------------------------------------------------------


def _numpy_attr(module_names: Sequence[str], name: str) -> Any:
    import importlib

    for mod in module_names:
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy provides no {name}")  # pragma: no cover - every numpy >= 1.24 has them


@functools.lru_cache(maxsize=1)
def _pickle_allowlist() -> dict[tuple[str, str], Any]:
    """(module, name) pairs a CIFAR batch may reference, mapped to this NumPy's objects (old and new spellings)."""
    multiarray = ("numpy._core.multiarray", "numpy.core.multiarray")
    numeric = ("numpy._core.numeric", "numpy.core.numeric")
    reconstruct = _numpy_attr(multiarray, "_reconstruct")
    scalar = _numpy_attr(multiarray, "scalar")
    frombuffer = _numpy_attr(numeric, "_frombuffer")
    allowed: dict[tuple[str, str], Any] = {
        # Only as the first argument of _reconstruct: calling it from a pickle would allocate any shape it names.
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): np.dtype,
        ("builtins", "dict"): dict,
        ("builtins", "list"): list,
        ("__builtin__", "dict"): dict,
        ("__builtin__", "list"): list,
    }
    for mod in multiarray:
        allowed[(mod, "_reconstruct")] = functools.partial(_bounded_reconstruct, reconstruct)
        allowed[(mod, "scalar")] = scalar
    for mod in numeric:  # protocol-5 pickles of arrays (a batch re-saved by a recent Python)
        allowed[(mod, "_frombuffer")] = frombuffer
    # Python 3 writes bytes at protocol <= 2 as _codecs.encode(text, "latin1"); only that encoding is honoured.
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` in a CIFAR pickle: accepted as the class :func:`_bounded_reconstruct` builds, and
    not callable (a pickle that calls ``numpy.ndarray(shape)`` directly is refused)."""

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayToken()


def _bounded_reconstruct(reconstruct: Any, subtype: Any, shape: Any, dtype: Any, *, limit: int = 0) -> Any:
    """numpy's ``_reconstruct`` for plain arrays only, refusing a shape larger than the pickle that declares it.

    A real batch reconstructs ``ndarray((0,), 'b')`` and fills it from bytes stored in the file, so its arrays are
    never larger than the file; a crafted pickle could otherwise name a shape of gigabytes.
    """
    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError(f"refusing to reconstruct a {subtype!r}; only numpy.ndarray is allowed")
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise pickle.UnpicklingError(f"array shape {shape!r} is not a tuple of sizes")
    itemsize = np.dtype(dtype).itemsize
    if int(np.prod(dims, dtype=object)) * max(itemsize, 1) > limit:
        raise pickle.UnpicklingError(f"array shape {dims} declares more data than the file holds")
    return reconstruct(np.ndarray, dims, dtype)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` that only performs the latin-1 encoding pickle uses for bytes."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR batch holds (NumPy array reconstruction, dict, list)."""

    def __init__(self, file: Any, source: Path, size: int) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source
        self._size = size

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle's hook
        obj = _pickle_allowlist().get((module, name))
        if obj is None:
            raise UserError(
                f"refusing to unpickle {self._source}: it references {module}.{name}, which a CIFAR batch never holds"
            )
        if isinstance(obj, functools.partial) and obj.func is _bounded_reconstruct:
            return functools.partial(obj, limit=self._size)
        return obj


def _unpickle_cifar(path: Path) -> dict[Any, Any]:
    require_file(path, "CIFAR file")
    try:
        # From memory: a length field of a crafted pickle can then never make a read allocate more than the file.
        data = path.read_bytes()
        obj = _CifarUnpickler(io.BytesIO(data), path, len(data)).load()
    except UserError:
        raise
    except Exception as e:  # any failure of untrusted pickle data is the file's fault
        raise UserError(f"cannot read CIFAR file {path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a CIFAR batch: it holds a {type(obj).__name__}, not a dict")
    return obj


def _entry(d: dict[Any, Any], key: str, path: Path) -> Any:
    for k in (key.encode("ascii"), key):  # bytes keys in the real (Python 2) files; str if re-saved in Python 3
        if k in d:
            return d[k]
    found = ", ".join(sorted(k.decode("ascii", "replace") if isinstance(k, bytes) else str(k) for k in d))
    raise UserError(f"{path} has no '{key}' entry (found: {found or 'nothing'})")


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle_cifar(path)
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
    _check_label_range(labels, num_classes, path)
    return data, labels.astype(np.int64)


def _cifar_names(path: Path, key: str, num_classes: int) -> tuple[str, ...]:
    raw = _entry(_unpickle_cifar(path), key, path)
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


def _load_cifar(kind: str, root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
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
    return _u8_to_tensor(data.reshape(-1, 3, 32, 32)), _labels_tensor(labels), names


# --------------------------------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------------------------------


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


def _load_npz(path: Path, split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
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
            xs = {s: _npz_images(_npz_array(z, f"x_{s}", path), f"x_{s}", path) for s in _SPLITS}
            ys = {s: _npz_labels(_npz_array(z, f"y_{s}", path), f"y_{s}", xs[s].shape[0], path) for s in _SPLITS}
            if xs["train"].shape[1:] != xs["test"].shape[1:]:
                raise UserError(
                    f"{path}: x_train images are {xs['train'].shape[1:]} but x_test images are {xs['test'].shape[1:]}"
                )
            x, y = xs[split], ys[split]
            all_y = np.concatenate([ys["train"], ys["test"]])
        elif {"x", "y"} <= keys:
            x_all = _npz_images(_npz_array(z, "x", path), "x", path)
            all_y = _npz_labels(_npz_array(z, "y", path), "y", x_all.shape[0], path)
            idx = _split_indices(x_all.shape[0], seed, split, path)
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
    _check_label_range(all_y, len(names), path)
    xt = _u8_to_tensor(x) if x.dtype == np.uint8 else torch.from_numpy(np.array(x, dtype=np.float32, copy=True))
    return xt, _labels_tensor(y), names


# --------------------------------------------------------------------------------------------------------------------
# folder of images
# --------------------------------------------------------------------------------------------------------------------


def _subdirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_in(folder: Path) -> list[Path]:
    found = (p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith("."))
    return sorted((p for p in found if p.is_file()), key=lambda p: p.name)


def _class_files(split_dir: Path, class_names: Sequence[str]) -> list[tuple[Path, int]]:
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(class_names):
        cdir = split_dir / name
        if cdir.is_dir():
            files.extend((p, label) for p in _images_in(cdir))
    return files


def _image_header(path: Path) -> tuple[tuple[int, int], str]:
    from PIL import Image

    try:
        with warnings.catch_warnings():  # a size over Pillow's limit is refused just below, not warned about
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                size, mode = im.size, im.mode
    except Exception as e:  # Pillow's decoders raise many types on crafted bytes: any of them is the file's fault
        raise UserError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:  # Pillow only warns up to twice its limit
        raise UserError(
            f"image {path} is {size[0]}x{size[1]}, more than Pillow's limit of {limit} pixels (a decompression bomb?)"
        )
    return size, mode


def _image_pixels(path: Path, grey: bool) -> np.ndarray:
    """(C, H, W) uint8 pixels; C = 1 when ``grey``, else 3 (grey images are replicated, as Pillow's RGB would)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in _GREY_MODES:
                a = np.asarray(im.convert("L"), dtype=np.uint8)
                return a[None] if grey else np.repeat(a[None], 3, axis=0)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
    except Exception as e:  # Pillow's decoders raise many types on crafted bytes: any of them is the file's fault
        raise UserError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def _load_folder(root: Path, split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    require_dir(root, "image folder")
    train_dir, test_dir = root / "train", root / "test"
    has_train, has_test = train_dir.is_dir(), test_dir.is_dir()
    if has_train and has_test:
        class_dirs = _subdirs(train_dir)
        if not class_dirs:
            raise UserError(f"image folder {train_dir} has no class sub-folders")
        names = tuple(p.name for p in class_dirs)
        extra = sorted(set(p.name for p in _subdirs(test_dir)) - set(names))
        if extra:
            raise UserError(f"image folder {test_dir} has class folder(s) not in {train_dir}: {', '.join(extra)}")
        pools = {"train": _class_files(train_dir, names), "test": _class_files(test_dir, names)}
        all_files = pools["train"] + pools["test"]
        for s in _SPLITS:
            if not pools[s]:
                raise UserError(f"image folder {root / s} holds no .png/.jpg/.jpeg images in class sub-folders")
    else:
        lone = train_dir if has_train else test_dir if has_test else None
        if lone is not None and _subdirs(lone):
            other = "test" if has_train else "train"
            raise UserError(f"image folder {root} has {lone.name}/ but not {other}/; give both or neither")
        class_dirs = _subdirs(root)
        if not class_dirs:
            raise UserError(f"image folder {root} has no class sub-folders")
        names = tuple(p.name for p in class_dirs)
        all_files = _class_files(root, names)
        if not all_files:
            raise UserError(f"image folder {root} holds no .png/.jpg/.jpeg images in class sub-folders")
        idx = _split_indices(len(all_files), seed, split, root)
        pools = {split: [all_files[i] for i in idx]}

    # Header pass over every image of both splits: one size and one channel count for the whole dataset.
    ref_size: tuple[int, int] | None = None
    ref_path: Path | None = None
    grey = True
    for path, _ in all_files:
        size, mode = _image_header(path)
        if ref_size is None:
            ref_size, ref_path = size, path
        elif size != ref_size:
            raise UserError(
                f"image {path} is {size[0]}x{size[1]} but {ref_path} is {ref_size[0]}x{ref_size[1]}; "
                "all images must share one size"
            )
        grey = grey and mode in _GREY_MODES

    files = pools[split]
    pixels = np.stack([_image_pixels(p, grey) for p, _ in files])
    labels = np.array([label for _, label in files], dtype=np.int64)
    return _u8_to_tensor(pixels), _labels_tensor(labels), names
