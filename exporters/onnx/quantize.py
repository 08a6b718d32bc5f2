"""Reduced-precision ONNX graphs, as deployed engines really run: float16, and static int8 with Q/DQ nodes.

* :func:`to_fp16` stores weights and computes in float16 while the graph's input and output stay float32 (ONNX
  Runtime's float16 converter with ``keep_io_types``, then a topological re-sort of the nodes it appends).
* :func:`to_int8` quantises statically in the Q/DQ format with ONNX Runtime's quantisation tools: symmetric int8
  activations and per-channel symmetric int8 weights (what TensorRT's explicit quantisation expects), with min/max
  ranges calibrated on real dataset samples.

Both take and return an ``onnx.ModelProto`` of an FP32 export (:func:`exporters.onnx.torch_to_onnx`).

Notes
-----
ONNX Runtime's CPU provider has float16 kernels for only some operators; for the others it inserts casts and computes
in float32, so on the CPU an fp16 graph shows the rounding of float16 weights and activations, not float16
accumulation. On CUDA and TensorRT the same file computes in float16.
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

__all__ = ["quantized_op_types", "to_fp16", "to_int8", "topological_sort"]

log = logging.getLogger(__name__)


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` in place so that every node comes after the producers of its inputs.

    Stable: among nodes that are ready at the same time, the original order wins. Raises ``ValueError`` on a cycle.
    """
    nodes = list(graph.node)
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.output:
            if name:
                producer[name] = i
    users: dict[int, list[int]] = {}
    indegree = [0] * len(nodes)
    for i, node in enumerate(nodes):
        deps = {producer[name] for name in node.input if name in producer}
        indegree[i] = len(deps)
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = [i for i, k in enumerate(indegree) if k == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            indegree[u] -= 1
            if indegree[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ValueError(f"graph {graph.name!r} has a cycle: {len(nodes) - len(order)} node(s) cannot be ordered")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of an FP32 graph: float16 weights and compute, float32 input and output.

    Parameters
    ----------
    model : onnx.ModelProto
        FP32 graph; left unchanged.

    Returns
    -------
    onnx.ModelProto
        The converted graph, with a Cast after the input and before the output, topologically sorted.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(copy.deepcopy(model), keep_io_types=True)
    topological_sort(converted.graph)
    return converted


def quantized_op_types() -> list[str]:
    """Operator types :func:`to_int8` quantises: ONNX Runtime's defaults, less BatchNormalization.

    A BatchNormalization that the exporter could not fold (pre-activation residual blocks) keeps float scale and bias;
    its 1-d parameters have no output-channel axis to quantise per channel, and TensorRT fuses it anyway.
    """
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted((set(QLinearOpsRegistry) | set(QDQRegistry)) - {"BatchNormalization"})


class _OnnxRuntimeChatter(logging.Filter):
    """Drop ONNX Runtime quantisation's INFO records, which it logs on the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "onnxruntime" not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    root = logging.getLogger()
    chatter = _OnnxRuntimeChatter()
    root.addFilter(chatter)
    try:
        yield
    finally:
        root.removeFilter(chatter)


def _calibration_reader(input_name: str, x: np.ndarray, batch_size: int) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        """Feeds the calibration samples in batches."""

        def __init__(self) -> None:
            self._batches = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
            self._it = iter(self._batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {input_name: batch}

        def rewind(self) -> None:
            self._it = iter(self._batches)

    return _Reader()


def pre_process(model: onnx.ModelProto) -> onnx.ModelProto:
    """The FP32 graph that :func:`to_int8` quantises: ONNX Runtime's graph optimisation and shape inference, as it
    recommends before quantising (folds constants, and normalisation into the first convolution where it can).
    ``model`` is left unchanged. Its float graph is what an int8 export's Q/DQ nodes dequantise back to
    (:mod:`exporters.onnx.compare`)."""
    with tempfile.TemporaryDirectory(prefix="otkit-int8-") as tmp:
        return onnx.load(str(_pre_process_file(model, Path(tmp))))


def _pre_process_file(model: onnx.ModelProto, folder: Path) -> Path:
    """:func:`pre_process`, written to ``folder`` (the file ONNX Runtime's quantiser reads)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, pre = folder / "fp32.onnx", folder / "pre.onnx"
    onnx.save(model, str(src))
    with _quiet_quantizer():
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    return pre


def to_int8(model: onnx.ModelProto, calibration: np.ndarray, *, batch_size: int = 64,
            per_channel: bool = True) -> onnx.ModelProto:
    """Static int8 Q/DQ quantisation of an FP32 graph, calibrated on real samples.

    Parameters
    ----------
    model : onnx.ModelProto
        FP32 graph with one float input; left unchanged.
    calibration : numpy.ndarray
        float32 samples (N, C, H, W) in [0, 1] from the training split; min/max of every quantised activation over
        them sets its scale.
    batch_size : int
        Samples per calibration run.
    per_channel : bool
        One weight scale per output channel (TensorRT's convention) instead of one per tensor.

    Returns
    -------
    onnx.ModelProto
        The quantised graph: QuantizeLinear/DequantizeLinear pairs around the quantised operators, int8 weights.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if calibration.ndim != 4 or len(calibration) == 0:
        raise ValueError(f"calibration samples must be a non-empty (N, C, H, W) array, got shape {calibration.shape}")
    input_name = model.graph.input[0].name
    samples = np.ascontiguousarray(calibration, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="otkit-int8-") as tmp, _quiet_quantizer():
        pre, out = _pre_process_file(model, Path(tmp)), Path(tmp, "int8.onnx")
        quantize_static(
            str(pre), str(out), _calibration_reader(input_name, samples, batch_size),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=quantized_op_types(), per_channel=per_channel,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
        quantized = onnx.load(str(out))
    # the pre-processing step declares every domain ONNX Runtime knows; keep the standard one and those in use
    used = {node.domain for node in quantized.graph.node}
    kept = [o for o in quantized.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    del quantized.opset_import[:]
    quantized.opset_import.extend(kept)
    log.debug("int8: %d QuantizeLinear nodes", sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node))
    return quantized
