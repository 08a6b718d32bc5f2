"""Image-classification datasets selected by a spec string.

A *spec* names a dataset kind and, for most kinds, where it lives on disk:

=====================  =====================================================================================
``digits``             scikit-learn's 8x8 digits (1797 images, embedded in the kit), 1x8x8
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

The package holds one module per format, behind the spec parser:

=======================  ===================================================================================
``kit.data.spec``        the spec parser: :func:`parse_spec`, :func:`dataset_kinds`, :func:`load_dataset`
``kit.data.dataset``     the :class:`Dataset` type (subset, loader, fingerprint) and :func:`fingerprint_arrays`
``kit.data._common``     helpers every format shares: seeded split, label checks, uint8 -> float conversion
``kit.data.digits``      ``digits`` / ``digits:N`` (the embedded ``digits.npz``, read on first use)
``kit.data.idx``         ``mnist`` / ``fashion-mnist`` IDX files
``kit.data.cifar``       ``cifar10`` / ``cifar100`` batches
``kit.data.unpickle``    the restricted unpickler CIFAR batches are read with
``kit.data.npz``         ``npz`` archives
``kit.data.folder``      ``folder`` of images (Pillow imported on first use)
=======================  ===================================================================================

A format module imports only the shared helpers (and CIFAR its unpickler), never another format module; the spec
parser imports each one the first time a spec names its kind.
"""

from __future__ import annotations

from kit.data._common import TEST_FRACTION  # noqa: F401 - kit.data.TEST_FRACTION, as before the split
from kit.data.dataset import Dataset, fingerprint_arrays
from kit.data.spec import dataset_kinds, load_dataset, parse_spec

__all__ = [
    "Dataset",
    "dataset_kinds",
    "fingerprint_arrays",
    "load_dataset",
    "parse_spec",
]
