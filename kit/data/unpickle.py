"""The restricted unpickler that reads CIFAR batches without letting a crafted file run code.

CIFAR's "python version" files are pickles, and an ordinary :func:`pickle.load` of an untrusted pickle can call any
importable function. :class:`CifarUnpickler` resolves only the globals a real batch references, each mapped to a
safe stand-in (:func:`_pickle_allowlist`):

- ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct`` (either spelling), bounded: it
  builds plain ``numpy.ndarray`` only, and refuses a shape that declares more bytes than the whole file holds (a
  real batch reconstructs an empty array and fills it from bytes stored in the file, so its arrays are never larger
  than the file; a crafted shape could otherwise allocate gigabytes);
- ``numpy.ndarray`` as an inert token, accepted only as the class ``_reconstruct`` builds (calling
  ``numpy.ndarray(shape)`` from a pickle is refused), ``numpy.dtype``, NumPy's ``scalar`` and, for protocol-5
  pickles of a batch re-saved by a recent Python, ``numpy.core.numeric._frombuffer``;
- ``dict`` and ``list`` (``builtins`` and Python 2's ``__builtin__``);
- ``_codecs.encode``, honoured only for the latin-1 encoding pickle uses for bytes at protocol <= 2.

Any other global is refused with a :class:`kit.errors.UserError` naming it. The file is read into memory first, so no
length field of a crafted pickle can make a read allocate more than the file's size, and any exception raised while
unpickling untrusted bytes becomes a :class:`~kit.errors.UserError` naming the file.
"""

from __future__ import annotations

import functools
import io
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kit.errors import UserError
from kit.io import require_file

__all__ = ["CifarUnpickler", "unpickle_cifar"]


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


class CifarUnpickler(pickle.Unpickler):
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


def unpickle_cifar(path: Path) -> dict[Any, Any]:
    """Read one CIFAR file with :class:`CifarUnpickler`.

    Parameters
    ----------
    path : pathlib.Path
        A CIFAR batch or meta file.

    Returns
    -------
    dict
        The unpickled dict (bytes keys in the original files, str keys in files re-saved by Python 3).

    Raises
    ------
    UserError
        If the file is missing or unreadable, references a global outside the allowlist, declares an array larger
        than itself, is not a valid pickle, or does not hold a dict.
    """
    require_file(path, "CIFAR file")
    try:
        # From memory: a length field of a crafted pickle can then never make a read allocate more than the file.
        data = path.read_bytes()
        obj = CifarUnpickler(io.BytesIO(data), path, len(data)).load()
    except UserError:
        raise
    except Exception as e:  # any failure of untrusted pickle data is the file's fault
        raise UserError(f"cannot read CIFAR file {path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a CIFAR batch: it holds a {type(obj).__name__}, not a dict")
    return obj
