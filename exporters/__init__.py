"""Export to ONNX and TensorRT, and the runners that execute exported artifacts.

The package imports nothing heavy itself (the CLI reads :mod:`exporters.formats` for its ``--help``); the names below
load their module on first use.

* :func:`load_engine` opens a checkpoint, an ONNX file or a TensorRT engine as an :class:`Engine`;
* :func:`export_onnx` / :func:`export_tensorrt` write checked exports (:mod:`exporters.onnx`; the TensorRT export,
  ONNX first, is orchestrated by :mod:`exporters.checkpoint` over :mod:`exporters.tensorrt`);
* :class:`TorchEngine`, :class:`OnnxRuntimeEngine`, :class:`TensorRTEngine` are the runners.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Engine": "exporters.base",
    "TorchEngine": "exporters.torch",
    "check_compatible": "exporters.engines",
    "load_engine": "exporters.engines",
    "OnnxRuntimeEngine": "exporters.onnx",
    "export_onnx": "exporters.onnx",
    "TensorRTEngine": "exporters.tensorrt",
    "export_tensorrt": "exporters.checkpoint",
    "ParityError": "exporters.parity",
    "ParityReport": "exporters.parity",
    "ExportFormat": "exporters.formats",
    "Precision": "exporters.formats",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'exporters' has no attribute {name!r}")
