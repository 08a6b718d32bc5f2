"""Is an ONNX file the kit's export of its twin? Export the twin again, the same way, and compare the two graphs.

Clean inputs only show what an engine does where they go: a file edited after its export (a trigger that adds logits
when a corner of the image holds a pattern, a bias raised on one class of an int8 file whose agreement stays high)
can match its twin on every clean example. The kit's exports are deterministic: the same twin, the same input shape,
opset and exporter, and the same versions of the packages that make the file (:data:`~exporters.onnx.metadata
.TOOLCHAIN`, recorded in the file's metadata) write the same graph, byte for byte. So :func:`compare_to_export`
exports the twin again as the file's metadata says it was exported and compares:

- **fp32, fp16**: the graphs must be identical (``identical``); where their bytes differ, :func:`compare_graphs` says
  where (``differs``), and a file whose operators, attributes, wiring and constants are the export's, with other names
  or its constants stored elsewhere (Constant nodes, external data), is ``equivalent``. A QuantizeLinear or
  DequantizeLinear there is an operator the export does not have.
- **int8**: the calibration that sets the activations' scales is not recorded, so the file is compared with the
  float graph it quantised (:func:`~exporters.onnx.quantize.pre_process` of the new export) after its Q/DQ nodes
  are read back (``equivalent``): the same operators, attributes and wiring; every constant of the float graph
  recovered by its DequantizeLinear within half a quantisation step; a Conv's or Gemm's weights at most at the step
  ONNX Runtime's symmetric per-channel rule sets (the channel's largest magnitude over 127, or the larger step it
  takes where the channel's int32 bias would overflow: a coarser step, per tensor or per channel, would let a weight
  move further); biases quantised at most at the product of their input's
  and weight's scales; weights stored as int8 and biases as int32 with zero points 0, as ONNX Runtime writes them (no
  QuantizeLinear of a constant); and each activation's QuantizeLinear -> DequantizeLinear pair rounding only, once
  (one positive per-tensor scale on both nodes, int8 zero points of 0: a pair that shifts, rescales or clips a class's
  logit differs). The values
  of the activations' scales are the calibration's and stay unchecked: a wrong one rounds or clips that activation for
  every input, which the audit's clean comparison with the twin sees.

Where the file is not a kit export, or was made with other package versions than this machine's, nothing is
compared (``not compared``, with the reason): a difference there would not be evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from exporters.formats import Precision
from exporters.graph import first_line, read_metadata
from exporters.onnx.metadata import FORMAT_TAG, toolchain

__all__ = ["GraphComparison", "compare_graphs", "compare_to_export"]

IDENTICAL, EQUIVALENT, DIFFERS, NOT_COMPARED = "identical", "equivalent", "differs", "not compared"
#: Relative slack on the int8 rules (float32 scales computed in another order)
_SLACK = 1e-4


@dataclass(frozen=True)
class GraphComparison:
    """The outcome of :func:`compare_to_export`: ``status`` (``identical``, ``equivalent``, ``differs`` or
    ``not compared``) and a sentence saying why."""

    status: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"status": self.status, "reason": self.reason}


@dataclass
class _Quantized:
    """A constant read back through its DequantizeLinear: the stored integers' bits, the scale of each element and the
    axis of a per-channel scale (None per tensor)."""

    bits: int
    step: np.ndarray
    axis: int | None


#: A Constant node's ``value_*`` attributes and the tensor type ONNX gives them
_CONSTANT_TYPES = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
                   "value_ints": np.int64}


def _check_scale(scale: np.ndarray, what: str) -> None:
    """ValueError unless every quantisation scale of ``what`` is finite and positive (a NaN step passes every bound)."""
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(f"{what} has a quantisation scale that is not finite and positive")


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name not in _CONSTANT_TYPES:  # sparse_value, value_string(s): nothing the kit's exports write
        raise ValueError(f"Constant {node.name or node.output[0]!r} holds a {attr.name}, which the export never has")
    return np.asarray(onnx.helper.get_attribute_value(attr), dtype=_CONSTANT_TYPES[attr.name])


class _Canonical:
    """A graph read as the function it computes: its nodes in order (Constant nodes folded into constants and, with
    ``quantized``, the Q/DQ nodes of an int8 file read back), what each node input is (a graph input, a node's output
    or a constant) and the constants' values.

    Without ``quantized`` (fp32, fp16) a QuantizeLinear or DequantizeLinear is a node like any other, which the float
    export does not have. With it, a DequantizeLinear of a constant becomes that constant's float value (its step kept
    for the comparison), and a QuantizeLinear -> DequantizeLinear pair on an activation becomes the activation itself,
    provided the pair rounds only: one positive per-tensor scale shared by both nodes and zero points of 0, as the
    kit's symmetric int8 export writes them (a pair that shifts or rescales is a change of the function). Raises
    :class:`ValueError` for quantisation the kit's exports never write, and KeyError / IndexError for Q/DQ nodes that
    cannot be read back.
    """

    def __init__(self, graph: onnx.GraphProto, quantized: bool = False) -> None:
        self.const: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.quantized: dict[str, _Quantized] = {}
        self.alias: dict[str, str] = {}
        self.act_scale: dict[str, float] = {}  # a dequantized activation: its scale
        self.inputs = [i.name for i in graph.input if i.name not in self.const]
        quantized_act: dict[str, onnx.NodeProto] = {}
        self.nodes: list[onnx.NodeProto] = []
        for node in graph.node:
            ins = list(node.input)
            if node.op_type == "Constant":
                self.const[node.output[0]] = _constant_node_value(node)
            elif not quantized or node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                self.nodes.append(node)
            elif {a.name for a in node.attribute} - {"axis"}:  # block_size, output_dtype, saturate: not the kit's
                raise ValueError(f"{node.op_type} {node.name or node.output[0]!r} has attribute(s) "
                                 f"{sorted({a.name for a in node.attribute} - {'axis'})} that the kit's int8 exports "
                                 "never write")
            elif node.op_type == "QuantizeLinear" and ins[0] in self.const:
                raise ValueError(f"QuantizeLinear {node.name or node.output[0]!r} quantises a constant: the kit's "
                                 "int8 exports store quantised weights as integers")
            elif node.op_type == "QuantizeLinear":
                if ins[0] in self.alias:
                    raise ValueError(f"the activation {self.alias[ins[0]]!r} is quantised twice in a row")
                quantized_act[node.output[0]] = node
            elif ins[0] in quantized_act:
                self.act_scale[node.output[0]] = self._rounding_pair(quantized_act[ins[0]], node)
                self.alias[node.output[0]] = quantized_act[ins[0]].input[0]
            else:
                q, scale = self.const[ins[0]], self.const[ins[1]].astype(np.float64)
                zp = self._zero_point(ins)
                if q.dtype not in (np.int8, np.int32) or zp.dtype != q.dtype or np.any(zp != 0):
                    raise ValueError(f"the constant {ins[0]!r} is stored as {q.dtype} with zero point {zp.dtype} "
                                     f"{zp.reshape(-1)[:3].tolist()}: the kit's int8 exports store weights as int8 "
                                     "and biases as int32, with zero points 0")
                _check_scale(scale, f"the constant {ins[0]!r}")
                axis = self._axis(node, scale, q.ndim)
                step = np.broadcast_to(self._shaped(scale, axis, q.ndim), q.shape)
                self.const[node.output[0]] = q.astype(np.float64) * step
                self.quantized[node.output[0]] = _Quantized(q.dtype.itemsize * 8, step, axis)
        self.where: dict[str, tuple[int, int]] = {}
        self.bias_of: set[str] = set()  # constants some Conv, ConvTranspose or Gemm takes as its bias
        for i, node in enumerate(self.nodes):
            for k, name in enumerate(node.output):
                self.where[name] = (i, k)
            if node.op_type in _BIASED and len(node.input) > 2:
                self.bias_of.add(node.input[2])
        self.outputs = [self.ref(o.name) for o in graph.output]

    def _rounding_pair(self, q: onnx.NodeProto, dq: onnx.NodeProto) -> float:
        """The scale of an activation's Q -> DQ pair that only rounds (see the class); ValueError otherwise."""
        scales = [self.const[n.input[1]] for n in (q, dq)]
        zeros = [self._zero_point(list(n.input)) for n in (q, dq)]
        if any(s.size != 1 for s in scales) or float(scales[0].flat[0]) != float(scales[1].flat[0]):
            raise ValueError(f"the activation {q.input[0]!r} is quantised and dequantised at different scales")
        _check_scale(scales[0], f"the activation {q.input[0]!r}")
        if any(z.dtype != np.int8 or z.size != 1 or int(z.flat[0]) != 0 for z in zeros):
            raise ValueError(f"the activation {q.input[0]!r} has a zero point other than int8 0 (the kit's int8 "
                             f"exports are symmetric; {[f'{z.dtype} {z.reshape(-1)[:1].tolist()}' for z in zeros]}): "
                             "another type or value clips it elsewhere")
        return float(scales[0].flat[0])

    def _zero_point(self, ins: list[str]) -> np.ndarray:
        """A Q/DQ node's zero point; without one, ONNX's default (uint8 0)."""
        return self.const[ins[2]] if len(ins) > 2 and ins[2] else np.zeros((), np.uint8)

    @staticmethod
    def _axis(node: onnx.NodeProto, scale: np.ndarray, ndim: int) -> int | None:
        if scale.size <= 1:
            return None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if not -ndim <= axis < ndim:
            raise ValueError(f"{node.op_type} {node.name or node.output[0]!r} has {scale.size} scales along axis "
                             f"{axis} of a rank-{ndim} tensor")
        return axis % ndim

    @staticmethod
    def _shaped(v: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
        if axis is None:
            return np.asarray(v).reshape(())
        shape = [1] * ndim
        shape[axis] = -1
        return np.asarray(v).reshape(shape)

    def ref(self, name: str) -> tuple[Any, ...]:
        """What a node input is: ("input", k), ("node", i, k), ("const", name) or ("none",)."""
        while name in self.alias:
            name = self.alias[name]
        if not name:
            return ("none",)
        if name in self.const:
            return ("const", name)
        if name in self.where:
            return ("node", *self.where[name])
        if name in self.inputs:
            return ("input", self.inputs.index(name))
        return ("unknown", name)


def _attributes(node: onnx.NodeProto) -> list[tuple[str, bytes]]:
    return sorted((a.name, a.SerializeToString()) for a in node.attribute)


def _group_max(ref: np.ndarray, axis: int | None) -> np.ndarray:
    """The largest magnitude of the reference over each quantisation group (the channel of ``axis``, else all)."""
    mag = np.abs(ref.astype(np.float64))
    if axis is None or mag.ndim == 0:
        return np.broadcast_to(mag.max(initial=0.0), mag.shape)
    other = tuple(d for d in range(mag.ndim) if d != axis)
    return np.broadcast_to(mag.max(axis=other, keepdims=True, initial=0.0), mag.shape)


def _output_channel_axis(node: onnx.NodeProto, k: int, q: _Quantized) -> int | None:
    """The axis along which the kit's int8 export scales input ``k`` of ``node``: the output channels of a Conv's,
    ConvTranspose's or Gemm's weights (per-channel quantisation), whatever axis the file declares (a per-tensor scale
    there would be coarser for every channel but the largest); the file's own axis elsewhere."""
    if k == 1 and node.op_type == "Conv":
        return 0
    if k == 1 and node.op_type == "ConvTranspose":
        return 1
    if k == 1 and node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return q.axis


def compare_graphs(engine: onnx.GraphProto, reference: onnx.GraphProto, quantized: bool = False) -> str | None:
    """The first difference between ``engine`` and the float graph ``reference`` as a sentence, or None where
    ``engine`` computes ``reference``'s function (module docstring): the same operators in the same order, with the
    same attributes and wiring, the same graph inputs and outputs, and equal constants. With ``quantized`` (an int8
    file), its Q/DQ nodes are read back first (:class:`_Canonical`), and a dequantised constant may differ from the
    reference by half its step, at most the step ONNX Runtime's symmetric quantisation sets."""
    b = _Canonical(reference)
    try:
        a = _Canonical(engine, quantized)
    except ValueError as e:  # an activation's Q/DQ pair that does more than round
        return str(e)
    except (KeyError, IndexError, TypeError) as e:  # nodes the kit's exports never write
        what = "its quantisation nodes cannot be read back to a float graph" if quantized else "it cannot be read"
        return f"{what} ({first_line(e)})"
    for what, mine, theirs in (("inputs", engine.input, reference.input), ("outputs", engine.output,
                                                                             reference.output)):
        def types(values: Any, side: _Canonical) -> list[bytes]:
            return [v.type.SerializeToString() for v in values if v.name not in side.const]

        if types(mine, a) != types(theirs, b):
            return f"its graph {what} have other types or shapes than the export's"
    if len(a.nodes) != len(b.nodes):
        return f"{len(a.nodes)} operators where the export has {len(b.nodes)}"
    if len(a.inputs) != len(b.inputs):
        return f"{len(a.inputs)} graph inputs where the export has {len(b.inputs)}"
    for i, (m, r) in enumerate(zip(a.nodes, b.nodes)):
        where = f"operator {i} ({r.op_type}{', ' + r.name if r.name else ''})"
        if (m.op_type, m.domain) != (r.op_type, r.domain):
            return f"{where} is {m.op_type} in the file"
        if _attributes(m) != _attributes(r):
            return f"{where} has other attributes in the file"
        if len(m.input) != len(r.input) or len(m.output) != len(r.output):
            return f"{where} has other inputs or outputs in the file"
        for k, (x, y) in enumerate(zip(m.input, r.input)):
            u, v = a.ref(x), b.ref(y)
            if u[0] != v[0] or (u[0] != "const" and u != v):
                return f"{where}: input {k} is wired differently in the file"
            if u[0] == "const":
                why = _constant_differs(a, u[1], b.const[v[1]], m, k)
                if why:
                    return f"{where}: input {k} {why}"
    if a.outputs != b.outputs:
        return "the graph outputs come from other operators in the file"
    return None


def _constant_differs(a: _Canonical, name: str, ref: np.ndarray, node: onnx.NodeProto, k: int) -> str | None:
    mine = a.const[name]
    if mine.shape != ref.shape:
        return f"has shape {list(mine.shape)} where the export's is {list(ref.shape)}"
    q = a.quantized.get(name)
    if q is None:
        if mine.dtype != ref.dtype or not np.array_equal(mine, ref):
            diff = np.abs(mine.astype(np.float64) - ref.astype(np.float64)) if mine.dtype == ref.dtype else None
            return "differs from the export's" + (f" (by up to {diff.max():.3g})" if diff is not None and diff.size
                                                  else f" ({mine.dtype} against {ref.dtype})")
        return None
    ref64 = ref.astype(np.float64)
    off = np.abs(mine - ref64)
    if off.size and not (off <= q.step / 2 * (1 + _SLACK) + 1e-30).all():
        j = int(np.argmax(off - q.step / 2))
        return (f"dequantises to {mine.flat[j]:.6g} at element {j} where the export has {ref64.flat[j]:.6g} "
                f"(half a step is {q.step.flat[j] / 2:.3g})")
    biased = node.op_type in _BIASED
    if biased and k == 2 and q.bits != 32:
        return f"is a {q.bits}-bit bias: the kit's int8 exports store biases as int32"
    if q.bits <= 8:
        axis = _output_channel_axis(node, k, q)
        cap = np.maximum(_group_max(ref64, axis) / 127, _bias_room(a, node, k, axis, ref64.shape))
        loose = ~(q.step <= cap * (1 + _SLACK)) & (cap > 0)
        if loose.any():
            j = int(np.argmax(loose))
            return (f"has quantisation step {q.step.flat[j]:.3g} where the weights' largest magnitude sets "
                    f"{cap.flat[j]:.3g}: a coarser step lets the weights move further")
        return None
    if not (biased and k == 2):  # a 32-bit constant that is no Conv's, ConvTranspose's or Gemm's bias
        # a constant shared with such a bias (equal values folded into one) is judged there
        return None if name in a.bias_of else f"is a {q.bits}-bit constant that is not a quantised bias"
    act = a.act_scale.get(node.input[0])
    weights = a.quantized.get(node.input[1])
    if act is None or weights is None:
        return "is a quantised bias of an operator whose input or weights are not quantised"
    per_channel = weights.step.flat[0] if weights.axis is None else \
        np.moveaxis(weights.step, weights.axis, 0).reshape(weights.step.shape[weights.axis], -1)[:, 0]
    per_channel = np.asarray(per_channel, np.float64).reshape(-1)
    if per_channel.size not in (1, q.step.size) and q.step.size % per_channel.size == 0:  # grouped ConvTranspose
        per_channel = np.tile(per_channel, q.step.size // per_channel.size)
    if per_channel.size not in (1, q.step.size) or not (q.step <= act * per_channel * (1 + _SLACK)).all():
        return "has a quantisation step coarser than its input's scale times its weights'"
    return None


#: The operators whose input 2 is a bias that ONNX Runtime quantises to int32 at input scale x weight scale
_BIASED = ("Conv", "ConvTranspose", "Gemm")


def _bias_room(a: _Canonical, node: onnx.NodeProto, k: int, axis: int | None, shape: tuple[int, ...]) -> Any:
    """The weight step ONNX Runtime may take for an int32 bias's sake: where a bias would overflow int32 at input scale
    x weight scale, it enlarges that channel's weight scale to 1.0001 x 2 |bias| / (2^32 - 2) / input scale (its
    ``QDQDisableWeightAdjustForInt32Bias`` default). 0 where nothing applies."""
    if k != 1 or node.op_type not in _BIASED or len(node.input) < 3 or axis is None:
        return 0.0
    act, bias = a.act_scale.get(node.input[0]), a.const.get(node.input[2])
    if act is None or bias is None or bias.ndim != 1:
        return 0.0
    room = 1.0001 * 2 * np.abs(bias.astype(np.float64)) / (2**32 - 2) / act  # ONNX Runtime's rule, its epsilon too
    channels = shape[axis]
    if room.size != channels:  # a grouped ConvTranspose: one bias per output channel of every group
        if room.size % channels:
            return 0.0
        room = room.reshape(-1, channels).max(0)
    view = [1] * len(shape)
    view[axis] = channels
    return np.broadcast_to(room.reshape(view), shape)


def compare_to_export(proto: onnx.ModelProto, twin: nn.Module, input_shape: tuple[int, int, int]
                      ) -> GraphComparison:
    """Export ``twin`` again as ``proto``'s metadata says it was exported and compare (module docstring).

    ``proto`` is the engine file's model; ``twin`` a model that the caller knows ``proto`` records as its source (its
    weights hash); ``input_shape`` (C, H, W). Never raises for a file it cannot compare: the status says so.
    """
    from exporters.onnx import quantize
    from exporters.onnx.export import torch_to_onnx

    meta = read_metadata(proto)
    if meta.get("format") != FORMAT_TAG:
        return GraphComparison(NOT_COMPARED, "the file is not a kit export (no otkit metadata)")
    recorded = meta.get("toolchain")
    if not isinstance(recorded, dict):
        return GraphComparison(NOT_COMPARED, "the file does not record the package versions that made it "
                               "(exported by an earlier kit)")
    here = toolchain()
    other = [f"{k} {recorded.get(k) or 'none'} (here {here[k] or 'none'})" for k in here if recorded.get(k) != here[k]]
    if other:
        return GraphComparison(NOT_COMPARED, "exported with other package versions: " + ", ".join(other))
    try:
        precision = Precision(str(meta.get("precision", "")))
        opset, dynamo = int(meta["opset"]), meta.get("exporter") == "dynamo"
    except (KeyError, TypeError, ValueError) as e:
        return GraphComparison(NOT_COMPARED, f"the file's metadata does not say how it was exported ({first_line(e)})")
    try:
        fresh = torch_to_onnx(twin, input_shape, opset=opset, dynamo=dynamo)
        if fresh.exporter != meta.get("exporter"):
            return GraphComparison(NOT_COMPARED, f"the {meta.get('exporter')} exporter that made the file did not "
                                   f"export the twin here ({fresh.exporter_note})")
        if precision is Precision.FP16:
            reference = quantize.to_fp16(fresh.proto)
        elif precision is Precision.INT8:
            reference = quantize.pre_process(fresh.proto)
        else:
            reference = fresh.proto
    except Exception as e:  # an export that fails here is no evidence about the file  # noqa: BLE001
        return GraphComparison(NOT_COMPARED, f"the twin could not be exported again ({first_line(e)})")
    def opsets(model: onnx.ModelProto) -> list[tuple[str, int]]:  # the standard domain and those in use
        used = {"ai.onnx"} | {n.domain or "ai.onnx" for n in model.graph.node}
        return sorted((o.domain or "ai.onnx", o.version) for o in model.opset_import if (o.domain or "ai.onnx") in used)

    if opsets(proto) != opsets(reference):
        return GraphComparison(DIFFERS, f"the file's graph is not the twin's {precision.value} export: it declares "
                               f"opsets {opsets(proto)} where the export declares {opsets(reference)}")
    if precision is not Precision.INT8 and proto.graph.SerializeToString() == reference.graph.SerializeToString():
        return GraphComparison(IDENTICAL, f"the file's graph is the twin's {precision.value} export, byte for byte")
    try:
        why = compare_graphs(proto.graph, reference.graph, quantized=precision is Precision.INT8)
    except Exception as e:  # a file odd enough to break the reading: the kit's exports never do  # noqa: BLE001
        why = f"it cannot be compared ({first_line(e)})"
    if why is not None:
        return GraphComparison(DIFFERS, f"the file's graph is not the twin's {precision.value} export: {why}")
    if precision is Precision.INT8:
        return GraphComparison(EQUIVALENT, "the file's graph quantises the twin's export: the same operators and "
                               "wiring, every weight within half its quantisation step, each activation's Q/DQ pair "
                               "rounding only (the activations' scales are the calibration's)")
    return GraphComparison(EQUIVALENT, "the file's graph has the operators, attributes, wiring and constants of the "
                           f"twin's {precision.value} export; only names, or where its constants are stored, differ")
