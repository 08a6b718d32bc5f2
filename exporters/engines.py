"""The factory: :func:`load_engine` opens any engine file as an :class:`Engine`; :func:`check_compatible` checks it fits.

The runners live in their backends, one per backend: :class:`TorchEngine` (:mod:`exporters.torch`),
:class:`exporters.onnx.OnnxRuntimeEngine` and :class:`exporters.tensorrt.TensorRTEngine`, all on the interface of
:mod:`exporters.base`. :func:`load_engine` picks one by file type and imports the ONNX and TensorRT backends only when
a file needs them; no backend imports this module. ``Engine`` and ``TorchEngine`` are re-exported here for callers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from exporters.base import Engine
from exporters.formats import DEFAULT_MAX_BATCH, engine_kind
from exporters.torch import TorchEngine
from kit.convention import InputConvention
from kit.errors import UserError

__all__ = ["Engine", "TorchEngine", "check_compatible", "load_engine"]


def load_engine(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    providers: Sequence[str] | None = None,
    max_batch: int | None = None,
    arch: str | None = None,
    input_convention: InputConvention | None = None,
) -> Engine:
    """Open a checkpoint (``.safetensors``/``.pt``), an ONNX file or a TensorRT engine as an :class:`Engine`.

    Parameters
    ----------
    path : str or Path
        The file; its suffix chooses the runner (:func:`exporters.formats.engine_kind`).
    device : str or torch.device
        Where the engine computes. For ONNX files it also picks the default provider: ``cpu`` for a CPU device,
        ``cuda`` for a CUDA one.
    providers : sequence of str, optional
        ONNX Runtime providers by short name (``cpu``, ``cuda``, ``tensorrt``); ONNX files only.
    max_batch : int, optional
        Override of the largest batch per backend call (default: what the file records, else 256).
    arch : str, optional
        ``FILE.py:NAME`` for a checkpoint whose architecture is a user's Python file (``--arch``): it is imported only
        when named here and matching the checkpoint's record (:func:`kit.arch.rebuild_model`). Other files ignore it.
    input_convention : InputConvention, optional
        What an ONNX file or TensorRT engine exported outside the kit takes (``--engine-input``): applied outside the
        engine, so callers still give [0, 1] NCHW float pixels. Default: what the file records, else the kit's own.

    Raises
    ------
    UserError
        For a missing, unknown, corrupt or unusable file (wrong input rank, an engine built for another GPU or
        TensorRT version, a missing runtime).
    """
    from kit.io import require_file

    path = require_file(path, "engine file")
    kind = engine_kind(path)
    dev = torch.device(device)
    if providers is not None and kind != "onnx":
        raise UserError(f"{path}: providers apply to ONNX files only")
    if kind == "torch":
        if input_convention is not None and not input_convention.identity:
            raise UserError(f"{path}: a checkpoint takes [0, 1] pixels (its input is folded in): --engine-input "
                            "applies to ONNX files and TensorRT engines")
        return TorchEngine.from_checkpoint(path, dev, max_batch=max_batch or DEFAULT_MAX_BATCH, arch=arch)
    if kind == "onnx":
        from exporters.onnx import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, device=dev, providers=providers, max_batch=max_batch,
                                 input_convention=input_convention)
    from exporters.tensorrt import TensorRTEngine

    return TensorRTEngine(path, device=dev, max_batch=max_batch, input_convention=input_convention)


def check_compatible(engine: Engine, input_shape: Sequence[int], num_classes: int, what: str) -> None:
    """Refuse an engine that does not fit a dataset, before any work starts.

    Raises
    ------
    UserError
        If the engine's input shape or class count differs from the dataset's.
    """
    shape = tuple(int(v) for v in input_shape)
    if tuple(engine.input_shape) != shape:
        c, h, w = engine.input_shape
        nhwc = engine.input_convention.layout == "nchw" and (c, h, w) == (shape[1], shape[2], shape[0])
        hint = " (an NHWC engine? describe it with --engine-input layout=nhwc)" if nhwc else ""
        raise UserError(f"{engine.name} takes inputs {'x'.join(map(str, engine.input_shape))} but {what} has "
                        f"{'x'.join(map(str, shape))}{hint}")
    if engine.num_classes != int(num_classes):
        raise UserError(f"{engine.name} predicts {engine.num_classes} classes but {what} has {num_classes}")
