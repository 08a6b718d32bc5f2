"""Architectures from optional packages: ``timm:NAME`` and ``torchvision:NAME``, built untrained.

Nothing is downloaded: timm models are created with ``pretrained=False`` and torchvision models with ``weights=None``;
the weights come from the user's own file (:mod:`kit.twins.layouts`). Neither package is a dependency of otkit: each is
imported only when a spec names it, and a missing one is a :class:`~kit.errors.UserError` saying how to install it.

The record :func:`build_hub` returns (``{"kind": "timm" | "torchvision", "name", "num_classes", "input_shape",
"kwargs", "package_version"}``) holds plain JSON and rebuilds the same architecture with :func:`rebuild_hub`; nothing
in it is imported except the package its kind names. A model's input resolution is the user's business where the
architecture fixes one (timm's ViTs take ``img_size``, passed in ``kwargs``); a mismatch shows at the first forward.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from typing import Any

import torch.nn as nn

from kit.errors import UserError

log = logging.getLogger(__name__)

HUB_KINDS = ("timm", "torchvision")
#: Keyword arguments otkit sets itself, or that would read or download weights: refused in ``kwargs``.
RESERVED_KWARGS = frozenset({"pretrained", "weights", "weights_backbone", "checkpoint_path", "pretrained_cfg",
                             "pretrained_cfg_overlay", "pretrained_strict", "num_classes", "in_chans", "progress"})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\Z")


def is_hub_arch(spec: str) -> bool:
    """True when ``spec`` names a model of an optional package: ``timm:NAME`` or ``torchvision:NAME``."""
    kind, sep, name = spec.partition(":")
    return bool(sep) and kind in HUB_KINDS and bool(name)


def _parse(spec: str) -> tuple[str, str]:
    kind, _, name = spec.partition(":")
    if kind not in HUB_KINDS or not _NAME.match(name):
        raise UserError(f"bad architecture {spec!r}: expected timm:NAME or torchvision:NAME")
    return kind, name


def _package(kind: str) -> Any:
    """The package a record kind names (torchvision's ``models`` subpackage), imported lazily."""
    module = "torchvision.models" if kind == "torchvision" else kind
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = getattr(e, "name", None) or ""
        if missing == kind or missing.startswith(kind + "."):
            raise UserError(f"{kind} is not installed: pip install 'otkit[{kind}]'") from e
        raise UserError(f"importing {kind} failed: {e}") from e


def _version(kind: str) -> str | None:
    top = importlib.import_module(kind)
    version = getattr(top, "__version__", None)
    return str(version) if version is not None else None


def _check_kwargs(kwargs: dict[str, Any], spec: str) -> dict[str, Any]:
    reserved = sorted(set(kwargs) & RESERVED_KWARGS)
    if reserved:
        raise UserError(f"{spec}: keyword argument {reserved[0]!r} is set by otkit or would load weights; otkit builds "
                        "untrained models and loads your weights file itself")
    try:
        return json.loads(json.dumps(kwargs))
    except (TypeError, ValueError) as e:
        raise UserError(f"{spec}: keyword arguments must be plain JSON values ({e})") from e


def _create(kind: str, name: str, num_classes: int, input_shape: tuple[int, int, int],
            kwargs: dict[str, Any]) -> nn.Module:
    package = _package(kind)
    spec = f"{kind}:{name}"
    if kind == "timm":
        is_model = getattr(package, "is_model", None)
        if is_model is not None and not is_model(name):
            raise UserError(f"timm has no model named {name!r} (timm.list_models() lists them)")
    else:
        if name not in package.list_models():
            raise UserError(f"torchvision has no model named {name!r} (torchvision.models.list_models() lists them)")
        if input_shape[0] != 3:
            raise UserError(f"{spec} takes 3-channel images; this data has {input_shape[0]} channel(s)")
    try:
        if kind == "timm":
            model = package.create_model(name, pretrained=False, num_classes=num_classes, in_chans=input_shape[0],
                                         **kwargs)
        else:
            model = package.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise UserError(f"building {spec} failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise UserError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_hub(spec: str, num_classes: int, input_shape: tuple[int, int, int],
              kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build an untrained timm or torchvision model and the JSON-able record that rebuilds it.

    Parameters
    ----------
    spec : str
        ``timm:NAME`` (``timm.create_model(NAME, pretrained=False, num_classes=K, in_chans=C, **kwargs)``) or
        ``torchvision:NAME`` (``torchvision.models.get_model(NAME, weights=None, num_classes=K, **kwargs)``; 3-channel
        input only).
    num_classes, input_shape : int, (C, H, W)
    kwargs : dict, optional
        Further keyword arguments of the constructor, plain JSON values (``drop_rate``, ``img_size``, ...); those otkit
        sets or that would load weights (:data:`RESERVED_KWARGS`) are refused.

    Returns
    -------
    model : nn.Module
        Untrained, in training mode as constructed.
    record : dict
        ``{"kind", "name", "num_classes", "input_shape", "kwargs", "package_version"}``.

    Raises
    ------
    UserError
        A malformed spec, a package that is not installed, an unknown model name, refused or non-JSON keyword
        arguments, a constructor that fails.
    """
    kind, name = _parse(spec)
    num_classes = int(num_classes)
    input_shape = tuple(int(s) for s in input_shape)  # type: ignore[assignment]
    if len(input_shape) != 3:
        raise UserError(f"{spec}: input shape must be (C, H, W), got {list(input_shape)}")
    kwargs = _check_kwargs(dict(kwargs or {}), spec)
    model = _create(kind, name, num_classes, input_shape, kwargs)
    record = {
        "kind": kind,
        "name": name,
        "num_classes": num_classes,
        "input_shape": list(input_shape),
        "kwargs": kwargs,
        "package_version": _version(kind),
    }
    return model, record


def rebuild_hub(record: dict[str, Any], source: str = "the checkpoint") -> nn.Module:
    """Rebuild the (untrained) model of a :func:`build_hub` record.

    A package version other than the recorded one is logged (architectures can change between releases; a strict
    weights load then says what differs).

    Raises
    ------
    UserError
        A malformed record, a package that is not installed, an unknown model name.
    """
    kind = record.get("kind") if isinstance(record, dict) else None
    if kind not in HUB_KINDS:
        raise UserError(f"{source}: not a timm or torchvision architecture record")
    try:
        name = str(record["name"])
        num_classes = int(record["num_classes"])
        input_shape = tuple(int(s) for s in record["input_shape"])
        kwargs = dict(record.get("kwargs") or {})
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source}: malformed architecture record ({type(e).__name__}: {e})") from e
    if len(input_shape) != 3 or not _NAME.match(name):
        raise UserError(f"{source}: malformed architecture record")
    spec = f"{kind}:{name}"
    kwargs = _check_kwargs(kwargs, spec)
    model = _create(kind, name, num_classes, input_shape, kwargs)  # type: ignore[arg-type]
    recorded, installed = record.get("package_version"), _version(kind)
    if recorded and installed and recorded != installed:
        log.warning("%s was built with %s %s; this is %s %s", source, kind, recorded, kind, installed)
    return model
