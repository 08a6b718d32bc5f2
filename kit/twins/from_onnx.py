"""A differentiable PyTorch twin rebuilt from an ONNX image-classifier graph, for engines whose source is lost.

:class:`OnnxModule` is an interpreter, not a code generator: it keeps the graph's nodes and, in ``forward``, runs them
in graph order with torch operations over a dictionary of values. Gradients flow from the output back to the input
through every differentiable operator (Conv, Gemm, pooling, normalisations, ...), which is what twin-guided attacks
need. The batch dimension is whatever the input has.

Design
------
* Every initializer, and the tensor of every ``Constant`` node, becomes a persistent buffer (so it is in
  ``state_dict``) named ``i<index>_<name>`` (initializers) or ``c<index>_<name>`` (Constant nodes, by node index),
  where ``<name>`` is the ONNX name reduced to ``[0-9A-Za-z_]`` and cut to 48 characters; :attr:`OnnxModule.buffer_names`
  maps ONNX names to buffer names. Float tensors (float32, float16, bfloat16, float64, float8) become float32 buffers:
  the twin computes in float32, so an fp16 graph becomes its float twin. Integer tensors (int64 shape constants, int8
  or uint8 quantised weights, zero points) and booleans stay integer (uint16/uint32/uint64 widen to int32/int64/int64,
  int4/uint4 to int8/uint8).
* ``Cast`` to any float type yields float32 for the same reason.
* Int8 Q/DQ graphs: a ``DequantizeLinear`` of an integer initializer computes the dequantised float weight
  ``(q - zero_point) * scale`` (per tensor, per axis or per block); a ``QuantizeLinear`` whose every consumer is a
  ``DequantizeLinear`` forms pairs that become the identity (the float twin). :attr:`OnnxModule.report` records both
  (the quantisation recorded). A ``QuantizeLinear`` used otherwise quantises for real (rounding has zero gradient).
* ``fake_quant=True`` (``OnnxModule(proto, fake_quant=True)``): a differentiable replica of the engine's int8
  arithmetic instead of the float twin. Each such pair computes what ONNX Runtime's QuantizeLinear ->
  DequantizeLinear computes, ``q = saturate(round_half_to_even(x / s) + z)`` then ``(q - z') * s'`` (per tensor,
  per axis or per block; the integer type's range, [-128, 127] for int8 and [0, 255] for uint8), with the clipped
  straight-through estimator as its gradient: ``dq/dx = 1/s`` where ``round(x / s) + z`` lies inside the integer
  range, 0 where it saturates (so through the pair, the identity's gradient inside the range and 0 outside).
  Rounding is a staircase whose true derivative is 0 almost everywhere, which would stop every input gradient; its
  average slope is the identity's, so inside the range the identity's gradient is the useful one (Bengio et al.
  2013, Hubara et al. 2017; PyTorch's ``fake_quantize_per_tensor_affine`` uses the same rule). Where the value
  saturates the engine's output really is constant in ``x``, so the gradient there is 0 (a straight-through
  gradient would point the attack at changes the engine cannot see). Weight pairs (a QuantizeLinear of a stored
  float tensor) are fake-quantised as well (constants: only the forward matters); ``DequantizeLinear`` of integer
  weights is dequantised as without the option. :attr:`OnnxModule.report` then says ``fake_quant: True`` and how
  many pairs (``fake_quant_activation_pairs``, ``fake_quant_weight_pairs``); ``qdq_*_pairs_dropped`` are 0. The
  replica sums its convolutions in torch's order, where ONNX Runtime sums in its own (float kernels) or in int32
  (the QLinearConv / QLinearMatMul it fuses pairs into): a value within rounding error of a step boundary can land
  one step apart, and in a deep network such a flip spreads. Measured against ONNX Runtime's CPU provider on 64
  random inputs: cnn-cw, wrn-10-1 and a digits-trained cnn-small bitwise equal; a random-weight resnet20 87% of
  logits equal, the rest within 2 output steps (the float twin: none equal, 2.5 steps, 3x the mean gap).
* fp16 engines need no option here: their differentiable replica is the twin run in half precision
  (``copy.deepcopy(model).half()`` fed half inputs; :class:`kit.attacks.differential.HalfPrecision` wraps it),
  which the caller builds. This module always computes in float32.
* Operators are checked when the module is built: unsupported ones (or unsupported forms of supported ones) raise
  :class:`kit.errors.UserError` naming every op type and the first node of each, before any forward pass.
* Persistence without pickle: :func:`graph_skeleton` is the model with every tensor payload removed (initializers and
  ``Constant`` node tensors; shapes and types kept), :meth:`OnnxModule.from_skeleton` rebuilds a module with zero
  buffers of the same names, shapes and dtypes, and ``load_state_dict(state, strict=True)`` with the full module's
  state restores it exactly (bitwise-identical logits).

Input convention
----------------
The module takes exactly the graph's native input (layout and range; normalisation and NHWC are another layer's
concern) as a float tensor of any float dtype, and computes in float32. A graph whose input is declared uint8 (or any
integer type) is fed real values as float32: the graph's own ``Cast`` from uint8 to float is then a float32 identity,
and gradients reach the input. The single output is returned as float32.

Limits
------
* One graph input (besides initializers) and one output. Operators of the default ONNX domain only (opset 13..21
  semantics; older attribute forms where cheap); model-local functions are inlined first. No control flow (If, Loop,
  Scan), no sparse tensors, no string tensors, no custom domains (``com.microsoft`` fused ops).
* Resize: nearest and linear (any coordinate transformation except ``tf_crop_and_resize``), no cubic, no antialias.
  MaxPool without its Indices output; AveragePool without dilations; BatchNormalization in inference mode only.
* float64 and float16 arithmetic of the graph is done in float32; integer arithmetic stays integer.
* A QuantizeLinear outside a Q/DQ pair quantises to 8- or 16-bit integers only (not float8, and int4 saturates
  as int8).
* External data is read by ``onnx.load`` from the model file's folder.
* The skeleton keeps everything but tensor payloads, node metadata (the dynamo exporter's stack traces) included.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor

from kit.errors import UserError
from kit.runtime import run_fixed_batch

__all__ = ["OnnxModule", "graph_skeleton", "onnx_to_torch", "supported_ops"]

Value = Any  # a Tensor, or None for an omitted optional input
#: an operator: (step, input values) -> one output value or a list of them
OpFn = Callable[["_Step", list], Any]

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
for _name in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT4E2M1"):
    if hasattr(TensorProto, _name):
        _FLOAT_TYPES.add(getattr(TensorProto, _name))

_INT_TYPES: dict[int, torch.dtype] = {
    TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT16: torch.int16,
    TensorProto.UINT16: torch.int32,
    TensorProto.INT32: torch.int32,
    TensorProto.UINT32: torch.int64,
    TensorProto.INT64: torch.int64,
    TensorProto.UINT64: torch.int64,
    TensorProto.BOOL: torch.bool,
}
if hasattr(TensorProto, "INT4"):
    _INT_TYPES[TensorProto.INT4] = torch.int8
    _INT_TYPES[TensorProto.UINT4] = torch.uint8

_TORCH_TO_NUMPY = {torch.float32: np.float32, torch.int8: np.int8, torch.uint8: np.uint8, torch.int16: np.int16,
                   torch.int32: np.int32, torch.int64: np.int64, torch.bool: np.bool_}

_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data",
                "external_data")


def _type_name(data_type: int) -> str:
    """``float16`` for ``TensorProto.FLOAT16``, and so on."""
    return helper.tensor_dtype_to_string(data_type).replace("TensorProto.", "").lower()


def _torch_dtype(data_type: int, what: str) -> torch.dtype:
    """The dtype the twin keeps a tensor of ONNX type ``data_type`` in: float32 for every float type."""
    if data_type in _FLOAT_TYPES:
        return torch.float32
    if data_type in _INT_TYPES:
        return _INT_TYPES[data_type]
    raise UserError(f"ONNX tensor {what!r} has type {_type_name(data_type)}, which the twin does not support")


def _tensor_from_proto(t: TensorProto, what: str) -> Tensor:
    """A tensor with the data of ``t``, in the twin's dtype for its type."""
    dtype = _torch_dtype(t.data_type, what)
    arr = np.asarray(numpy_helper.to_array(t))
    arr = np.ascontiguousarray(arr.astype(_TORCH_TO_NUMPY[dtype], copy=False))
    return torch.from_numpy(arr.copy()).reshape(tuple(int(d) for d in t.dims))


def _sanitize(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)[:48]


# ----------------------------------------------------------------------------------------------------------- helpers


def _ints(v: Value) -> list[int]:
    """A 0-d or 1-d integer tensor (or list) as a list of Python ints."""
    if isinstance(v, Tensor):
        return [int(i) for i in v.reshape(-1).tolist()]
    return [int(i) for i in v]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _spatial_pads(step: _Step, in_sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                  dilations: Sequence[int]) -> list[int]:
    """ONNX ``pads`` (begins then ends) of a convolution or pooling, resolving ``auto_pad``."""
    nd = len(kernel)
    auto = _text(step.attrs, "auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            begins.append(small if auto == "SAME_UPPER" else total - small)
            ends.append(total - small if auto == "SAME_UPPER" else small)
        return begins + ends
    if auto == "VALID":
        return [0] * (2 * nd)
    pads = list(step.attrs.get("pads", [0] * (2 * nd)))
    return pads


def _text(attrs: dict[str, Any], key: str, default: str) -> str:
    """A string attribute (ONNX keeps them as bytes), or ``default`` where the node has none."""
    v = attrs.get(key, default)
    return v.decode() if isinstance(v, bytes) else str(v)


def _torch_pad_order(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """F.pad's order (last dimension first) from per-dimension begins and ends."""
    out: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [int(b), int(e)]
    return out


# ----------------------------------------------------------------------------------------------------------- a step


@dataclass
class _Step:
    """One node as the interpreter runs it."""

    op_type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    opset: int
    fn: OpFn
    tensors: dict[str, Tensor] = field(default_factory=dict)  # tensor attributes, converted once
    release: list[str] = field(default_factory=list)  # values no later step reads: dropped after this one


# ------------------------------------------------------------------------------------------------------ elementwise


def _div(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _pow(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point() and not b.is_floating_point():
        b = b.to(a.dtype)
    out = torch.pow(a, b)
    return out if out.dtype == a.dtype else out.to(a.dtype)


_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div, "Pow": _pow,
    "Equal": torch.eq, "Less": torch.lt, "LessOrEqual": torch.le, "Greater": torch.gt, "GreaterOrEqual": torch.ge,
    "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
}

_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log, "Neg": torch.neg, "Abs": torch.abs,
    "Reciprocal": torch.reciprocal, "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh,
    "Erf": torch.erf, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign,
    "Sin": torch.sin, "Cos": torch.cos, "Softplus": F.softplus, "Softsign": F.softsign,
    "Not": torch.logical_not, "Mish": F.mish, "Identity": lambda x: x,
}


def _binary(step: _Step, ins: list[Value]) -> Tensor:
    return _BINARY[step.op_type](ins[0], ins[1])


def _mod(step: _Step, ins: list[Value]) -> Tensor:
    """``fmod=1``: the remainder takes the dividend's sign (C's fmod); else the divisor's (Python's %)."""
    return (torch.fmod if int(step.attrs.get("fmod", 0)) else torch.remainder)(ins[0], ins[1])


def _unary(step: _Step, ins: list[Value]) -> Tensor:
    return _UNARY[step.op_type](ins[0])


def _variadic(step: _Step, ins: list[Value]) -> Tensor:
    xs = [x for x in ins if x is not None]
    if step.op_type == "Min":
        return reduce(torch.minimum, xs)
    if step.op_type == "Max":
        return reduce(torch.maximum, xs)
    total = reduce(torch.add, xs)
    return total / len(xs) if step.op_type == "Mean" else total


def _activation(step: _Step, ins: list[Value]) -> Tensor:
    x, a = ins[0], step.attrs
    op = step.op_type
    if op == "LeakyRelu":
        return F.leaky_relu(x, float(a.get("alpha", 0.01)))
    if op == "PRelu":
        return torch.where(x < 0, x * ins[1], x)
    if op == "HardSigmoid":
        return torch.clamp(float(a.get("alpha", 0.2)) * x + float(a.get("beta", 0.5)), 0.0, 1.0)
    if op == "HardSwish":
        return F.hardswish(x)
    if op == "Elu":
        return F.elu(x, float(a.get("alpha", 1.0)))
    if op == "Celu":
        return F.celu(x, float(a.get("alpha", 1.0)))
    if op == "Selu":
        alpha = float(a.get("alpha", 1.67326319217681884765625))
        gamma = float(a.get("gamma", 1.05070102214813232421875))
        return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))
    if op == "ThresholdedRelu":
        return torch.where(x > float(a.get("alpha", 1.0)), x, torch.zeros_like(x))
    if op == "Gelu":
        return F.gelu(x, approximate=_text(a, "approximate", "none"))
    raise AssertionError(op)


def _softmax(step: _Step, ins: list[Value]) -> Tensor:
    x = ins[0]
    fn = {"Softmax": torch.softmax, "LogSoftmax": torch.log_softmax}.get(step.op_type)
    if step.opset >= 13:
        axis = _axis(int(step.attrs.get("axis", -1)), x.dim())
        if fn is not None:
            return fn(x, axis)
        return F.one_hot(x.argmax(axis), x.shape[axis]).movedim(-1, axis).to(x.dtype)  # Hardmax
    axis = _axis(int(step.attrs.get("axis", 1)), x.dim())
    flat = x.reshape(math.prod(x.shape[:axis]), -1)
    if fn is not None:
        return fn(flat, 1).reshape(x.shape)
    return F.one_hot(flat.argmax(1), flat.shape[1]).to(x.dtype).reshape(x.shape)


def _clip(step: _Step, ins: list[Value]) -> Tensor:
    x = ins[0]
    if step.opset < 11:
        lo, hi = step.attrs.get("min"), step.attrs.get("max")
        return torch.clamp(x, min=lo, max=hi)
    lo = ins[1] if len(ins) > 1 else None
    hi = ins[2] if len(ins) > 2 else None
    if lo is not None:
        x = torch.maximum(x, lo.to(x.dtype))
    if hi is not None:
        x = torch.minimum(x, hi.to(x.dtype))
    return x


def _where(step: _Step, ins: list[Value]) -> Tensor:
    return torch.where(ins[0].bool(), ins[1], ins[2])


# ------------------------------------------------------------------------------------------------- linear algebra


def _conv(step: _Step, ins: list[Value]) -> Tensor:
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    nd = x.dim() - 2
    kernel = list(step.attrs.get("kernel_shape", w.shape[2:]))
    strides = list(step.attrs.get("strides", [1] * nd))
    dil = list(step.attrs.get("dilations", [1] * nd))
    group = int(step.attrs.get("group", 1))
    pads = _spatial_pads(step, x.shape[2:], kernel, strides, dil)
    begins, ends = pads[:nd], pads[nd:]
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    if begins == ends:
        return conv(x, w, b, strides, begins, dil, group)
    return conv(F.pad(x, _torch_pad_order(begins, ends)), w, b, strides, 0, dil, group)


def _conv_transpose(step: _Step, ins: list[Value]) -> Tensor:
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    nd = x.dim() - 2
    a = step.attrs
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    out_pad = list(a.get("output_padding", [0] * nd))
    group = int(a.get("group", 1))
    auto = _text(a, "auto_pad", "NOTSET")
    sizes = list(x.shape[2:])
    full = [(n - 1) * s + (k - 1) * d + 1 + op for n, s, k, d, op in zip(sizes, strides, kernel, dil, out_pad)]
    if "output_shape" in a or auto in ("SAME_UPPER", "SAME_LOWER"):
        target = list(a["output_shape"])[-nd:] if "output_shape" in a else [n * s for n, s in zip(sizes, strides)]
        totals = [f - t for f, t in zip(full, target)]
        if auto == "SAME_UPPER":
            begins, ends = [t // 2 for t in totals], [t - t // 2 for t in totals]
        else:
            begins, ends = [t - t // 2 for t in totals], [t // 2 for t in totals]
    elif auto == "VALID":
        begins, ends = [0] * nd, [0] * nd
    else:
        pads = list(a.get("pads", [0] * (2 * nd)))
        begins, ends = pads[:nd], pads[nd:]
    convt = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    y = convt(x, w, b, strides, 0, out_pad, group, dil)
    if any(begins) or any(ends):
        y = F.pad(y, [-p for p in _torch_pad_order(begins, ends)])
    return y


def _gemm(step: _Step, ins: list[Value]) -> Tensor:
    a, b = ins[0], ins[1]
    c = ins[2] if len(ins) > 2 else None
    if int(step.attrs.get("transA", 0)):
        a = a.transpose(0, 1)
    if int(step.attrs.get("transB", 0)):
        b = b.transpose(0, 1)
    alpha, beta = float(step.attrs.get("alpha", 1.0)), float(step.attrs.get("beta", 1.0))
    y = a @ b
    if alpha != 1.0:
        y = alpha * y
    if c is not None:
        y = y + (c if beta == 1.0 else beta * c)
    return y


def _matmul(step: _Step, ins: list[Value]) -> Tensor:
    return torch.matmul(ins[0], ins[1])


def _einsum(step: _Step, ins: list[Value]) -> Tensor:
    return torch.einsum(_text(step.attrs, "equation", ""), *ins)


# -------------------------------------------------------------------------------------------------------- pooling


def _pool(step: _Step, ins: list[Value]) -> Tensor:
    x = ins[0]
    nd = x.dim() - 2
    a = step.attrs
    kernel = list(a["kernel_shape"])
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    ceil = bool(int(a.get("ceil_mode", 0)))
    pads = _spatial_pads(step, x.shape[2:], kernel, strides, dil)
    begins, ends = pads[:nd], pads[nd:]
    simple = begins == ends and all(p <= k // 2 for p, k in zip(begins, kernel))
    # with explicit padding torch sees the padded tensor as input, and ceil_mode would keep a last window that starts in
    # the end padding, which ONNX drops: cut the output to ONNX's size
    sizes = [_pool_out(n, k, s, d, b, e, ceil) for n, k, s, d, b, e in zip(x.shape[2:], kernel, strides, dil, begins,
                                                                          ends)]

    def cut(y: Tensor) -> Tensor:
        return y[(..., *(slice(0, m) for m in sizes))]

    if step.op_type == "MaxPool":
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
        # a window wholly in the padding: ONNX Runtime's lowest float, not -inf (which a later Mul by 0 turns into NaN)
        low = torch.finfo(x.dtype).min
        if simple:
            return pool(x, kernel, strides, begins, dil, ceil_mode=ceil).clamp_min(low)
        padded = F.pad(x, _torch_pad_order(begins, ends), value=-math.inf)
        return cut(pool(padded, kernel, strides, 0, dil, ceil_mode=ceil)).clamp_min(low)
    avg = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    include = bool(int(a.get("count_include_pad", 0)))
    if simple:
        return avg(x, kernel, strides, begins, ceil_mode=ceil, count_include_pad=include)
    order = _torch_pad_order(begins, ends)
    summed = cut(avg(F.pad(x, order), kernel, strides, 0, ceil_mode=ceil, count_include_pad=True))
    if include:
        return summed
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    share = cut(avg(F.pad(ones, order), kernel, strides, 0, ceil_mode=ceil, count_include_pad=True))
    return summed / share


def _pool_out(n: int, k: int, s: int, d: int, begin: int, end: int, ceil: bool) -> int:
    """ONNX's pooled size along one axis: with ``ceil_mode`` a last window that would start in the end padding is
    dropped."""
    span = n + begin + end - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= n + begin:
        out -= 1
    return out


def _global_pool(step: _Step, ins: list[Value]) -> Tensor:
    x = ins[0]
    dims = tuple(range(2, x.dim()))
    if step.op_type == "GlobalAveragePool":
        return x.mean(dim=dims, keepdim=True)
    return x.amax(dim=dims, keepdim=True)


def _lrn(step: _Step, ins: list[Value]) -> Tensor:
    a = step.attrs
    return F.local_response_norm(ins[0], int(a["size"]), float(a.get("alpha", 1e-4)), float(a.get("beta", 0.75)),
                                 float(a.get("bias", 1.0)))


# -------------------------------------------------------------------------------------------------- normalisation


def _batch_norm(step: _Step, ins: list[Value]) -> Tensor:
    x, scale, bias, mean, var = ins[:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, float(step.attrs.get("epsilon", 1e-5)))


def _instance_norm(step: _Step, ins: list[Value]) -> Tensor:
    return F.instance_norm(ins[0], weight=ins[1], bias=ins[2], eps=float(step.attrs.get("epsilon", 1e-5)))


def _layer_norm(step: _Step, ins: list[Value]) -> list[Value]:
    x, scale = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    eps = float(step.attrs.get("epsilon", 1e-5))
    axis = _axis(int(step.attrs.get("axis", -1)), x.dim())
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(x.var(dim=dims, unbiased=False, keepdim=True) + eps)
    normalized = tuple(x.shape[axis:])
    if len(step.outputs) == 1 and tuple(scale.shape) == normalized and (bias is None or tuple(bias.shape) == normalized):
        return [F.layer_norm(x, normalized, scale, bias, eps)]
    y = (x - mean) * inv_std * scale
    if bias is not None:
        y = y + bias
    return [y, mean, inv_std]


def _group_norm(step: _Step, ins: list[Value]) -> Tensor:
    x, scale, bias = ins[:3]
    groups = int(step.attrs["num_groups"])
    eps = float(step.attrs.get("epsilon", 1e-5))
    channels = x.shape[1]
    if scale.numel() != channels:  # opset 18: one scale and bias per group
        scale = scale.repeat_interleave(channels // groups)
        bias = bias.repeat_interleave(channels // groups)
    return F.group_norm(x, groups, scale, bias, eps)


# ------------------------------------------------------------------------------------------------------ reductions


def _reduce(step: _Step, ins: list[Value]) -> Tensor:
    x = ins[0]
    keep = bool(int(step.attrs.get("keepdims", 1)))
    axes: list[int] | None = None
    if len(ins) > 1 and ins[1] is not None:
        axes = _ints(ins[1])
    elif "axes" in step.attrs:
        axes = list(step.attrs["axes"])
    if not axes:
        if int(step.attrs.get("noop_with_empty_axes", 0)):
            return x
        axes = list(range(x.dim()))
    dims = tuple(sorted(_axis(a, x.dim()) for a in axes))
    op = step.op_type
    if op == "ReduceMean":
        return x.mean(dim=dims, keepdim=keep)
    if op == "ReduceSum":
        return x.sum(dim=dims, keepdim=keep)
    if op == "ReduceMax":
        return x.amax(dim=dims, keepdim=keep)
    if op == "ReduceMin":
        return x.amin(dim=dims, keepdim=keep)
    if op == "ReduceSumSquare":
        return (x * x).sum(dim=dims, keepdim=keep)
    if op == "ReduceL1":
        return x.abs().sum(dim=dims, keepdim=keep)
    if op == "ReduceL2":
        return (x * x).sum(dim=dims, keepdim=keep).sqrt()
    if op == "ReduceLogSumExp":
        return torch.logsumexp(x, dim=dims, keepdim=keep)
    if op == "ReduceProd":
        for d in reversed(dims):
            x = x.prod(dim=d, keepdim=keep)
        return x
    raise AssertionError(op)


def _arg_extreme(step: _Step, ins: list[Value]) -> Tensor:
    x = ins[0]
    axis = _axis(int(step.attrs.get("axis", 0)), x.dim())
    keep = bool(int(step.attrs.get("keepdims", 1)))
    fn = torch.argmax if step.op_type == "ArgMax" else torch.argmin
    if int(step.attrs.get("select_last_index", 0)):
        return x.shape[axis] - 1 - fn(x.flip(axis), dim=axis, keepdim=keep)
    return fn(x, dim=axis, keepdim=keep)


# ---------------------------------------------------------------------------------------------------------- shapes


def _flatten(step: _Step, ins: list[Value]) -> Tensor:
    x = ins[0]
    axis = _axis(int(step.attrs.get("axis", 1)), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _reshape(step: _Step, ins: list[Value]) -> Tensor:
    x = ins[0]
    shape = _ints(ins[1]) if len(ins) > 1 else list(step.attrs["shape"])
    if not int(step.attrs.get("allowzero", 0)):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _transpose(step: _Step, ins: list[Value]) -> Tensor:
    x = ins[0]
    perm = list(step.attrs.get("perm", reversed(range(x.dim()))))
    return x.permute(perm)


def _concat(step: _Step, ins: list[Value]) -> Tensor:
    xs = [x for x in ins if x is not None]
    return torch.cat(xs, dim=_axis(int(step.attrs["axis"]), xs[0].dim()))


def _split(step: _Step, ins: list[Value]) -> list[Tensor]:
    x = ins[0]
    axis = _axis(int(step.attrs.get("axis", 0)), x.dim())
    if len(ins) > 1 and ins[1] is not None:
        sizes: int | list[int] = _ints(ins[1])
    elif "split" in step.attrs:
        sizes = list(step.attrs["split"])
    else:
        parts = int(step.attrs.get("num_outputs", len(step.outputs)))
        sizes = -(-x.shape[axis] // parts)
    return list(torch.split(x, sizes, dim=axis))


def _slice(step: _Step, ins: list[Value]) -> Tensor:
    x = ins[0]
    if step.opset < 10:
        starts, ends = list(step.attrs["starts"]), list(step.attrs["ends"])
        axes = list(step.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    for start, end, axis, st in zip(starts, ends, axes, steps):
        axis = _axis(axis, x.dim())
        n = x.shape[axis]
        start = start + n if start < 0 else start
        end = end + n if end < 0 else end
        if st > 0:
            start, end = min(max(start, 0), n), min(max(end, 0), n)
            index = [slice(None)] * axis + [slice(start, end, st)]
            x = x[tuple(index)]
        else:
            start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
            idx = torch.arange(start, end, st, device=x.device, dtype=torch.long)
            x = x.index_select(axis, idx)
    return x


def _gather(step: _Step, ins: list[Value]) -> Tensor:
    x, idx = ins[0], ins[1].long()
    axis = _axis(int(step.attrs.get("axis", 0)), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))


def _gather_nd(step: _Step, ins: list[Value]) -> Tensor:
    """Slices of ``x`` at index tuples: out[i..., :] = x[b..., idx[i..., 0], ..., idx[i..., k - 1], :] with ``b`` the
    ``batch_dims`` leading dimensions shared by ``x`` and the indices (negative indices count from the end)."""
    x, idx = ins[0], ins[1].long()
    b = int(step.attrs.get("batch_dims", 0))
    k = idx.shape[-1]
    lead, rest = x.shape[:b], x.shape[b + k:]
    sizes = torch.tensor(x.shape[b:b + k], device=idx.device)
    idx = torch.where(idx < 0, idx + sizes, idx)
    batches = math.prod(lead)
    flat_x = x.reshape(batches, *x.shape[b:])
    flat_idx = idx.reshape(batches, -1, k)
    rows = torch.arange(batches, device=idx.device)[:, None].expand(flat_idx.shape[:2])
    out = flat_x[(rows, *flat_idx.unbind(-1))]
    return out.reshape((*idx.shape[:-1], *rest))


def _depth_to_space(step: _Step, ins: list[Value]) -> Tensor:
    """Channels to blocks of pixels: mode DCR (depth, column, row: ONNX's default) or CRD (``pixel_shuffle``)."""
    x = ins[0]
    bs = int(step.attrs["blocksize"])
    n, c, h, w = x.shape
    if _text(step.attrs, "mode", "DCR") == "CRD":
        return x.reshape(n, c // bs**2, bs, bs, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c // bs**2, h * bs, w * bs)
    return x.reshape(n, bs, bs, c // bs**2, h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, c // bs**2, h * bs, w * bs)


def _space_to_depth(step: _Step, ins: list[Value]) -> Tensor:
    """Blocks of pixels to channels, the inverse of DepthToSpace in DCR mode."""
    x = ins[0]
    bs = int(step.attrs["blocksize"])
    n, c, h, w = x.shape
    return x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4).reshape(n, c * bs**2, h // bs, w // bs)


def _gather_elements(step: _Step, ins: list[Value]) -> Tensor:
    x, idx = ins[0], ins[1].long()
    axis = _axis(int(step.attrs.get("axis", 0)), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return torch.gather(x, axis, idx)


def _shape(step: _Step, ins: list[Value]) -> Tensor:
    x = ins[0]
    dims = list(x.shape)
    start = int(step.attrs.get("start", 0))
    end = step.attrs.get("end")
    dims = dims[start:] if end is None else dims[start:int(end)]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


def _size(step: _Step, ins: list[Value]) -> Tensor:
    return torch.tensor(ins[0].numel(), dtype=torch.int64, device=ins[0].device)


def _unsqueeze(step: _Step, ins: list[Value]) -> Tensor:
    x = ins[0]
    axes = _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else list(step.attrs["axes"])
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return x


def _squeeze(step: _Step, ins: list[Value]) -> Tensor:
    x = ins[0]
    if len(ins) > 1 and ins[1] is not None:
        axes = _ints(ins[1])
    else:
        axes = list(step.attrs.get("axes", []))
    if not axes:
        axes = [i for i, n in enumerate(x.shape) if n == 1]
    keep = [n for i, n in enumerate(x.shape) if i not in {_axis(a, x.dim()) for a in axes}]
    return x.reshape(keep)


def _expand(step: _Step, ins: list[Value]) -> Tensor:
    x = ins[0]
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(ins[1]))))


def _tile(step: _Step, ins: list[Value]) -> Tensor:
    return ins[0].repeat(_ints(ins[1]))


def _cast(step: _Step, ins: list[Value]) -> Tensor:
    x = ins[0]
    dtype = _torch_dtype(int(step.attrs["to"]), step.name) if step.op_type == "Cast" else ins[1].dtype
    return x if x.dtype == dtype else x.to(dtype)


def _identity_first(step: _Step, ins: list[Value]) -> list[Value]:
    """Identity, Dropout at inference (its mask, when asked for, is all true)."""
    x = ins[0]
    if step.op_type == "Dropout" and len(step.outputs) > 1:
        return [x, torch.ones(x.shape, dtype=torch.bool, device=x.device)]
    return [x]


def _constant_of_shape(step: _Step, ins: list[Value]) -> Tensor:
    value = step.tensors.get("value")
    shape = _ints(ins[0])
    if value is None:
        return torch.zeros(shape, dtype=torch.float32, device=ins[0].device)
    return torch.full(shape, value.reshape(-1)[0].item(), dtype=value.dtype, device=ins[0].device)


def _range(step: _Step, ins: list[Value]) -> Tensor:
    start, limit, delta = ins[0], ins[1], ins[2]
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


def _pad(step: _Step, ins: list[Value]) -> Tensor:
    x = ins[0]
    a = step.attrs
    mode = _text(a, "mode", "constant")
    if step.opset < 11:
        pads, value = list(a["pads"]), float(a.get("value", 0.0))
        axes = list(range(x.dim()))
    else:
        pads = _ints(ins[1])
        value = ins[2].item() if len(ins) > 2 and ins[2] is not None and ins[2].numel() else 0.0
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(x.dim()))
    axes = [_axis(ax, x.dim()) for ax in axes]
    begins, ends = [0] * x.dim(), [0] * x.dim()
    for i, ax in enumerate(axes):
        begins[ax], ends[ax] = pads[i], pads[i + len(axes)]
    first = next((i for i in range(x.dim()) if begins[i] or ends[i]), x.dim())
    order = _torch_pad_order(begins[first:], ends[first:])
    if not order:
        return x
    if mode == "constant":
        return F.pad(x, order, value=value)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    # torch pads the trailing k dimensions of a tensor of k + 1 or k + 2 dimensions: padding the first one needs one more
    if first == 0:
        return F.pad(x.unsqueeze(0), order, mode=torch_mode).squeeze(0)
    return F.pad(x, order, mode=torch_mode)


# ------------------------------------------------------------------------------------------------------------ resize


#: Resize's coordinate transformation modes :func:`_coordinates` reads (``tf_crop_and_resize`` is not one)
_COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "half_pixel_symmetric",
                     "tf_half_pixel_for_nn")


def _coordinates(mode: str, out: int, size: int, scale: float, device: torch.device) -> Tensor:
    """Source coordinates (float64) of the ``out`` output positions along one axis."""
    x = torch.arange(out, dtype=torch.float64, device=device)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out > 1 else torch.zeros_like(x)
    if mode == "align_corners":
        return x * (size - 1) / (out - 1) if out > 1 else torch.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "half_pixel_symmetric":
        adjustment = out / (scale * size)
        offset = size / 2 * (1 - adjustment)
        return offset + (x + 0.5) / scale - 0.5
    if mode == "tf_half_pixel_for_nn":  # tf2onnx's nearest at opsets 11-12
        return (x + 0.5) / scale
    raise AssertionError(mode)


def _resize(step: _Step, ins: list[Value]) -> Tensor:
    x = ins[0]
    a = step.attrs
    mode = _text(a, "mode", "nearest")
    if step.op_type == "Upsample" or step.opset < 11:
        scales_t = ins[1] if len(ins) > 1 else None
        scales = [float(s) for s in scales_t.tolist()] if scales_t is not None else list(a["scales"])
        axes = list(range(x.dim()))
        sizes = [int(math.floor(n * s)) for n, s in zip(x.shape, scales)]
        coord, nearest = "asymmetric", "floor"
    else:
        coord = _text(a, "coordinate_transformation_mode", "half_pixel")
        nearest = _text(a, "nearest_mode", "round_prefer_floor")
        axes = [_axis(ax, x.dim()) for ax in a.get("axes", range(x.dim()))]
        scales_t = ins[2] if len(ins) > 2 and ins[2] is not None and ins[2].numel() else None
        sizes_t = ins[3] if len(ins) > 3 and ins[3] is not None and ins[3].numel() else None
        if sizes_t is not None:
            sizes = _ints(sizes_t)
            policy = _text(a, "keep_aspect_ratio_policy", "stretch")
            if policy == "stretch":
                scales = [s / x.shape[ax] for s, ax in zip(sizes, axes)]
            else:
                ratios = [s / x.shape[ax] for s, ax in zip(sizes, axes)]
                r = min(ratios) if policy == "not_larger" else max(ratios)
                scales = [r] * len(axes)
                sizes = [int(math.floor(r * x.shape[ax] + 0.5)) for ax in axes]
        elif scales_t is not None:
            scales = [float(s) for s in scales_t.tolist()]
            sizes = [int(math.floor(x.shape[ax] * s)) for ax, s in zip(axes, scales)]
        else:
            raise ValueError(f"Resize node {step.name!r} has neither scales nor sizes")
    for ax, out, scale in zip(axes, sizes, scales):
        size = x.shape[ax]
        if out == size and scale == 1.0:
            continue
        src = _coordinates(coord, out, size, scale, x.device)
        if mode == "nearest":
            if nearest == "round_prefer_floor":
                idx = torch.ceil(src - 0.5)
            elif nearest == "round_prefer_ceil":
                idx = torch.floor(src + 0.5)
            elif nearest == "floor":
                idx = torch.floor(src)
            else:
                idx = torch.ceil(src)
            x = x.index_select(ax, idx.clamp(0, size - 1).long())
            continue
        low = torch.floor(src)
        frac = (src - low).to(x.dtype)
        i0 = low.clamp(0, size - 1).long()
        i1 = (low + 1).clamp(0, size - 1).long()
        view = [1] * x.dim()
        view[ax] = out
        frac = frac.reshape(view)
        x = x.index_select(ax, i0) * (1 - frac) + x.index_select(ax, i1) * frac
    return x


# ------------------------------------------------------------------------------------------------------ quantisation


def _along(v: Tensor, x: Tensor, axis: int, block: int) -> Tensor:
    """A scale or zero point shaped to broadcast against ``x`` (per tensor, per axis or per block)."""
    if v.dim() == 0 or (v.numel() == 1 and block == 0):  # one value: per tensor (a [1] scale too, as ONNX Runtime)
        return v.reshape(())
    axis = _axis(axis, x.dim())
    if block > 0:
        return v.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
    view = [1] * x.dim()
    view[axis] = v.numel()
    return v.reshape(view)


def _dequantize(step: _Step, ins: list[Value]) -> Tensor:
    x, scale = ins[0], ins[1]
    zp = ins[2] if len(ins) > 2 else None
    axis, block = int(step.attrs.get("axis", 1)), int(step.attrs.get("block_size", 0))
    y = x.to(torch.float32)
    if zp is not None:
        y = y - _along(zp, x, axis, block).to(torch.float32)
    return y * _along(scale.to(torch.float32), x, axis, block)


def _quant_dtype(step: _Step, zp: Value | None) -> torch.dtype:
    """The integer type a QuantizeLinear produces: its zero point's, else ``output_dtype``, else uint8 (ONNX)."""
    if zp is not None:
        return zp.dtype
    if "output_dtype" in step.attrs and int(step.attrs["output_dtype"]):
        return _torch_dtype(int(step.attrs["output_dtype"]), step.name)
    return torch.uint8


def _quantize(step: _Step, ins: list[Value]) -> Tensor:
    x, scale = ins[0], ins[1]
    zp = ins[2] if len(ins) > 2 else None
    axis, block = int(step.attrs.get("axis", 1)), int(step.attrs.get("block_size", 0))
    dtype = _quant_dtype(step, zp)
    info = torch.iinfo(dtype)
    y = torch.round(x / _along(scale, x, axis, block))
    if zp is not None:
        y = y + _along(zp, x, axis, block).to(y.dtype)
    return y.clamp(info.min, info.max).to(dtype)


def _fake_quantize(step: _Step, ins: list[Value]) -> Tensor:
    """QuantizeLinear of a Q/DQ pair under ``fake_quant``: the same integers as :func:`_quantize`, held in float32,
    with the clipped straight-through gradient ``1/scale`` where the value is inside the integer range, else 0."""
    x, scale = ins[0], ins[1]
    zp = ins[2] if len(ins) > 2 else None
    axis, block = int(step.attrs.get("axis", 1)), int(step.attrs.get("block_size", 0))
    dtype = _quant_dtype(step, zp)
    info = torch.iinfo(dtype)
    x = x.to(torch.float32)
    s = _along(scale.to(torch.float32), x, axis, block)
    r = torch.round(x.detach() / s)  # round half to even, as ONNX Runtime
    if zp is not None:
        r = r + _along(zp, x, axis, block).to(torch.float32)
    inside = (r >= info.min) & (r <= info.max)
    q = r.clamp(info.min, info.max)
    if not x.requires_grad:
        return q
    return q + (x - x.detach()) * (inside.to(torch.float32) / s)  # forward: exactly q (x - x.detach() is 0)


def _alias(step: _Step, ins: list[Value]) -> Value:
    """A DequantizeLinear whose QuantizeLinear was dropped: the float value before quantisation."""
    return ins[0]


# ------------------------------------------------------------------------------------------------------- dispatch

_OPS: dict[str, OpFn] = {
    **{op: _binary for op in _BINARY},
    **{op: _unary for op in _UNARY if op != "Identity"},
    **{op: _variadic for op in ("Min", "Max", "Sum", "Mean")},
    **{op: _activation for op in ("LeakyRelu", "PRelu", "HardSigmoid", "HardSwish", "Elu", "Celu", "Selu",
                                  "ThresholdedRelu", "Gelu")},
    **{op: _softmax for op in ("Softmax", "LogSoftmax", "Hardmax")},
    "Clip": _clip, "Where": _where,
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul, "Einsum": _einsum,
    "MaxPool": _pool, "AveragePool": _pool, "GlobalAveragePool": _global_pool, "GlobalMaxPool": _global_pool,
    "LRN": _lrn,
    "BatchNormalization": _batch_norm, "InstanceNormalization": _instance_norm,
    "LayerNormalization": _layer_norm, "GroupNormalization": _group_norm,
    **{op: _reduce for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                              "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp")},
    "ArgMax": _arg_extreme, "ArgMin": _arg_extreme,
    "Flatten": _flatten, "Reshape": _reshape, "Transpose": _transpose, "Concat": _concat, "Split": _split,
    "Slice": _slice, "Gather": _gather, "GatherElements": _gather_elements, "GatherND": _gather_nd,
    "DepthToSpace": _depth_to_space, "SpaceToDepth": _space_to_depth, "Mod": _mod, "Shape": _shape, "Size": _size,
    "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Expand": _expand, "Tile": _tile,
    "Cast": _cast, "CastLike": _cast, "Identity": _identity_first, "Dropout": _identity_first,
    "ConstantOfShape": _constant_of_shape, "Range": _range, "Pad": _pad,
    "Resize": _resize, "Upsample": _resize,
    "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize,
}


def supported_ops() -> list[str]:
    """The ONNX operator types (default domain) :class:`OnnxModule` runs, ``Constant`` included, sorted."""
    return sorted({*_OPS, "Constant"})


def _form_problem(node: onnx.NodeProto, attrs: dict[str, Any]) -> str | None:
    """Why a supported operator's form is not supported (``None`` when it is)."""
    op = node.op_type
    if op == "Resize" or op == "Upsample":
        if _text(attrs, "mode", "nearest") not in ("nearest", "linear", "bilinear"):
            return f"{op} mode {_text(attrs, 'mode', 'nearest')!r}"
        if _text(attrs, "coordinate_transformation_mode", "half_pixel") not in _COORDINATE_MODES:
            return f"{op} coordinate_transformation_mode {_text(attrs, 'coordinate_transformation_mode', '')!r}"
        if int(attrs.get("antialias", 0)):
            return f"{op} antialias=1"
    if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
        return "MaxPool Indices output"
    if op == "AveragePool" and any(int(d) != 1 for d in attrs.get("dilations", [])):
        return "AveragePool dilations"
    if op == "BatchNormalization" and (int(attrs.get("training_mode", 0)) or sum(bool(o) for o in node.output) > 1):
        return "BatchNormalization training_mode"
    if op == "Pad" and _text(attrs, "mode", "constant") not in ("constant", "reflect", "edge", "wrap"):
        return f"Pad mode {_text(attrs, 'mode', 'constant')!r}"
    return None


# ------------------------------------------------------------------------------------------------------- the module


def _preprocess(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Inline model-local functions (a copy when there are any)."""
    if len(proto.functions):
        from onnx import inliner

        return inliner.inline_local_functions(proto)
    return proto


def _opset(proto: onnx.ModelProto) -> int:
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


class OnnxModule(torch.nn.Module):
    """A differentiable float32 twin interpreting an ONNX classifier graph (see the module docstring).

    Parameters
    ----------
    proto : onnx.ModelProto
        The graph, with its tensor data (external data already loaded). Not modified.
    fake_quant : bool
        Keep each QuantizeLinear -> DequantizeLinear pair as fake quantisation (the engine's int8 rounding and
        saturation, straight-through gradient; see the module docstring) instead of the identity: the differentiable
        replica of an int8 engine rather than its float twin. Default ``False``, the float twin.

    Attributes
    ----------
    report : dict
        The conversion: ``nodes`` (count), ``ops`` (sorted op types), ``opset``, ``input_name``, ``input_type``
        (the graph's declared element type; the module always takes float), ``output_name``, ``initializers``,
        ``constants``, ``float_initializers_from`` (sorted ONNX types of the float tensors made float32),
        ``qdq_activation_pairs_dropped`` and ``qdq_weight_pairs_dropped`` (QuantizeLinear -> DequantizeLinear
        pairs made the identity, by what was quantised), ``dequantized_weights`` (DequantizeLinear of integer
        initializers) and ``quantized_weight_types`` (their integer types). With ``fake_quant`` only, also
        ``fake_quant`` (True), ``fake_quant_activation_pairs`` and ``fake_quant_weight_pairs`` (the pairs kept as
        fake quantisation; the ``*_dropped`` counts are then 0).
    buffer_names : dict of str to str
        ONNX tensor name (initializer, or a Constant node's output) -> buffer name.
    input_name, output_name : str

    Raises
    ------
    kit.errors.UserError
        An unsupported operator or form (all of them named in one line), not one input and one output, a tensor
        type the twin cannot hold.
    """

    def __init__(self, proto: onnx.ModelProto, *, fake_quant: bool = False) -> None:
        super().__init__()
        self._build(proto, with_data=True, fake_quant=fake_quant)

    @classmethod
    def from_skeleton(cls, skeleton: bytes, *, fake_quant: bool = False) -> OnnxModule:
        """A module from :func:`graph_skeleton` bytes, with zero buffers to be filled by ``load_state_dict``.

        Parameters
        ----------
        skeleton : bytes
            ``graph_skeleton(proto)``.
        fake_quant : bool
            As for the constructor (it changes no buffer).

        Returns
        -------
        OnnxModule
            Same buffer names, shapes and dtypes as ``OnnxModule(proto)``; ``load_state_dict(state, strict=True)``
            with that module's state makes it compute the same logits bit for bit.
        """
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(bytes(skeleton))
        except DecodeError as e:
            raise UserError(f"not an ONNX graph skeleton ({type(e).__name__})") from e
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module._build(proto, with_data=False, fake_quant=fake_quant)
        return module

    # ------------------------------------------------------------------------------------------------- building

    def _build(self, proto: onnx.ModelProto, *, with_data: bool, fake_quant: bool = False) -> None:
        proto = _preprocess(proto)
        graph = proto.graph
        opset = _opset(proto)
        self._check_ops(graph)
        if len(graph.sparse_initializer):
            raise UserError("ONNX graph has sparse initializers, which the twin does not support")

        self.buffer_names: dict[str, str] = {}
        stored_types: dict[str, int] = {}  # ONNX type of each stored tensor (initializers, Constant nodes)
        float_types: set[str] = set()

        def add(onnx_name: str, buffer: str, t: TensorProto) -> None:
            dtype = _torch_dtype(t.data_type, onnx_name)
            if t.data_type in _FLOAT_TYPES:
                float_types.add(_type_name(t.data_type))
            if with_data:
                if t.data_location == TensorProto.EXTERNAL:
                    raise UserError(f"ONNX tensor {onnx_name!r} keeps its data in an external file that was not loaded: "
                                    "pass the model's path to onnx_to_torch, or load it with its external data")
                value = _tensor_from_proto(t, onnx_name)
            else:
                value = torch.zeros(tuple(int(d) for d in t.dims), dtype=dtype)
            self.register_buffer(buffer, value, persistent=True)
            self.buffer_names[onnx_name] = buffer
            stored_types[onnx_name] = t.data_type

        for i, t in enumerate(graph.initializer):
            add(t.name, f"i{i}_{_sanitize(t.name)}", t)
        initializer_names = {t.name for t in graph.initializer}

        inputs = [v for v in graph.input if v.name not in initializer_names]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise UserError(f"the ONNX twin needs a graph with one input and one output, this one has {len(inputs)} "
                            f"input(s) and {len(graph.output)} output(s)")
        self.input_name: str = inputs[0].name
        self.output_name: str = graph.output[0].name
        dims = inputs[0].type.tensor_type.shape.dim
        # a fixed batch size (torch.onnx.export without dynamic_axes writes 1): forward runs that many at a time
        self.static_batch: int | None = (int(dims[0].dim_value) if len(dims) and dims[0].HasField("dim_value")
                                         and dims[0].dim_value >= 1 else None)

        # Q/DQ: QuantizeLinear nodes whose every consumer is a DequantizeLinear
        consumers: dict[str, list[int]] = {}
        for i, node in enumerate(graph.node):
            for name in node.input:
                if name:
                    consumers.setdefault(name, []).append(i)
        constant_outputs = {n.output[0] for n in graph.node if n.op_type == "Constant"}
        stored = initializer_names | constant_outputs
        dropped_q: set[int] = set()
        alias_of: dict[int, str] = {}
        pairs = {"activation": 0, "weight": 0}
        for i, node in enumerate(graph.node):
            if node.op_type != "QuantizeLinear":
                continue
            users = consumers.get(node.output[0], [])
            if not users or node.output[0] == self.output_name:
                continue
            if all(graph.node[u].op_type == "DequantizeLinear" and graph.node[u].input[0] == node.output[0]
                   for u in users):
                dropped_q.add(i)
                for u in users:
                    alias_of[u] = node.input[0]
                pairs["weight" if node.input[0] in stored else "activation"] += len(users)
        dequantized = 0
        quantized_types: set[str] = set()

        self._steps: list[_Step] = []
        n_constants = 0
        for i, node in enumerate(graph.node):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Constant":
                add(node.output[0], f"c{i}_{_sanitize(node.output[0])}", _constant_tensor(node, attrs))
                n_constants += 1
                continue
            if i in dropped_q and not fake_quant:
                continue
            if fake_quant:
                fn = _fake_quantize if i in dropped_q else _OPS[node.op_type]  # the pair's DequantizeLinear stays
            else:
                fn = _alias if i in alias_of else _OPS[node.op_type]
            step = _Step(op_type=node.op_type, name=node.name, inputs=list(node.input), outputs=list(node.output),
                         attrs={k: v for k, v in attrs.items() if not isinstance(v, TensorProto)}, opset=opset, fn=fn)
            for k, v in attrs.items():
                if isinstance(v, TensorProto):
                    step.tensors[k] = _tensor_from_proto(v, f"{node.name}.{k}")
            if i in alias_of and not fake_quant:
                step.inputs = [alias_of[i]]
            elif node.op_type == "DequantizeLinear" and node.input[0] in stored_types:
                dequantized += 1
                quantized_types.add(_type_name(stored_types[node.input[0]]))
            self._steps.append(step)
        known = {"", self.input_name, *self.buffer_names}
        last_read: dict[str, int] = {}
        for k, step in enumerate(self._steps):
            for name in step.inputs:
                if name not in known:
                    raise UserError(f"ONNX node {step.name!r} ({step.op_type}) reads {name!r} before any node writes it: "
                                    "the graph is not in topological order or is incomplete")
                last_read[name] = k
            known.update(step.outputs)
        if self.output_name not in known:
            raise UserError(f"no ONNX node writes the graph output {self.output_name!r}")
        for name, k in last_read.items():
            if name and name not in self.buffer_names and name != self.output_name:
                self._steps[k].release.append(name)

        self.report: dict[str, Any] = {
            "nodes": len(graph.node),
            "ops": sorted({n.op_type for n in graph.node}),
            "opset": opset,
            "input_name": self.input_name,
            "input_type": _type_name(inputs[0].type.tensor_type.elem_type),
            "output_name": self.output_name,
            "initializers": len(graph.initializer),
            "constants": n_constants,
            "float_initializers_from": sorted(float_types),
            "qdq_activation_pairs_dropped": pairs["activation"],
            "qdq_weight_pairs_dropped": pairs["weight"],
            "dequantized_weights": dequantized,
            "quantized_weight_types": sorted(quantized_types),
        }
        if fake_quant:
            self.report.update(qdq_activation_pairs_dropped=0, qdq_weight_pairs_dropped=0, fake_quant=True,
                               fake_quant_activation_pairs=pairs["activation"],
                               fake_quant_weight_pairs=pairs["weight"])

    @staticmethod
    def _check_ops(graph: onnx.GraphProto) -> None:
        """Raise one UserError naming every unsupported operator (and form) with its first node."""
        unknown: dict[str, str] = {}
        forms: dict[str, str] = {}
        for i, node in enumerate(graph.node):
            label = node.name or f"#{i}"
            domain = node.domain if node.domain not in ("", "ai.onnx") else ""
            op = f"{domain}::{node.op_type}" if domain else node.op_type
            if domain or (node.op_type not in _OPS and node.op_type != "Constant"):
                unknown.setdefault(op, label)
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            problem = _form_problem(node, attrs)
            if problem:
                forms.setdefault(problem, label)
        if unknown or forms:
            parts = [f"{op} (node {label!r})" for op, label in sorted(unknown.items())]
            parts += [f"{form} (node {label!r})" for form, label in sorted(forms.items())]
            what = "operator(s)" if unknown and not forms else "operator(s) or form(s)"
            hint = ("; com.microsoft operators are ONNX Runtime's fused kernels, written by its graph optimiser: "
                    "import the file as it was exported, before that optimisation"
                    if any(op.startswith("com.microsoft::") for op in unknown) else "")
            raise UserError(f"the ONNX twin does not support {what}: {', '.join(parts)}{hint}")

    # ------------------------------------------------------------------------------------------------- running

    def forward(self, x: Tensor) -> Tensor:
        """Run the graph on ``x`` (the graph's native input layout and range, any float dtype) in float32.

        A graph whose batch size is fixed (:attr:`static_batch`) sees that many inputs at a time: ``x`` is cut into
        chunks of it, the last one padded with zeros and its extra outputs dropped, so its Reshape constants (such as
        ``[1, -1]``) hold; each input's output and gradient are what the graph gives it alone.

        Returns
        -------
        torch.Tensor
            The graph's output, float32.
        """
        fixed = self.static_batch
        if fixed is None or x.shape[0] == fixed:
            return self._run(x)
        return run_fixed_batch(self._run, x, fixed)

    def _run(self, x: Tensor) -> Tensor:
        values: dict[str, Value] = {name: getattr(self, buf) for name, buf in self.buffer_names.items()}
        values[self.input_name] = x.to(torch.float32)
        values[""] = None
        for step in self._steps:
            ins = [values[name] for name in step.inputs]
            out = step.fn(step, ins)
            if isinstance(out, Tensor) or out is None:
                out = [out]
            for name, v in zip(step.outputs, out):
                if name:
                    values[name] = v
            for name in step.release:  # free memory early (autograd keeps what backward needs)
                del values[name]
        return values[self.output_name].to(torch.float32)

    def extra_repr(self) -> str:
        return (f"opset={self.report['opset']}, nodes={self.report['nodes']}, "
                f"input={self.input_name!r}, output={self.output_name!r}")


def _constant_tensor(node: onnx.NodeProto, attrs: dict[str, Any]) -> TensorProto:
    """The TensorProto of a Constant node, whichever ``value*`` attribute holds it."""
    name = node.output[0]
    if "value" in attrs:
        return attrs["value"]
    if "value_float" in attrs:
        return helper.make_tensor(name, TensorProto.FLOAT, [], [attrs["value_float"]])
    if "value_floats" in attrs:
        return helper.make_tensor(name, TensorProto.FLOAT, [len(attrs["value_floats"])], attrs["value_floats"])
    if "value_int" in attrs:
        return helper.make_tensor(name, TensorProto.INT64, [], [attrs["value_int"]])
    if "value_ints" in attrs:
        return helper.make_tensor(name, TensorProto.INT64, [len(attrs["value_ints"])], attrs["value_ints"])
    kinds = ", ".join(sorted(attrs)) or "none"
    raise UserError(f"the ONNX twin does not support Constant node {node.name!r} with attribute(s) {kinds}")


# --------------------------------------------------------------------------------------------------- persistence


def _strip(t: TensorProto) -> None:
    for f in _DATA_FIELDS:
        t.ClearField(f)
    t.data_location = TensorProto.DEFAULT


def graph_skeleton(proto: onnx.ModelProto) -> bytes:
    """The serialised model without its tensor payloads, for :meth:`OnnxModule.from_skeleton`.

    Every initializer and every ``Constant`` node's ``value`` tensor keeps its name, dims and data type but loses its
    data (raw, typed or external); the twin holds those tensors as buffers, so they travel in its ``state_dict``.
    Scalar Constant attributes (``value_float``, ``value_ints``, ...) and other tensor attributes (such as
    ConstantOfShape's ``value``) are small and stay.

    Parameters
    ----------
    proto : onnx.ModelProto
        Not modified.

    Returns
    -------
    bytes
    """
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(_preprocess(proto))
    for t in skeleton.graph.initializer:
        _strip(t)
    for node in skeleton.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    _strip(a.t)
    return skeleton.SerializeToString()


def onnx_to_torch(source: str | Path | bytes | onnx.ModelProto, *, fake_quant: bool = False) -> OnnxModule:
    """Build the twin of an ONNX model given as a file path, serialised bytes or a ``ModelProto``.

    A file's external data is read by ``onnx.load`` from the file's folder. ``fake_quant=True`` builds the
    differentiable replica of an int8 Q/DQ engine instead of its float twin (see :class:`OnnxModule`).

    Raises
    ------
    kit.errors.UserError
        A missing file, bytes that are not an ONNX model, or a graph the twin cannot run.
    """
    if isinstance(source, onnx.ModelProto):
        proto = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(bytes(source))
        except DecodeError as e:
            raise UserError(f"not an ONNX model ({type(e).__name__})") from e
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"ONNX file not found: {path}")
        try:
            proto = onnx.load(str(path), load_external_data=True)
        except DecodeError as e:
            raise UserError(f"not an ONNX model: {path} ({type(e).__name__})") from e
        except (OSError, ValueError) as e:  # unreadable file or external data
            raise UserError(f"cannot read ONNX file {path}: {' '.join(str(e).split())}") from e
    return OnnxModule(proto, fake_quant=fake_quant)
