"""Writing a checked ONNX export: :func:`write_onnx_export` finishes a graph into a file, :func:`export_onnx` does both
steps from a twin.

1. :func:`exporters.onnx.torch_to_onnx` exports the twin to an FP32 graph.
2. Reduced precision, when asked for (:mod:`exporters.onnx.quantize`): float16, or static int8 Q/DQ calibrated on
   dataset samples.
3. :func:`write_onnx_export`: the kit's metadata goes into ``metadata_props`` (twin weights sha256, architecture,
   classes, input shape and range, kit version, precision, exporter), then ``onnx.checker.check_model(full_check=True)``
   and strict shape inference, then parity against the twin on real samples through :class:`OnnxRuntimeEngine`. An
   FP32 export beyond tolerance raises :class:`exporters.parity.ParityError` with the numbers and writes nothing; fp16
   and int8 exports report their agreement and logit gap. The file is written atomically.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import kit
from exporters.base import check_max_batch
from exporters.formats import DEFAULT_MAX_BATCH, DEFAULT_OPSET, Precision
from exporters.graph import static_dim
from exporters.onnx.export import OnnxGraph, torch_to_onnx
from exporters.onnx.metadata import build_metadata, model_record, read_metadata, set_metadata
from exporters.onnx.model import validate_onnx
from exporters.onnx.runner import OnnxRuntimeEngine
from exporters.parity import ParityError, ParityReport, measure_parity
from kit.errors import UserError
from kit.io import atomic_write
from kit.runtime import model_device

if TYPE_CHECKING:
    from kit.checkpoint import CheckpointInfo

__all__ = ["OnnxExport", "export_onnx", "write_onnx_export"]


@dataclass
class OnnxExport:
    """A written ONNX export and its checks.

    Attributes
    ----------
    path : Path
    precision : str
    exporter : str
        ``"dynamo"`` or ``"torchscript"``.
    exporter_note : str
    opset : int
    sha256 : str
        ``"sha256:<hex>"`` of the file.
    size_bytes : int
    parity : ParityReport
    metadata : dict
        The ``otkit.*`` metadata as written (decoded).
    seconds : dict
        Wall time of ``export``, ``convert`` (fp16/int8), ``check`` and ``parity``.
    """

    path: Path
    precision: str
    exporter: str
    exporter_note: str
    opset: int
    sha256: str
    size_bytes: int
    parity: ParityReport
    metadata: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"path": str(self.path), "format": "onnx", "precision": self.precision, "exporter": self.exporter,
                "exporter_note": self.exporter_note, "opset": self.opset, "sha256": self.sha256,
                "size_bytes": self.size_bytes, "parity": self.parity.to_dict(),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def write_onnx_export(
    graph: OnnxGraph,
    out: str | Path,
    twin: nn.Module,
    parity_x: torch.Tensor,
    *,
    info: CheckpointInfo | None = None,
    precision: Precision | str = Precision.FP32,
    parity_y: torch.Tensor | None = None,
    calibration_x: torch.Tensor | None = None,
    calibration: dict[str, Any] | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> OnnxExport:
    """Convert (fp16/int8), stamp metadata, self-check, check parity against ``twin``, then write ``out`` atomically.

    Parameters
    ----------
    graph : OnnxGraph
        An FP32 export of ``twin`` (:func:`torch_to_onnx`); it can serve several precisions.
    out : str or Path
        Destination ``.onnx`` file; nothing is written unless every check passes.
    twin : nn.Module
        The reference model; its logits on ``parity_x`` are compared to ONNX Runtime's (CPU).
    parity_x : torch.Tensor
        Real samples (N, C, H, W) in [0, 1], preferably from the test split.
    info : CheckpointInfo, optional
        The twin's checkpoint metadata (weights sha256, classes, ...); without it they come from the model.
    precision : Precision or str
        ``fp32``, ``fp16`` or ``int8``.
    parity_y : torch.Tensor, optional
        Labels of ``parity_x``, to report accuracies.
    calibration_x : torch.Tensor, optional
        int8 only (required there): calibration samples, preferably from the training split.
    calibration : dict, optional
        Where the calibration samples came from (recorded in the metadata).
    max_batch : int
        Largest batch the runner sends in one call (recorded in the metadata).

    Raises
    ------
    ParityError
        An FP32 export whose logits are beyond tolerance (nothing is written).
    """
    from exporters.onnx import quantize

    precision = Precision(precision)
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise UserError(f"ONNX output must end in .onnx: {out}")
    max_batch = check_max_batch(max_batch)
    seconds = {"export": graph.seconds}
    t0 = time.perf_counter()
    if precision is Precision.FP16:
        proto = quantize.to_fp16(graph.proto)
    elif precision is Precision.INT8:
        if calibration_x is None or len(calibration_x) == 0:
            raise UserError("int8 export needs calibration samples")
        calib = calibration_x.detach().to("cpu", torch.float32).numpy()
        proto = quantize.to_int8(graph.proto, calib)
        calibration = {"samples": len(calib), **(calibration or {})}
    else:
        proto = copy.deepcopy(graph.proto)
    seconds["convert"] = time.perf_counter() - t0
    num_classes = static_dim(graph.proto.graph.output[0], 1)
    if num_classes is None:
        raise RuntimeError("the exported graph has no static class dimension")
    record = model_record(twin, info, num_classes)
    meta = build_metadata(record, precision=precision, graph=graph, max_batch=max_batch,
                          calibration=calibration if precision is Precision.INT8 else None)
    set_metadata(proto, meta)
    proto.doc_string = f"otkit {kit.__version__}: {record['arch_name']} ({precision.value}), pixels in [0, 1] NCHW"
    t0 = time.perf_counter()
    validate_onnx(proto)
    seconds["check"] = time.perf_counter() - t0
    data = proto.SerializeToString()
    t0 = time.perf_counter()
    engine = OnnxRuntimeEngine(data, name=out.name, providers=["cpu"], max_batch=max_batch)
    twin_dev = model_device(twin)
    parity = measure_parity(twin.eval(), engine, parity_x.to(twin_dev), precision=precision,
                            name=engine.name, labels=parity_y, runtime="onnxruntime", batch_size=max_batch)
    seconds["parity"] = time.perf_counter() - t0
    if not parity.passed:
        raise ParityError(parity)
    with atomic_write(out) as f:
        f.write(data)
    return OnnxExport(path=out, precision=precision.value, exporter=graph.exporter, exporter_note=graph.exporter_note,
                      opset=graph.opset, sha256="sha256:" + hashlib.sha256(data).hexdigest(), size_bytes=len(data),
                      parity=parity, metadata=read_metadata(proto), seconds=seconds)


def export_onnx(
    twin: nn.Module,
    out: str | Path,
    parity_x: torch.Tensor,
    *,
    info: CheckpointInfo | None = None,
    precision: Precision | str = Precision.FP32,
    parity_y: torch.Tensor | None = None,
    calibration_x: torch.Tensor | None = None,
    calibration: dict[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
    max_batch: int = DEFAULT_MAX_BATCH,
    dynamo: bool = True,
) -> OnnxExport:
    """Export ``twin`` to ``out`` at ``precision`` and check it (:func:`torch_to_onnx` + :func:`write_onnx_export`).

    ``twin`` must take (N, C, H, W) pixels in [0, 1]; its input shape is that of ``parity_x``.
    """
    graph = torch_to_onnx(twin, tuple(parity_x.shape[1:]), opset=opset, dynamo=dynamo)
    return write_onnx_export(graph, out, twin, parity_x, info=info, precision=precision, parity_y=parity_y,
                             calibration_x=calibration_x, calibration=calibration, max_batch=max_batch)
