"""The ONNX backend: export a twin to a checked ONNX file, and run ONNX files with ONNX Runtime.

* :mod:`exporters.onnx.export`: :func:`torch_to_onnx`, ``torch.onnx.export`` (dynamo, legacy fallback) -> FP32 graph;
* :mod:`exporters.onnx.quantize`: float16 and int8 Q/DQ graphs;
* :mod:`exporters.onnx.metadata`: the kit's ``otkit.*`` metadata (build, set, read);
* :mod:`exporters.onnx.write`: :func:`write_onnx_export` / :func:`export_onnx`, convert, stamp, check, parity, write;
* :mod:`exporters.onnx.model`: :func:`validate_onnx`, :func:`engine_sha256`, :func:`describe_onnx`;
* :mod:`exporters.onnx.runner`: :class:`OnnxRuntimeEngine`.

Parsing a file (:func:`load_onnx`, external data) and its interface are shared with the TensorRT build and live in
:mod:`exporters.graph`; they are re-exported here. This package never imports :mod:`exporters.tensorrt` or the
factory :mod:`exporters.engines`.

The names below are imported on first use (PEP 562): running a file (:class:`OnnxRuntimeEngine`) or hashing it
(:func:`engine_sha256`) imports neither ``onnx`` nor the exporter, which the other modules need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kit.runtime import lazy_exports

if TYPE_CHECKING:
    from exporters.graph import external_data_files, load_onnx, read_metadata
    from exporters.onnx.export import INPUT_NAME, OUTPUT_NAME, OnnxGraph, torch_to_onnx
    from exporters.onnx.metadata import FORMAT_TAG, build_metadata, set_metadata
    from exporters.onnx.model import describe_onnx, engine_sha256, validate_onnx
    from exporters.onnx.runner import PROVIDERS, OnnxRuntimeEngine
    from exporters.onnx.write import OnnxExport, export_onnx, write_onnx_export

__all__ = [
    "FORMAT_TAG",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "PROVIDERS",
    "OnnxExport",
    "OnnxGraph",
    "OnnxRuntimeEngine",
    "build_metadata",
    "describe_onnx",
    "engine_sha256",
    "export_onnx",
    "external_data_files",
    "load_onnx",
    "read_metadata",
    "set_metadata",
    "torch_to_onnx",
    "validate_onnx",
    "write_onnx_export",
]

#: where each public name lives
_WHERE = {
    "external_data_files": "exporters.graph", "load_onnx": "exporters.graph", "read_metadata": "exporters.graph",
    "INPUT_NAME": "exporters.onnx.export", "OUTPUT_NAME": "exporters.onnx.export", "OnnxGraph": "exporters.onnx.export",
    "torch_to_onnx": "exporters.onnx.export",
    "FORMAT_TAG": "exporters.onnx.metadata", "build_metadata": "exporters.onnx.metadata",
    "set_metadata": "exporters.onnx.metadata",
    "describe_onnx": "exporters.onnx.model", "engine_sha256": "exporters.onnx.model",
    "validate_onnx": "exporters.onnx.model",
    "PROVIDERS": "exporters.onnx.runner", "OnnxRuntimeEngine": "exporters.onnx.runner",
    "OnnxExport": "exporters.onnx.write", "export_onnx": "exporters.onnx.write",
    "write_onnx_export": "exporters.onnx.write",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
