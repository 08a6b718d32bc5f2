"""Torch -> ONNX: :func:`torch_to_onnx` runs ``torch.onnx.export`` on a twin and returns an FP32 :class:`OnnxGraph`.

The current exporter (``dynamo=True``) runs with opset >= 18, a dynamic batch dimension and the model in eval mode.
Only when it fails does the legacy TorchScript exporter run; which one ran, and why, is kept in the graph (and written
into the file's metadata by :func:`exporters.onnx.write_onnx_export`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from exporters.formats import DEFAULT_OPSET, MIN_OPSET
from exporters.graph import first_line
from kit.errors import UserError
from kit.runtime import model_tensor

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "OnnxGraph", "torch_to_onnx"]

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass
class OnnxGraph:
    """An FP32 ONNX graph fresh from the PyTorch exporter.

    Attributes
    ----------
    proto : onnx.ModelProto
        The graph: one float32 input ``input`` (batch, C, H, W) with a dynamic batch, one output ``logits``.
    exporter : str
        ``"dynamo"`` (torch.export-based) or ``"torchscript"`` (the legacy exporter, only after the first failed).
    exporter_note : str
        Why the legacy exporter ran (empty when it did not).
    opset : int
    seconds : float
        Time the export took.
    """

    proto: onnx.ModelProto
    exporter: str
    exporter_note: str
    opset: int
    seconds: float


@contextlib.contextmanager
def _quiet_torch_exporter() -> Iterator[None]:
    """Keep the exporter's chatter off the user's terminal.

    The exporter logs every optimisation pass at INFO (``onnx_ir``, ``onnxscript``), warns about optional libraries it
    does not need (torchvision ops) and raises internal deprecation warnings; real failures still raise.
    """
    names = ("torch.onnx._internal.exporter._registration", "onnx_ir", "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, before):
            lg.setLevel(level)


def torch_to_onnx(model: nn.Module, input_shape: Sequence[int], *, opset: int = DEFAULT_OPSET,
                  dynamo: bool = True) -> OnnxGraph:
    """Export ``model`` (in eval mode, on the CPU) to an FP32 ONNX graph with a dynamic batch dimension.

    Parameters
    ----------
    model : nn.Module
        Takes (N, C, H, W) pixels in [0, 1], returns logits (N, K). A copy is exported; the model is not modified.
    input_shape : sequence of int
        (C, H, W).
    opset : int
        ONNX opset, >= 18.
    dynamo : bool
        Try the current (torch.export-based) exporter first; ``False`` goes straight to the legacy one.

    Returns
    -------
    OnnxGraph
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise UserError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    params = model_tensor(model)
    on_cpu = params is None or params.device.type == "cpu"
    m = (model if on_cpu else copy.deepcopy(model).cpu()).eval()
    c, h, w = (int(v) for v in input_shape)
    example = torch.rand(2, c, h, w, generator=torch.Generator().manual_seed(0))
    note = ""
    t0 = time.perf_counter()
    proto: onnx.ModelProto | None = None
    if dynamo:
        try:
            with _quiet_torch_exporter(), torch.no_grad():
                program = torch.onnx.export(
                    m, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                    verbose=False,
                )
            if program is None:
                raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
            proto = program.model_proto
        except Exception as e:  # any failure of the new exporter sends us to the legacy one  # noqa: BLE001
            note = f"dynamo exporter failed ({first_line(e)})"
            log.warning("ONNX export: %s; falling back to the legacy TorchScript exporter", note)
    exporter = "dynamo"
    if proto is None:
        exporter = "torchscript"
        note = note or "legacy exporter requested"
        with tempfile.TemporaryDirectory(prefix="otkit-onnx-") as tmp:
            path = Path(tmp, "model.onnx")
            with _quiet_torch_exporter(), torch.no_grad():
                torch.onnx.export(
                    m, (example,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    do_constant_folding=True,
                )
            proto = onnx.load(str(path))
    got = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if got < MIN_OPSET:
        raise RuntimeError(f"the {exporter} exporter wrote opset {got}, below the required {MIN_OPSET}")
    return OnnxGraph(proto=proto, exporter=exporter, exporter_note=note, opset=got, seconds=time.perf_counter() - t0)
