"""Export a checkpoint file in one call: load the twin, pick parity and calibration data, export, check.

``otkit export`` and ``otkit run`` both go through :func:`export_checkpoint`. This is where the two backends meet:
:func:`export_tensorrt` writes the ONNX file (:mod:`exporters.onnx`) that the TensorRT build (:mod:`exporters.tensorrt`)
starts from; neither backend imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from exporters.formats import DEFAULT_MAX_BATCH, DEFAULT_OPSET, ExportFormat, Precision, resolve_precision
from exporters.parity import ParityReport
from kit.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from exporters.tensorrt import TensorRTExport
    from kit.checkpoint import CheckpointInfo

__all__ = ["CheckpointExport", "export_checkpoint", "export_tensorrt", "fitting_dataset", "output_suffixes"]


@dataclass
class CheckpointExport:
    """What :func:`export_checkpoint` wrote.

    Attributes
    ----------
    path : Path
        The artifact (``.onnx``, or the TensorRT engine).
    format : str
    precision : str
    sha256 : str
        ``sha256:<hex>`` of the artifact.
    reports : list of (file name, exporter, ParityReport)
        One per file checked against the twin (a TensorRT export checks its ONNX file and the engine).
    result : Any
        The exporter's own result (:class:`exporters.onnx.OnnxExport` or :class:`exporters.tensorrt.TensorRTExport`).
    data_spec : str
        Dataset of the parity check.
    weights_sha256 : str
        The twin's weights hash.
    """

    path: Path
    format: str
    precision: str
    sha256: str
    reports: list[tuple[str, str, ParityReport]]
    result: Any
    data_spec: str
    weights_sha256: str


def output_suffixes(fmt: ExportFormat | str) -> tuple[str, ...]:
    """File suffixes an export to ``fmt`` may be written to."""
    return (".engine", ".plan", ".trt") if ExportFormat(fmt) is ExportFormat.TENSORRT else (".onnx",)


def fitting_dataset(spec: str, split: str, input_shape: Any, num_classes: int, what: str, samples: int, seed: int,
                    notice: bool = True):
    """A seeded subset of ``spec``'s split, refused before any work if it does not fit the model. ``notice``: say so
    when ``samples`` is more than the split holds (off where ``samples`` is a default the user did not ask for)."""
    from kit.data import load_dataset

    ds = load_dataset(spec, split, seed=0)
    ds.require_fit(input_shape, num_classes, what)
    return ds.subset(samples, seed=seed, notice=notice)


def export_tensorrt(
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
    workspace_mib: int = 1024,
    timing_cache: str | Path | None = None,
    device: str | torch.device | None = None,
) -> TensorRTExport:
    """Twin -> checked ONNX file (``OUT.<precision>.onnx``) -> TensorRT engine ``OUT`` + sidecar, parity-checked.

    TensorRT and a GPU are checked first, before any work. The ONNX file is written at the precision the installed
    TensorRT builds from (:func:`exporters.tensorrt.network_plan`), then :func:`exporters.tensorrt.write_tensorrt_export`
    builds the engine and measures its parity against the twin from the freshly built bytes; an FP32 engine beyond
    tolerance raises :class:`exporters.parity.ParityError` and no engine is written.
    """
    from exporters.onnx import export_onnx
    from exporters.tensorrt import network_plan, require_tensorrt, write_tensorrt_export

    version, dev = require_tensorrt(device)
    out = Path(out)
    if out.suffix.lower() not in (".engine", ".plan", ".trt"):
        raise UserError(f"TensorRT output must end in .engine, .plan or .trt: {out}")
    precision = Precision(precision)
    plan = network_plan(int(version.split(".")[0]), precision)
    onnx_path = out.with_suffix(f".{plan.onnx_precision}.onnx")
    onnx_export = export_onnx(twin, onnx_path, parity_x, info=info, precision=plan.onnx_precision, parity_y=parity_y,
                              calibration_x=calibration_x, calibration=calibration, opset=opset, max_batch=max_batch)
    return write_tensorrt_export(onnx_path, out, twin, parity_x, precision=precision, parity_y=parity_y,
                                 max_batch=max_batch, workspace_mib=workspace_mib, timing_cache=timing_cache,
                                 device=dev, onnx_export=onnx_export)


def export_checkpoint(
    checkpoint: str | Path,
    fmt: ExportFormat | str,
    out: str | Path,
    *,
    precision: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    data_spec: str | None = None,
    samples: int = 256,
    calibration_samples: int = 256,
    opset: int = DEFAULT_OPSET,
    workspace_mib: int = 1024,
    timing_cache: str | Path | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    arch: str | None = None,
) -> CheckpointExport:
    """Export ``checkpoint`` to ``fmt`` at ``out``, checked against the twin on ``samples`` test examples.

    Parameters
    ----------
    checkpoint : path
        A ``.safetensors`` (or ``.pt``) checkpoint written by the kit.
    fmt : {"onnx", "onnx-fp16", "onnx-int8", "tensorrt"}
    out : path
        ``.onnx``, or ``.engine`` / ``.plan`` / ``.trt`` for TensorRT (its ONNX file and sidecar go beside).
    precision : str, optional
        TensorRT precision; the ONNX formats imply theirs.
    data_spec : str, optional
        Dataset of the parity check (test split) and int8 calibration (train split); default: the checkpoint's.
    arch : str, optional
        ``FILE.py:NAME`` for a checkpoint whose architecture is a user's Python file (``--arch``): imported only when
        named here and matching the checkpoint's record; see :func:`kit.checkpoint.load_twin`.

    Raises
    ------
    UserError
        Bad options, data that does not fit the model, TensorRT or a GPU missing for a TensorRT export, a file
        architecture without a matching ``arch``.
    exporters.parity.ParityError
        An FP32 export beyond tolerance from its twin (nothing is written).
    """
    from kit.checkpoint import load_twin
    from kit.runtime import phase

    prec = resolve_precision(fmt, precision)
    trt = ExportFormat(fmt) is ExportFormat.TENSORRT
    out = Path(out)
    suffixes = output_suffixes(fmt)
    if out.suffix.lower() not in suffixes:
        raise UserError(f"the output of a {ExportFormat(fmt).value} export must end in {' or '.join(suffixes)}: {out}")
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: folder {out.parent} does not exist")
    if trt:
        from exporters.tensorrt import require_tensorrt

        require_tensorrt(device)  # TensorRT, a GPU and a CUDA device, before any work
    model, info = load_twin(checkpoint, device=device, arch=arch)
    spec = info.data_spec(data_spec, str(checkpoint))
    test = fitting_dataset(spec, "test", info.input_shape, info.num_classes, str(checkpoint), samples, seed)
    calib = calibration = None
    if prec.value == "int8":
        train = fitting_dataset(spec, "train", info.input_shape, info.num_classes, str(checkpoint),
                                calibration_samples, seed)
        calib, calibration = train.x, {"spec": spec, "split": "train", "fingerprint": train.fingerprint, "seed": seed}
    kwargs: dict[str, Any] = dict(info=info, precision=prec, parity_y=test.y, calibration_x=calib,
                                  calibration=calibration, opset=opset, max_batch=max_batch)
    if trt:
        with phase(f"export {out.name}: ONNX, TensorRT build, checks and parity"):
            result: Any = export_tensorrt(model, out, test.x, workspace_mib=workspace_mib,
                                          timing_cache=timing_cache, device=device, **kwargs)
        reports = [(result.onnx.path.name, result.onnx.exporter, result.onnx.parity),
                   (out.name, "tensorrt " + result.sidecar["tensorrt_version"], result.parity)]
        sha = result.sidecar["engine_sha256"]
    else:
        from exporters.onnx import export_onnx

        with phase(f"export {out.name}: ONNX {prec.value}, checks and parity"):
            result = export_onnx(model, out, test.x, **kwargs)
        reports = [(out.name, result.exporter, result.parity)]
        sha = result.sha256
    return CheckpointExport(path=out, format=ExportFormat(fmt).value, precision=prec.value, sha256=sha,
                            reports=reports, result=result, data_spec=spec,
                            weights_sha256=info.weights_sha256)
