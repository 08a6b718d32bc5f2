"""Architectures by name: a model of the zoo (``cnn-small``, ``wrn-28-10``, ...) or a user's own file.

A user model defined in their own Python file is named ``path/to/file.py:ClassOrFactory``; the callable is called as
``factory(num_classes=..., input_shape=..., **kwargs)`` and must return an ``nn.Module`` that takes pixels in [0, 1]
(N, C, H, W) and returns logits. Loading such a file runs its code, as importing any Python file does: only name files
you trust. The checkpoint records the spec and the file's sha256, and warns when the file changed since training.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

import torch.nn as nn

import models
from kit.errors import UserError
from kit.io import sha256_file

log = logging.getLogger(__name__)


def is_file_arch(arch: str) -> bool:
    """True when ``arch`` names a user file (``something.py:Name``) rather than a zoo model."""
    path, sep, _ = arch.rpartition(":")
    return bool(sep) and path.endswith(".py")


def _load_factory(arch: str, search_dirs: tuple[Path, ...] = ()) -> tuple[Any, Path]:
    path_s, _, name = arch.rpartition(":")
    if not name.isidentifier():
        raise UserError(f"bad --arch {arch!r}: expected path/to/file.py:ClassOrFactory")
    candidates = [Path(path_s)] + [d / Path(path_s).name for d in search_dirs]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise UserError(f"architecture file not found: {path_s}")
    mod_name = f"otkit_user_arch_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot import architecture file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file failed to import: report it in one line
        raise UserError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UserError(f"{path} has no class or function named {name!r}")
    return factory, path


def build_model(
    arch: str,
    num_classes: int,
    input_shape: tuple[int, int, int],
    kwargs: dict[str, Any] | None = None,
    search_dirs: tuple[Path, ...] = (),
) -> tuple[nn.Module, dict[str, Any]]:
    """Build an untrained model and the JSON-able record needed to rebuild it.

    Parameters
    ----------
    arch : str
        A zoo name (see ``models.list_models()``) or ``path/to/file.py:ClassOrFactory``.
    num_classes, input_shape : int, (C, H, W)
        Taken from the dataset.
    kwargs : dict, optional
        Architecture keyword arguments (for zoo models also ``mean`` / ``std``, the normalisation kept in the model).
    search_dirs : tuple of Path
        Extra folders in which to look for a user file (the checkpoint's folder, when reloading).

    Returns
    -------
    model : nn.Module
    record : dict
        ``{"kind": "zoo", "config": ...}`` or ``{"kind": "file", "spec": ..., "file_sha256": ..., ...}``.
    """
    kwargs = dict(kwargs or {})
    input_shape = tuple(int(s) for s in input_shape)  # type: ignore[assignment]
    if is_file_arch(arch):
        factory, path = _load_factory(arch, search_dirs)
        try:
            model = factory(num_classes=num_classes, input_shape=input_shape, **kwargs)
        except TypeError as e:
            raise UserError(f"calling {arch} failed: {e}") from e
        if not isinstance(model, nn.Module):
            raise UserError(f"{arch} returned {type(model).__name__}, not a torch.nn.Module")
        record = {
            "kind": "file",
            "spec": arch,
            "file_sha256": sha256_file(path),
            "num_classes": num_classes,
            "input_shape": list(input_shape),
            "kwargs": kwargs,
        }
        return model, record
    try:
        model = models.create(arch, num_classes=num_classes, input_shape=input_shape, **kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from e
    return model, {"kind": "zoo", "config": model.config}


def rebuild_model(record: dict[str, Any], search_dirs: tuple[Path, ...] = ()) -> nn.Module:
    """Rebuild an (untrained) model from the record :func:`build_model` returned."""
    kind = record.get("kind")
    if kind == "zoo":
        try:
            return models.from_config(record["config"])
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"cannot rebuild zoo model from {record.get('config')!r}: {e}") from e
    if kind == "file":
        model, new = build_model(
            record["spec"], record["num_classes"], tuple(record["input_shape"]), record.get("kwargs"), search_dirs
        )
        if new["file_sha256"] != record.get("file_sha256"):
            log.warning("architecture file %s changed since the checkpoint was written", record["spec"])
        return model
    raise UserError(f"unknown architecture record kind {kind!r}")


def arch_name(record: dict[str, Any]) -> str:
    """Human-readable architecture name of a record."""
    return record["config"]["name"] if record.get("kind") == "zoo" else record.get("spec", "?")
