"""The TensorRT backend: build a serialized engine from an otkit ONNX file, describe it in a JSON sidecar, and run it.

* :mod:`exporters.tensorrt.environment`: TensorRT and GPU availability, the sidecar, the check that an engine was built
  for this machine's GPU model and TensorRT version;
* :mod:`exporters.tensorrt.build`: :func:`build_engine` (ONNX file -> engine bytes + sidecar record),
  :func:`write_tensorrt_export` (build, parity against the twin, write);
* :mod:`exporters.tensorrt.runner`: :class:`TensorRTEngine`;
* :mod:`exporters.tensorrt.describe`: :func:`describe_engine`.

The build starts from an ONNX file already written; this package never imports :mod:`exporters.onnx` (what both read
from an ONNX file is in :mod:`exporters.graph`) nor the factory :mod:`exporters.engines`. Exporting a twin all the way
is :func:`exporters.checkpoint.export_tensorrt`.

TensorRT (and CUDA) are imported inside the functions that need them; this package imports without them. Its TensorRT
calls are type-checked against the ``tensorrt-stubs`` package (TensorRT 10 API) by ``tests/test_engines.py``.
"""

from __future__ import annotations

from exporters.tensorrt.build import (
    DEFAULT_WORKSPACE_MIB,
    NetworkPlan,
    TensorRTExport,
    build_engine,
    network_plan,
    write_tensorrt_export,
)
from exporters.tensorrt.describe import describe_engine
from exporters.tensorrt.environment import (
    INSTALL_HINT,
    SIDECAR_FORMAT,
    check_environment,
    current_environment,
    read_sidecar,
    require_tensorrt,
    sidecar_path,
    tensorrt_version,
)
from exporters.tensorrt.runner import TensorRTEngine

__all__ = [
    "DEFAULT_WORKSPACE_MIB",
    "INSTALL_HINT",
    "SIDECAR_FORMAT",
    "NetworkPlan",
    "TensorRTEngine",
    "TensorRTExport",
    "build_engine",
    "check_environment",
    "current_environment",
    "describe_engine",
    "network_plan",
    "read_sidecar",
    "require_tensorrt",
    "sidecar_path",
    "tensorrt_version",
    "write_tensorrt_export",
]
