"""The spec parser: a spec string -> its kind and argument -> the format module that loads it.

A spec is ``KIND`` or ``KIND:ARG`` (see :mod:`kit.data` for the kinds). :func:`load_dataset` checks the spec, split
and seed, then hands the argument to the kind's format module (``kit.data.digits``, ``idx``, ``cifar``, ``npz`` or
``folder``), imported on first use, and wraps what it returns in a :class:`~kit.data.dataset.Dataset`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kit.data._common import SPLITS, Arrays, check_seed
from kit.data.dataset import Dataset
from kit.errors import UserError

__all__ = ["dataset_kinds", "load_dataset", "parse_spec"]

logger = logging.getLogger(__name__)

_KINDS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "npz", "folder")
_PATH_KINDS: frozenset[str] = frozenset({"mnist", "fashion-mnist", "cifar10", "cifar100", "npz", "folder"})


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
        See :mod:`kit.data`, e.g. ``"digits:16"``, ``"mnist:/data/mnist"``, ``"npz:faces.npz"``.
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
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} for dataset {spec!r}; use 'train' or 'test'")
    check_seed(seed)
    seed = int(seed)
    x, y, names = _load_arrays(kind, spec, arg, split, seed)
    ds = Dataset(x=x, y=y, class_names=names, spec=spec, split=split)
    logger.debug("loaded %r", ds)
    return ds


def _load_arrays(kind: str, spec: str, arg: str | None, split: str, seed: int) -> Arrays:
    """Hand the spec's argument to its kind's format module, imported here: on first use, not with ``kit.data``."""
    if kind == "digits":
        from kit.data import digits

        return digits.load(spec, arg, split, seed)
    if kind in ("mnist", "fashion-mnist"):
        from kit.data import idx

        return idx.load(kind, _user_path(arg), split)
    if kind in ("cifar10", "cifar100"):
        from kit.data import cifar

        return cifar.load(kind, _user_path(arg), split)
    if kind == "npz":
        from kit.data import npz

        return npz.load(_user_path(arg), split, seed)
    # folder (parse_spec admits nothing else)
    from kit.data import folder  # Pillow comes in only when the images are read

    return folder.load(_user_path(arg), split, seed)


def _user_path(arg: str | None) -> Path:
    # parse_spec guarantees an argument for every path kind.
    return Path(str(arg)).expanduser()
