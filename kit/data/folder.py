"""``folder:DIR``: one sub-folder of PNG/JPEG images per class.

``DIR/<class>/*.png|*.jpg|*.jpeg`` (split deterministically from the seed, with
:data:`kit.data._common.TEST_FRACTION` going to ``test``), or ``DIR/train/<class>/...`` and ``DIR/test/<class>/...``
(the folders' own split: give both or neither; the classes are those of ``train/``, and ``test/`` may not add any). Class names are the
sub-folder names, sorted; hidden files and folders are skipped. All images of both splits must share one size; they
are loaded as one grey channel when every image is grey (Pillow modes ``L``, ``1``) and as RGB otherwise.

Pillow is imported on first use only. Every image header is read before any pixel is decoded, so a mismatched size
is reported early; an image over Pillow's pixel limit (a decompression bomb) is refused, and any decoder failure on a
crafted file becomes a :class:`kit.errors.UserError` naming it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kit.data._common import SPLITS, Arrays, labels_tensor, split_indices, u8_to_tensor
from kit.errors import UserError
from kit.io import require_dir

__all__ = ["load"]

_IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg"})
# Pillow modes kept as one grey channel; every other mode is converted to RGB.
_GREY_MODES: frozenset[str] = frozenset({"L", "1"})


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


def load(root: Path, split: str, seed: int) -> Arrays:
    """One split of an image folder.

    Parameters
    ----------
    root : pathlib.Path
        The folder the spec names.
    split : str
        ``"train"`` or ``"test"``.
    seed : int
        Seed of the train/test split of a folder without ``train/`` and ``test/``; ignored otherwise.

    Returns
    -------
    Arrays
        Images (N, C, H, W) float32 in [0, 1] with C = 1 (all grey) or 3, int64 labels, the class names.

    Raises
    ------
    UserError
        If the folder has no classes or images, images differ in size, or an image is unreadable or too large.
    """
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
        for s in SPLITS:
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
        idx = split_indices(len(all_files), seed, split, root)
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
    return u8_to_tensor(pixels), labels_tensor(labels), names
