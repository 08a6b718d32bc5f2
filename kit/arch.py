"""Architectures by name: a model of the zoo (``cnn-small``, ``wrn-28-10``, ...) or a user's own file.

A user model defined in their own Python file is named ``path/to/file.py:ClassOrFactory``; the callable is called as
``factory(num_classes=..., input_shape=..., **kwargs)`` and must return an ``nn.Module`` that takes pixels in [0, 1]
(N, C, H, W) and returns logits. Loading such a file runs its code, as importing any Python file does: only name files
you trust.

A checkpoint records the spec and the file's sha256, but never imports anything by itself: rebuilding a file
architecture (:func:`rebuild_model`) needs the file named again by the caller (``--arch FILE.py:NAME`` on the command
line), with the recorded callable name and the recorded sha256, which is checked on the bytes that are then executed
(before any of them runs). No path from a checkpoint's metadata is ever imported, and no folder is searched.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import sys
import types
from pathlib import Path
from typing import Any

import torch.nn as nn

import models
from kit.errors import UserError

log = logging.getLogger(__name__)


def is_file_arch(arch: str) -> bool:
    """True when ``arch`` names a user file (``something.py:Name``) rather than a zoo model."""
    path, sep, _ = arch.rpartition(":")
    return bool(sep) and path.endswith(".py")


def _load_factory(arch: str, expected_sha256: str | None = None, source: str = "") -> tuple[Any, str]:
    """Import the file ``arch`` names and return its callable and the sha256 (hex) of the bytes executed.

    The file is read once; with ``expected_sha256`` those bytes must hash to it or nothing is executed.
    """
    path_s, _, name = arch.rpartition(":")
    if not is_file_arch(arch) or not name.isidentifier():
        raise UserError(f"bad --arch {arch!r}: expected path/to/file.py:ClassOrFactory")
    path = Path(path_s)
    if not path.is_file():
        raise UserError(f"architecture file not found: {path_s}")
    try:
        code = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read architecture file {path}: {e}") from e
    digest = hashlib.sha256(code).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise UserError(f"--arch {path} has sha256 {digest} but {source or 'the checkpoint'} was built from a file "
                        f"with sha256 {expected_sha256}: not imported (the file changed, or it is another file)")
    mod_name = f"otkit_user_arch_{digest[:16]}_{abs(hash(str(path.resolve())))}"
    module = types.ModuleType(mod_name)
    module.__file__ = str(path)
    sys.modules[mod_name] = module  # dataclasses, pickling and friends look their module up there
    try:  # executing the bytes just hashed: the file cannot change between the check and the import
        exec(compile(code, str(path), "exec"), module.__dict__)
    except Exception as e:  # the user's file failed to import: report it in one line
        sys.modules.pop(mod_name, None)
        raise UserError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UserError(f"{path} has no class or function named {name!r}")
    return factory, digest


def _call_factory(factory: Any, arch: str, num_classes: int, input_shape: tuple[int, int, int],
                  kwargs: dict[str, Any]) -> nn.Module:
    try:
        model = factory(num_classes=num_classes, input_shape=input_shape, **kwargs)
    except TypeError as e:
        raise UserError(f"calling {arch} failed: {e}") from e
    if not isinstance(model, nn.Module):
        raise UserError(f"{arch} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(
    arch: str,
    num_classes: int,
    input_shape: tuple[int, int, int],
    kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build an untrained model and the JSON-able record needed to rebuild it.

    Parameters
    ----------
    arch : str
        A zoo name (see ``models.list_models()``) or ``path/to/file.py:ClassOrFactory`` (imported: its code runs).
    num_classes, input_shape : int, (C, H, W)
        Taken from the dataset.
    kwargs : dict, optional
        Architecture keyword arguments (for zoo models also ``mean`` / ``std``, the normalisation kept in the model).

    Returns
    -------
    model : nn.Module
    record : dict
        ``{"kind": "zoo", "config": ...}`` or ``{"kind": "file", "spec": ..., "file_sha256": ..., ...}``.
    """
    kwargs = dict(kwargs or {})
    input_shape = tuple(int(s) for s in input_shape)  # type: ignore[assignment]
    if is_file_arch(arch):
        factory, digest = _load_factory(arch)
        model = _call_factory(factory, arch, num_classes, input_shape, kwargs)
        record = {
            "kind": "file",
            "spec": arch,
            "file_sha256": digest,
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


def rebuild_model(record: dict[str, Any], arch: str | None = None, source: str = "the checkpoint") -> nn.Module:
    """Rebuild an (untrained) model from its architecture record, its input convention folded in.

    A record with an ``input`` entry (a model imported with its own input convention, ``otkit models import``) is
    rebuilt wrapped in :class:`kit.convention.InputModule`; see :func:`_rebuild` for the kinds.
    """
    model = _rebuild(record, arch, source)
    if isinstance(record, dict) and record.get("input") is not None:
        from kit.convention import InputConvention, InputModule

        model = InputModule(model, InputConvention.from_dict(record["input"], f"{source}: architecture input"))
    return model


def _rebuild(record: dict[str, Any], arch: str | None = None, source: str = "the checkpoint") -> nn.Module:
    """Rebuild an (untrained) model from the record :func:`build_model` (or an importer) returned.

    Kinds: ``zoo`` (a config), ``file`` (a user's Python file, below), ``timm`` / ``torchvision`` (a name in an optional
    package, :mod:`kit.twins.hub`), ``onnx`` (a graph skeleton, :mod:`kit.twins.from_onnx`) and ``program`` (a
    ``torch.export`` archive, :mod:`kit.twins.from_program`); only ``file`` runs code, and only the caller's.

    Parameters
    ----------
    record : dict
        The architecture record of a checkpoint.
    arch : str, optional
        ``FILE.py:NAME`` the caller names (``--arch``) for a file record: NAME must be the recorded callable and the
        file's sha256 the recorded one, checked before the file is imported. Without it a file record is refused;
        nothing the record says is ever imported. Ignored for a zoo record (which runs no user code).
    source : str
        The checkpoint, for messages.

    Raises
    ------
    UserError
        A file record without ``arch``, or with one that does not match; a malformed record.
    """
    kind = record.get("kind") if isinstance(record, dict) else None
    if kind == "zoo":
        try:
            return models.from_config(record["config"])
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"cannot rebuild zoo model from {record.get('config')!r}: {e}") from e
    if kind == "file":
        spec, expected = record.get("spec"), record.get("file_sha256")
        if not isinstance(spec, str) or not isinstance(expected, str) or len(expected) != 64:
            raise UserError(f"{source}: its architecture record names no file spec and sha256 that could be checked")
        if not spec.isprintable():  # metadata is anyone's text: no terminal control characters in the message
            spec = ascii(spec)
        if arch is None:  # no path from the metadata is offered as advice: the user names their own copy
            want = spec.rpartition(":")[2] if spec.rpartition(":")[2].isidentifier() else "NAME"
            raise UserError(f"{source} builds its model from a Python file (recorded as {spec}); importing it runs "
                            f"its code, so nothing was imported: if you have that file and trust it, name it yourself "
                            f"with --arch PATH/TO/FILE.py:{want} (it must have sha256 {expected})")
        want_name, got_name = spec.rpartition(":")[2], arch.rpartition(":")[2]
        if not is_file_arch(arch) or got_name != want_name:
            raise UserError(f"--arch {arch} does not match {source}, built from {spec}: give its file and "
                            f"callable as FILE.py:{want_name}")
        try:
            num_classes = int(record["num_classes"])
            input_shape = tuple(int(s) for s in record["input_shape"])
            kwargs = dict(record.get("kwargs") or {})
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{source}: malformed architecture record ({type(e).__name__}: {e})") from e
        if len(input_shape) != 3:
            raise UserError(f"{source}: malformed architecture record (input shape {list(input_shape)})")
        factory, _ = _load_factory(arch, expected_sha256=expected, source=source)
        return _call_factory(factory, arch, num_classes, input_shape, kwargs)  # type: ignore[arg-type]
    if kind in ("timm", "torchvision"):
        from kit.twins.hub import rebuild_hub

        return rebuild_hub(record, source)
    if kind == "onnx":
        from kit.twins.from_onnx import OnnxModule

        try:
            skeleton = base64.b64decode(record["graph"], validate=True)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{source}: its ONNX architecture record holds no readable graph ({e})") from e
        return OnnxModule.from_skeleton(skeleton)
    if kind == "program":
        from kit.twins.from_program import rebuild_program

        return rebuild_program(record, source)
    raise UserError(f"{source}: unknown architecture record kind {kind!r}")


def arch_name(record: dict[str, Any]) -> str:
    """Human-readable architecture name of a record."""
    kind = record.get("kind")
    if kind == "zoo":
        return record["config"]["name"]
    if kind in ("timm", "torchvision"):
        return f"{kind}:{record.get('name', '?')}"
    if kind in ("onnx", "program"):
        return f"{kind} graph"
    return record.get("spec", "?")
