"""``mnist:DIR`` and ``fashion-mnist:DIR``: the four IDX files of MNIST or Fashion-MNIST, plain or gzipped.

``DIR`` holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte``, each possibly with a ``.gz`` suffix, either directly, in ``DIR/raw`` or in torchvision's
``DIR/MNIST/raw`` / ``DIR/FashionMNIST/raw``. The split is the files' own (``train`` / ``t10k``). Images are 1xHxW
uint8 scaled to [0, 1]; MNIST classes are ``"0"`` .. ``"9"``, Fashion-MNIST's are its ten garment names.

The IDX parser trusts no header: the magic number, data type (unsigned byte only), number of dimensions and
the byte count are all checked, the payload is read in chunks (a header promising gigabytes allocates nothing until
the bytes exist), and a file with missing or trailing bytes is refused.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from kit.data._common import DIGIT_CLASSES, Arrays, check_label_range, labels_tensor, u8_to_tensor
from kit.errors import UserError
from kit.io import require_dir

__all__ = ["load"]

#: Fashion-MNIST's ten class names, in label order.
FASHION_CLASSES: tuple[str, ...] = (
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


def load(kind: str, root: Path, split: str) -> Arrays:
    """The ``train`` or ``t10k`` images and labels of an MNIST or Fashion-MNIST folder.

    Parameters
    ----------
    kind : str
        ``"mnist"`` or ``"fashion-mnist"`` (picks the class names and torchvision's sub-folder name).
    root : pathlib.Path
        The folder the spec names.
    split : str
        ``"train"`` or ``"test"`` (the ``t10k`` files).

    Returns
    -------
    Arrays
        Images (N, 1, H, W) float32 in [0, 1], int64 labels, the ten class names.

    Raises
    ------
    UserError
        If the folder or a file is missing, unreadable or malformed, or images and labels disagree.
    """
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
    names = FASHION_CLASSES if kind == "fashion-mnist" else DIGIT_CLASSES
    check_label_range(labels, len(names), lbl_path)
    return u8_to_tensor(images[:, None, :, :]), labels_tensor(labels), names
