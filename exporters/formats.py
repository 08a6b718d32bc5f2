"""The closed vocabularies of export: formats, precisions, engine file types, and the metadata keys.

This module imports nothing heavy (no torch, no onnx), so the CLI can build its ``click.Choice`` lists from it while
``otkit --help`` stays fast.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from kit.errors import UserError

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_OPSET",
    "ENGINE_SUFFIXES",
    "META_PREFIX",
    "MIN_OPSET",
    "ORT_PROVIDERS",
    "ExportFormat",
    "Precision",
    "engine_kind",
    "resolve_precision",
]

#: Opset of the exported ONNX graphs (the dynamo exporter targets 18 and later).
DEFAULT_OPSET = 18
MIN_OPSET = 18
#: Largest batch an engine runs in one call unless told otherwise (runners split bigger batches).
DEFAULT_MAX_BATCH = 256
#: Prefix of every ``metadata_props`` key the kit writes into an ONNX file.
META_PREFIX = "otkit."


class ExportFormat(str, Enum):
    """What ``otkit export --format`` writes."""

    ONNX = "onnx"
    ONNX_FP16 = "onnx-fp16"
    ONNX_INT8 = "onnx-int8"
    TENSORRT = "tensorrt"


class Precision(str, Enum):
    """Numeric precision of an exported artifact (weights and compute; inputs and outputs stay float32)."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


_FORMAT_PRECISION = {
    ExportFormat.ONNX: Precision.FP32,
    ExportFormat.ONNX_FP16: Precision.FP16,
    ExportFormat.ONNX_INT8: Precision.INT8,
}


def resolve_precision(fmt: ExportFormat | str, precision: Precision | str | None) -> Precision:
    """The precision an export runs at: implied by the ONNX formats, chosen (default fp32) for TensorRT.

    Raises
    ------
    UserError
        If ``precision`` contradicts an ONNX format (``--format onnx-fp16 --precision int8``).
    """
    fmt = ExportFormat(fmt)
    chosen = Precision(precision) if precision is not None else None
    implied = _FORMAT_PRECISION.get(fmt)
    if implied is None:
        return chosen or Precision.FP32
    if chosen is not None and chosen is not implied:
        raise UserError(
            f"--format {fmt.value} is {implied.value} by definition; --precision {chosen.value} contradicts it "
            f"(use --format onnx, onnx-fp16 or onnx-int8, or --format tensorrt --precision {chosen.value})"
        )
    return implied


#: Short provider names (CLI, :func:`exporters.engines.load_engine`) -> ONNX Runtime execution providers.
ORT_PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

#: File suffixes that :func:`engine_kind` recognises, by runner.
ENGINE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "torch": (".safetensors", ".pt", ".pth"),
    "onnx": (".onnx",),
    "tensorrt": (".engine", ".plan", ".trt"),
}


def engine_kind(path: str | Path) -> str:
    """``"torch"``, ``"onnx"`` or ``"tensorrt"`` from a file's suffix.

    Raises
    ------
    UserError
        For a suffix that names none of them.
    """
    suffix = Path(path).suffix.lower()
    for kind, suffixes in ENGINE_SUFFIXES.items():
        if suffix in suffixes:
            return kind
    known = ", ".join(s for group in ENGINE_SUFFIXES.values() for s in group)
    raise UserError(f"{path}: unknown engine file type {suffix or '(no suffix)'!r}; expected one of {known}")
