"""The ONNX twin (kit.twins.from_onnx): graphs rebuilt as differentiable torch modules, checked against references.

Every check compares with something the twin does not compute itself: ONNX Runtime on the same graph (CPU), the
original PyTorch module the graph was exported from, or ONNX Runtime on a graph edited to the float semantics the twin
promises (int8 with its activation Q/DQ pairs removed). Zoo models are exported once per module by the kit's own
exporter (dynamo, opset 18) at small input sizes; fp16 and int8 graphs come from exporters.onnx.quantize.
"""

from __future__ import annotations

import copy
import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import models
from exporters.onnx import torch_to_onnx
from exporters.onnx.quantize import to_fp16, to_int8
from exporters.parity import FP32_TOLERANCE
from kit.errors import UserError
from kit.twins.from_onnx import OnnxModule, graph_skeleton, onnx_to_torch, supported_ops

# small tensors and many small operators: one thread is faster, and steadier on a shared machine (conftest)
pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 10
#: (name, input shape, graph initializers are the module's own tensors, i.e. no batch norm folded into a conv)
ZOO = [("cnn-cw", (1, 16, 16), True), ("resnet20", (3, 32, 32), False), ("wrn-10-1", (3, 16, 16), True)]


def _rand(n: int, shape, seed: int) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def _ort(proto: onnx.ModelProto, x: torch.Tensor) -> torch.Tensor:
    """Logits of ONNX Runtime (CPU) on ``x``."""
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def _fp32_tol(reference: torch.Tensor) -> float:
    """The FP32 export parity tolerance of ONNX Runtime: atol + rtol * logit scale."""
    atol, rtol = FP32_TOLERANCE["onnxruntime"]
    return atol + rtol * float(reference.abs().max())


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


@pytest.fixture(scope="module", params=ZOO, ids=[z[0] for z in ZOO])
def zoo(request):
    """(name, shape, exact_fp16, model, fp32 proto) for one zoo model, exported by the kit's exporter."""
    name, shape, exact = request.param
    torch.manual_seed(0)
    model = models.create(name, NUM_CLASSES, shape).eval()
    graph = torch_to_onnx(model, shape)
    return name, shape, exact, model, graph.proto


# ------------------------------------------------------------------------------------------------------ zoo graphs


def test_fp32_twin_matches_onnxruntime_and_torch(zoo):
    name, shape, _, model, proto = zoo
    twin = OnnxModule(proto).eval()
    assert twin.report["opset"] >= 18 and twin.report["float_initializers_from"] == ["float"]
    assert twin.report["input_name"] == "input" and twin.report["output_name"] == "logits"
    assert twin.report["nodes"] == len(proto.graph.node) and "Conv" in twin.report["ops"]
    assert all(not p.requires_grad for p in twin.buffers()) and not list(twin.parameters())
    for n, seed in ((1, 1), (17, 2)):  # batch sizes the export never saw
        x = _rand(n, shape, seed)
        with torch.no_grad():
            got = twin(x)
            expected = model(x)
        ref = _ort(proto, x)
        assert got.dtype == torch.float32 and got.shape == (n, NUM_CLASSES)
        torch.testing.assert_close(got, ref, atol=_fp32_tol(ref), rtol=0)
        torch.testing.assert_close(got, expected, atol=_fp32_tol(expected), rtol=0)
    # float64 and float16 inputs are computed in float32
    with torch.no_grad():
        x = _rand(3, shape, 3)
        torch.testing.assert_close(twin(x.double()), twin(x), atol=0, rtol=0)


def test_gradients_match_the_original_module(zoo):
    name, shape, _, model, proto = zoo
    twin = OnnxModule(proto).eval()
    x = _rand(8, shape, 4)
    y = torch.randint(0, NUM_CLASSES, (8,), generator=torch.Generator().manual_seed(5))

    def input_grad(m: torch.nn.Module) -> torch.Tensor:
        xx = x.clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(m(xx), y, reduction="sum").backward()
        return xx.grad.reshape(len(x), -1)

    g_twin, g_torch = input_grad(twin), input_grad(model)
    cos = torch.nn.functional.cosine_similarity(g_twin, g_torch, dim=1)
    assert g_twin.abs().sum() > 0 and bool((cos > 0.999).all()), cos


def test_fp16_graph_becomes_its_float_twin(zoo):
    name, shape, exact, model, proto = zoo
    proto16 = to_fp16(proto)
    twin = OnnxModule(proto16).eval()
    assert twin.report["float_initializers_from"] == ["float16"] and "Cast" in twin.report["ops"]
    assert all(b.dtype == torch.float32 for b in twin.buffers() if b.is_floating_point())
    x = _rand(64, shape, 6)
    with torch.no_grad():
        got = twin(x)
        original = model(x)
    scale = float(original.abs().max())
    # float16 weights in float32 arithmetic: close to the original module, and not the same
    gap = float((got - original).abs().max())
    assert 0 < gap < 1e-2 * scale and _agreement(got, original) >= 0.9
    if exact:
        # the module with its own tensors rounded to float16 is exactly what the twin computes, to fp32 tolerance
        rounded = copy.deepcopy(model).half().float()
        with torch.no_grad():
            expected = rounded(x)
        torch.testing.assert_close(got, expected, atol=_fp32_tol(expected), rtol=0)
    # ONNX Runtime on the fp16 graph rounds some activations too: agreement and a loose gap only
    ref = _ort(proto16, x)
    assert _agreement(got, ref) >= 0.9 and float((got - ref).abs().max()) < 1e-2 * scale


def _without_activation_qdq(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The int8 graph with each QuantizeLinear -> DequantizeLinear pair on an activation replaced by an Identity.

    The weights' DequantizeLinear nodes stay: ONNX Runtime dequantises them. This is the float twin's semantics,
    computed by ONNX Runtime instead of the twin.
    """
    out = copy.deepcopy(proto)
    graph = out.graph
    inits = {t.name for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    dropped = set()
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        q = producers.get(node.input[0])
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in inits:
            dropped.add(q.output[0])
            src = q.input[0]
            node.op_type = "Identity"
            del node.input[:]
            node.input.append(src)
            del node.attribute[:]
    kept = [n for n in graph.node if not (n.op_type == "QuantizeLinear" and n.output[0] in dropped)]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for n in kept for name in n.input}  # the dropped pairs' scales and zero points go too
    kept_inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    return out


def test_int8_graph_becomes_its_float_twin(zoo):
    name, shape, _, model, proto = zoo
    proto8 = to_int8(proto, _rand(32, shape, 7).numpy())
    twin = OnnxModule(proto8).eval()
    r = twin.report
    assert r["qdq_activation_pairs_dropped"] > 0 and r["dequantized_weights"] > 0
    assert "int8" in r["quantized_weight_types"] and "QuantizeLinear" in r["ops"]
    assert r["qdq_activation_pairs_dropped"] == sum(n.op_type == "QuantizeLinear" for n in proto8.graph.node)
    int8_buffers = [b for b in twin.buffers() if b.dtype == torch.int8]
    assert int8_buffers and any(b.dim() >= 2 for b in int8_buffers)  # weights stay int8 in the state
    x = _rand(64, shape, 8)
    with torch.no_grad():
        got = twin(x)
        original = model(x)
    # dequantised weights, float activations: what ONNX Runtime computes once the activation pairs are gone
    ref_float = _ort(_without_activation_qdq(proto8), x)
    torch.testing.assert_close(got, ref_float, atol=_fp32_tol(ref_float), rtol=0)
    # the int8 engine itself also rounds activations: agreement only (random-weight logits are nearly tied)
    assert _agreement(got, _ort(proto8, x)) >= 0.9 and _agreement(got, original) >= 0.9
    # and the twin still has useful gradients
    xx = x[:4].clone().requires_grad_(True)
    twin(xx).logsumexp(1).sum().backward()
    assert torch.isfinite(xx.grad).all() and xx.grad.abs().sum() > 0


def test_skeleton_and_state_dict_restore_the_twin_exactly(zoo):
    name, shape, _, model, proto = zoo
    x = _rand(5, shape, 9)
    for graph in (proto, to_int8(proto, _rand(16, shape, 10).numpy())):  # float and integer buffers
        full = OnnxModule(graph).eval()
        skeleton = graph_skeleton(graph)
        # no tensor payload left (the node metadata of the dynamo exporter, stack traces included, stays)
        payload = sum(numpy_helper.to_array(t).nbytes for t in graph.graph.initializer)
        assert len(skeleton) < len(graph.SerializeToString()) - 0.99 * payload
        if graph is proto and name == "resnet20":  # 0.27 M parameters
            assert len(skeleton) < 0.1 * len(graph.SerializeToString())
        rebuilt = OnnxModule.from_skeleton(skeleton).eval()
        state = full.state_dict()
        assert list(rebuilt.state_dict()) == list(state)
        for k, v in rebuilt.state_dict().items():
            assert v.dtype == state[k].dtype and v.shape == state[k].shape and not v.any()
        rebuilt.load_state_dict(state, strict=True)
        with torch.no_grad():
            assert torch.equal(rebuilt(x), full(x))
        assert rebuilt.report == full.report and rebuilt.buffer_names == full.buffer_names
    # the source graph is left alone
    assert any(len(t.raw_data) or len(t.float_data) for t in proto.graph.initializer)


def test_onnx_to_torch_sources(zoo, tmp_path):
    name, shape, _, _, proto = zoo
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    x = _rand(2, shape, 11)
    with torch.no_grad():
        outs = [onnx_to_torch(s).eval()(x) for s in (proto, proto.SerializeToString(), path, str(path))]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    # weights in an external data file beside the model: read from the model's folder, not the current one
    folder = tmp_path / "external"
    folder.mkdir()
    onnx.save(proto, str(folder / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    with torch.no_grad():
        assert torch.equal(onnx_to_torch(folder / "m.onnx").eval()(x), outs[0])
    with pytest.raises(UserError, match="external file that was not loaded"):
        onnx_to_torch(onnx.load(str(folder / "m.onnx"), load_external_data=False))
    with pytest.raises(UserError, match="not found"):
        onnx_to_torch(tmp_path / "missing.onnx")
    with pytest.raises(UserError, match="not an ONNX model"):
        onnx_to_torch(b"\xff\x00 not a model")


class _Mixed(torch.nn.Module):
    """Layers the zoo does not use, as the dynamo exporter writes them (Resize, ConvTranspose, LayerNormalization,
    PRelu, HardSwish, GELU via Erf, pooling with ceil_mode and excluded padding, reductions, LogSoftmax, Where...)."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.c1, self.bn = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.dw, self.prelu = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8), nn.PReLU(8)
        self.up, self.ln = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1), nn.LayerNorm(4)
        self.pool, self.avg = nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.fc, self.drop = nn.Linear(16, 10), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        F = torch.nn.functional
        y = F.hardswish(self.bn(self.c1(x)))
        y = self.prelu(self.dw(y)) + F.silu(y)
        z = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        z = F.interpolate(z, size=(5, 7), mode="nearest")
        u = self.ln(self.up(y).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        u = F.gelu(self.avg(self.pool(u)))
        h = torch.cat([u.mean((2, 3)), u.amax((2, 3)), F.adaptive_avg_pool2d(z, 1).flatten(1)], 1)
        h = self.drop(h)
        h = F.elu(h) * torch.sigmoid(h).clamp(0.1, 0.9) - F.softplus(h).sqrt()
        return F.log_softmax(self.fc(h), -1) + F.leaky_relu(h[:, :10], 0.1).abs().pow(1.5)


def test_exported_forms_of_other_layers():
    torch.manual_seed(0)
    model = _Mixed().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    proto = torch_to_onnx(model, (3, 16, 16)).proto
    assert {"Resize", "ConvTranspose", "LayerNormalization", "PRelu", "Erf"} <= {n.op_type for n in proto.graph.node}
    twin = OnnxModule(proto)
    x = _rand(5, (3, 16, 16), 12)
    with torch.no_grad():
        got, expected = twin(x), model(x)
    ref = _ort(proto, x)
    torch.testing.assert_close(got, ref, atol=_fp32_tol(ref), rtol=0)
    torch.testing.assert_close(got, expected, atol=_fp32_tol(expected), rtol=0)
    grads = []
    for m in (twin, model):
        xx = x.clone().requires_grad_(True)
        m(xx).sum().backward()
        grads.append(xx.grad.flatten(1))
    assert bool((torch.nn.functional.cosine_similarity(*grads, dim=1) > 0.999).all())


# ------------------------------------------------------------------------------------------------ hand-built graphs


def _model(nodes, inputs, outputs, inits=(), opset: int = 18, check: bool = True) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    if check:  # the checker wants shapes on the graph's outputs, which single-operator graphs leave to ONNX Runtime
        onnx.checker.check_model(m)
    return m


def _init(name: str, value, dtype=np.float32) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def test_uncommon_ops_against_onnxruntime():
    rng = np.random.default_rng(0)
    big = np.iinfo(np.int64).max
    inits = [
        _init("pads", [0, 0, 1, 1, 0, 0, 1, 1], np.int64),
        _init("scales", [1, 1, 1.5, 1.5]),
        _init("split", [1, 2], np.int64),
        _init("starts", [0, 14], np.int64), _init("ends", [big, -100], np.int64),
        _init("axes", [2, 3], np.int64), _init("steps", [2, -3], np.int64),
        _init("mean_axes", [1], np.int64),
        _init("crop_starts", [0, 0], np.int64), _init("crop_ends", [8, 5], np.int64),
        _init("ln_scale", rng.normal(size=40)), _init("ln_bias", rng.normal(size=40)),
        _init("W", rng.normal(size=(10, 40))), _init("B", rng.normal(size=10)),
    ]
    nodes = [
        helper.make_node("Pad", ["X", "pads"], ["p"], mode="reflect"),                       # (N, 3, 10, 10)
        helper.make_node("Resize", ["p", "", "scales"], ["r"], mode="nearest"),              # (N, 3, 15, 15)
        helper.make_node("Split", ["r", "split"], ["s1", "s2"], axis=1),
        helper.make_node("Slice", ["s2", "starts", "ends", "axes", "steps"], ["sl"]),        # (N, 2, 8, 5)
        helper.make_node("ReduceMean", ["sl", "mean_axes"], ["m"], keepdims=1),              # (N, 1, 8, 5)
        helper.make_node("Slice", ["s1", "crop_starts", "crop_ends", "axes"], ["c1"]),       # (N, 1, 8, 5)
        helper.make_node("Greater", ["m", "c1"], ["gt"]),
        helper.make_node("Where", ["gt", "m", "c1"], ["w"]),
        helper.make_node("Constant", [], ["lo"], value=helper.make_tensor("lo", TensorProto.FLOAT, [], [0.2])),
        helper.make_node("Constant", [], ["hi"], value_float=0.8),
        helper.make_node("Clip", ["w", "lo", "hi"], ["c"]),
        helper.make_node("Flatten", ["c"], ["f"], axis=1),                                   # (N, 40)
        helper.make_node("LayerNormalization", ["f", "ln_scale", "ln_bias"], ["ln"], axis=-1, epsilon=1e-5),
        helper.make_node("Gemm", ["ln", "W", "B"], ["Y"], transB=1, alpha=0.5, beta=2.0),
    ]
    proto = _model(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, 8, 8])],
                   [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 10])], inits)
    x = rng.random((4, 3, 8, 8), dtype=np.float32)
    twin = OnnxModule(proto).eval()
    assert twin.report["constants"] == 2 and len(twin.state_dict()) == len(inits) + 2
    with torch.no_grad():
        got = twin(torch.from_numpy(x))
    ref = torch.from_numpy(_ort(proto, torch.from_numpy(x)).numpy())
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # gradients flow through the whole chain (resize, slices, where, layer norm, gemm)
    xx = torch.from_numpy(x).requires_grad_(True)
    twin(xx).square().sum().backward()
    assert torch.isfinite(xx.grad).all() and xx.grad.abs().sum() > 0
    # Constant tensors are buffers too, so the skeleton drops them and the state restores them
    rebuilt = OnnxModule.from_skeleton(graph_skeleton(proto))
    rebuilt.load_state_dict(twin.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(torch.from_numpy(x)), got)


_F = TensorProto.FLOAT
_I = TensorProto.INT64
_RNG = np.random.default_rng(1)
_W = _RNG.normal(size=(4, 2, 3, 3))


def _case(op, attrs=None, inits=(), inputs=None, outputs=1, out_type=_F, opset=18, x_shape=(2, 4, 9, 9), x=None,
          extra=()):
    """One single-operator graph: X plus initializers in, ``outputs`` outputs."""
    return dict(op=op, attrs=attrs or {}, inits=list(inits), inputs=inputs, outputs=outputs, out_type=out_type,
                opset=opset, x_shape=x_shape, x=x, extra=list(extra))


_CASES = {
    "conv_group_dilation_asym": _case("Conv", dict(group=2, dilations=[2, 2], strides=[2, 2], pads=[1, 0, 2, 1]),
                                      [_init("W", _W), _init("B", _RNG.normal(size=4))]),
    "conv_same_upper": _case("Conv", dict(auto_pad="SAME_UPPER", strides=[2, 2]), [_init("W", _RNG.normal(size=(3, 4, 3, 3)))]),
    "conv_same_lower": _case("Conv", dict(auto_pad="SAME_LOWER", strides=[2, 2], kernel_shape=[2, 2]),
                             [_init("W", _RNG.normal(size=(3, 4, 2, 2)))]),
    "conv1d": _case("Conv", dict(pads=[1, 1]), [_init("W", _RNG.normal(size=(3, 4, 3)))], x_shape=(2, 4, 9)),
    "conv_transpose": _case("ConvTranspose", dict(strides=[2, 2], pads=[1, 1, 0, 0], output_padding=[1, 1]),
                            [_init("W", _RNG.normal(size=(4, 3, 3, 3))), _init("B", _RNG.normal(size=3))]),
    "conv_transpose_output_shape": _case("ConvTranspose", dict(strides=[2, 2], output_shape=[17, 18], group=2),
                                         [_init("W", _RNG.normal(size=(4, 1, 3, 3)))]),
    "maxpool_ceil": _case("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    "maxpool_asym_dilated": _case("MaxPool", dict(kernel_shape=[2, 2], pads=[0, 0, 1, 1], dilations=[2, 2])),
    # a window wholly in the padding: ONNX Runtime gives the lowest float, not -inf
    "maxpool_window_in_padding": _case("MaxPool", dict(kernel_shape=[2, 2], dilations=[3, 3], pads=[1, 1, 1, 1]),
                                       x_shape=(2, 4, 2, 2)),
    # asymmetric pads with ceil_mode: ONNX Runtime drops a last window that would start in the end padding
    "maxpool_asym_ceil": _case("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1),
                               x_shape=(2, 4, 8, 8)),
    "avgpool_asym_ceil_exclude": _case("AveragePool", dict(kernel_shape=[3, 2], strides=[2, 3], pads=[0, 1, 2, 1],
                                                           ceil_mode=1), x_shape=(2, 4, 8, 7)),
    "avgpool_asym_ceil_include": _case("AveragePool", dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 0, 1, 1],
                                                           ceil_mode=1, count_include_pad=1), x_shape=(2, 4, 7, 8)),
    "avgpool_exclude": _case("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    "avgpool_include": _case("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                                                 count_include_pad=1)),
    "avgpool_asym_exclude": _case("AveragePool", dict(kernel_shape=[3, 2], pads=[0, 1, 1, 0])),
    "avgpool_same_upper": _case("AveragePool", dict(kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER")),
    "global_avg": _case("GlobalAveragePool"),
    "global_max": _case("GlobalMaxPool"),
    "batchnorm": _case("BatchNormalization", dict(epsilon=1e-3),
                       [_init("s", _RNG.normal(size=4)), _init("b", _RNG.normal(size=4)),
                        _init("mu", _RNG.normal(size=4)), _init("var", _RNG.random(4) + 0.5)]),
    "instancenorm": _case("InstanceNormalization", {}, [_init("s", _RNG.normal(size=4)), _init("b", _RNG.normal(size=4))]),
    "layernorm_axis1": _case("LayerNormalization", dict(axis=1),
                             [_init("s", _RNG.normal(size=(4, 9, 9))), _init("b", _RNG.normal(size=(4, 9, 9)))]),
    "layernorm_broadcast_scale": _case("LayerNormalization", dict(axis=2), [_init("s", _RNG.normal(size=(1, 9)))]),
    "groupnorm21": _case("GroupNormalization", dict(num_groups=2),
                         [_init("s", _RNG.normal(size=4)), _init("b", _RNG.normal(size=4))], opset=21),
    "lrn": _case("LRN", dict(size=3, alpha=1e-2, beta=0.75, bias=1.0)),
    "prelu": _case("PRelu", {}, [_init("slope", _RNG.normal(size=(4, 1, 1)))]),
    **{op.lower(): _case(op, attrs) for op, attrs in [
        ("Relu", {}), ("LeakyRelu", dict(alpha=0.2)), ("HardSigmoid", dict(alpha=0.3, beta=0.4)), ("HardSwish", {}),
        ("Elu", dict(alpha=0.7)), ("Selu", {}), ("Softplus", {}), ("Sigmoid", {}), ("Tanh", {}), ("Erf", {}),
        ("Exp", {}), ("Abs", {}), ("Neg", {}), ("Sqrt", {}), ("Log", {}), ("Reciprocal", {}), ("Floor", {}),
        ("Round", {}), ("Identity", {}), ("Dropout", {}), ("Not", {}), ("Celu", dict(alpha=0.5)),
        ("Softsign", {}), ("Sign", {}),
    ]},
    "gelu_tanh": _case("Gelu", dict(approximate="tanh"), opset=20),
    "gelu": _case("Gelu", {}, opset=20),
    "softmax": _case("Softmax", dict(axis=1)),
    "logsoftmax": _case("LogSoftmax", {}),
    "softmax_opset11": _case("Softmax", dict(axis=1), opset=11),
    "hardmax": _case("Hardmax", dict(axis=2)),
    "reducesum_input_axes": _case("ReduceSum", dict(keepdims=0), [_init("ax", [1, -1], np.int64)]),
    "reducemax": _case("ReduceMax", {}, [_init("ax", [2, 3], np.int64)]),
    "reducemin_all": _case("ReduceMin", dict(keepdims=0)),
    "reducemean_noop": _case("ReduceMean", dict(noop_with_empty_axes=1)),
    "reducemean_opset13": _case("ReduceMean", dict(axes=[-2, -1]), opset=13),
    "reducel2": _case("ReduceL2", {}, [_init("ax", [1], np.int64)]),
    "reducelogsumexp": _case("ReduceLogSumExp", {}, [_init("ax", [3], np.int64)]),
    "argmax_last": _case("ArgMax", dict(axis=1, keepdims=0, select_last_index=1), out_type=_I),
    "transpose": _case("Transpose", dict(perm=[0, 2, 3, 1])),
    "concat": _case("Concat", dict(axis=1), [_init("y", _RNG.normal(size=(2, 3, 9, 9)))]),
    "gather_negative": _case("Gather", dict(axis=1), [_init("idx", [[0, -1], [2, 1]], np.int64)]),
    "gather_scalar": _case("Gather", dict(axis=3), [_init("idx", -2, np.int64)]),
    "gather_elements": _case("GatherElements", dict(axis=2),
                             [_init("idx", _RNG.integers(-9, 9, size=(2, 4, 3, 9)), np.int64)]),
    "shape_slice": _case("Shape", dict(start=1, end=-1), out_type=_I),
    "size": _case("Size", out_type=_I),
    "unsqueeze": _case("Unsqueeze", {}, [_init("ax", [0, -1], np.int64)]),
    "squeeze": _case("Squeeze", {}, [_init("ax", [0], np.int64)], x_shape=(1, 4, 1, 9)),
    "squeeze_all": _case("Squeeze", x_shape=(1, 4, 1, 9)),
    "expand": _case("Expand", {}, [_init("shape", [3, 1, 1, 1, 1], np.int64)]),
    "tile": _case("Tile", {}, [_init("rep", [1, 2, 1, 3], np.int64)]),
    "flatten2": _case("Flatten", dict(axis=2)),
    "reshape_zero": _case("Reshape", {}, [_init("shape", [0, -1, 3], np.int64)]),
    "reshape_allowzero": _case("Reshape", dict(allowzero=1), [_init("shape", [2, -1, 9], np.int64)]),
    "split_num_outputs": _case("Split", dict(axis=2, num_outputs=3), outputs=3),
    "split_uneven": _case("Split", dict(axis=3, num_outputs=2), outputs=2),
    "slice_negative_default_axes": _case("Slice", {}, [_init("st", [-1, 5], np.int64), _init("en", [-9, 0], np.int64),
                                                       _init("ax", [1, 3], np.int64), _init("sp", [-1, -2], np.int64)]),
    "pad_constant_crop": _case("Pad", {}, [_init("p", [0, 0, 2, -1, 0, 1, -2, 3], np.int64), _init("v", 0.5)]),
    "pad_edge": _case("Pad", dict(mode="edge"), [_init("p", [0, 0, 1, 2, 0, 0, 3, 0], np.int64)]),
    "pad_reflect_axes": _case("Pad", dict(mode="reflect"), [_init("p", [2, 1, 1, 2], np.int64), _init("v", 0.0),
                                                            _init("ax", [-1, 2], np.int64)]),
    "pad_wrap": _case("Pad", dict(mode="wrap"), [_init("p", [0, 0, 1, 2, 0, 0, 2, 1], np.int64)], opset=19),
    "resize_linear_sizes": _case("Resize", dict(mode="linear"), [_init("sz", [2, 4, 13, 6], np.int64)],
                                 inputs=["X", "", "", "sz"]),
    "resize_linear_align": _case("Resize", dict(mode="linear", coordinate_transformation_mode="align_corners"),
                                 [_init("sc", [1, 1, 2, 1.5])], inputs=["X", "", "sc"]),
    "resize_linear_asym_down": _case("Resize", dict(mode="linear", coordinate_transformation_mode="asymmetric"),
                                     [_init("sc", [1, 1, 0.5, 0.75])], inputs=["X", "", "sc"]),
    "resize_linear_pytorch": _case("Resize", dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"),
                                   [_init("sz", [2, 4, 1, 20], np.int64)], inputs=["X", "", "", "sz"]),
    "resize_nearest_ceil_asym": _case("Resize", dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                                                     nearest_mode="round_prefer_ceil"),
                                      [_init("sc", [1, 1, 1.7, 0.6])], inputs=["X", "", "sc"]),
    "resize_nearest_floor_axes": _case("Resize", dict(mode="nearest", nearest_mode="floor", axes=[2, 3]),
                                       [_init("sz", [4, 20], np.int64)], inputs=["X", "", "", "sz"]),
    "resize_symmetric_not_larger": _case("Resize", dict(mode="linear", axes=[2, 3], keep_aspect_ratio_policy="not_larger",
                                                        coordinate_transformation_mode="half_pixel_symmetric"),
                                         [_init("sz", [5, 20], np.int64)], inputs=["X", "", "", "sz"], opset=19),
    # tf2onnx's nearest resize at opsets 11-12 (TF1 resize_nearest_neighbor with half_pixel_centers)
    "resize_tf_half_pixel_for_nn": _case("Resize", dict(mode="nearest", nearest_mode="floor",
                                                        coordinate_transformation_mode="tf_half_pixel_for_nn"),
                                         [_init("roi", np.zeros(0)), _init("sc", [1, 1, 1.5, 0.75])],
                                         inputs=["X", "roi", "sc"], opset=11),
    "resize_tf_half_pixel_for_nn_linear": _case("Resize", dict(mode="linear",
                                                               coordinate_transformation_mode="tf_half_pixel_for_nn"),
                                                [_init("roi", np.zeros(0)), _init("sc", [1, 1, 3, 2])],
                                                inputs=["X", "roi", "sc"], opset=11),
    "einsum": _case("Einsum", dict(equation="nchw,kc->nkhw"), [_init("k", _RNG.normal(size=(3, 4)))]),
    "matmul": _case("MatMul", {}, [_init("m", _RNG.normal(size=(9, 5)))]),
    "gemm_transA": _case("Gemm", dict(transA=1, alpha=2.0), [_init("b", _RNG.normal(size=(9, 4)))], x_shape=(9, 3)),
    "min_max_sum_mean": _case("Max", {}, [_init("a", _RNG.normal(size=(9,))), _init("b", _RNG.normal(size=(4, 1, 1)))]),
    "min3": _case("Min", {}, [_init("a", _RNG.normal(size=(9,))), _init("b", _RNG.normal(size=(4, 1, 1)))]),
    "sum3": _case("Sum", {}, [_init("a", _RNG.normal(size=(9,))), _init("b", _RNG.normal(size=(4, 1, 1)))]),
    "mean3": _case("Mean", {}, [_init("a", _RNG.normal(size=(9,))), _init("b", _RNG.normal(size=(4, 1, 1)))]),
    "pow": _case("Pow", {}, [_init("e", [2.0])]),
    "pow_int_exponent": _case("Pow", {}, [_init("e", 3, np.int64)]),
    "div": _case("Div", {}, [_init("d", _RNG.random(9) + 0.5)]),
    "sub": _case("Sub", {}, [_init("d", _RNG.normal(size=(4, 1, 9)))]),
    "equal": _case("Equal", {}, [_init("d", 0.0)], out_type=TensorProto.BOOL),
    "less": _case("Less", {}, [_init("d", 0.1)], out_type=TensorProto.BOOL),
    "clip_max_only": _case("Clip", {}, [_init("hi", 0.3)], inputs=["X", "", "hi"]),
    "clip_opset10": _case("Clip", dict(min=-0.2, max=0.4), opset=10),
    "cast_int_and_back": _case("Cast", dict(to=TensorProto.INT32), out_type=TensorProto.INT32),
    "castlike": _case("CastLike", {}, [_init("like", [1], np.int64)], out_type=_I),
    "where_scalar": _case("Where", {}, [_init("a", 1.0), _init("b", -1.0)], inputs=["Xb", "a", "b"],
                          extra=[helper.make_node("Cast", ["X"], ["Xb"], to=TensorProto.BOOL)]),
    "dequantize_per_axis": _case("DequantizeLinear", dict(axis=1),
                                 [_init("s", _RNG.random(4) + 0.1), _init("z", [0, 1, -2, 3], np.int8)],
                                 inputs=["Xq", "s", "z"],
                                 extra=[helper.make_node("Cast", ["X"], ["Xq"], to=TensorProto.INT8)]),
    "dequantize_blocked": _case("DequantizeLinear", dict(axis=3, block_size=4),
                                [_init("s", _RNG.random((2, 4, 9, 3)) + 0.1)], inputs=["Xq", "s"], opset=21,
                                extra=[helper.make_node("Cast", ["X"], ["Xq"], to=TensorProto.INT8)]),
    # what onnxruntime's quantize_static writes for every bias: an int32 vector, a scale of shape [1] (per tensor)
    "dequantize_bias_scale_shape1": _case("DequantizeLinear", {}, [_init("s", [0.05]), _init("z", [0], np.int32)],
                                          inputs=["Xq", "s", "z"], x_shape=(9,),
                                          extra=[helper.make_node("Cast", ["X"], ["Xq"], to=TensorProto.INT32)]),
    "quantize_per_tensor": _case("QuantizeLinear", {}, [_init("s", 0.02), _init("z", 3, np.int8)],
                                 out_type=TensorProto.INT8),
    "quantize_uint8_default": _case("QuantizeLinear", {}, [_init("s", 0.01)], out_type=TensorProto.UINT8, opset=13),
    # what nn.PixelShuffle / F.pixel_unshuffle and nn.MultiheadAttention (legacy exporter) and adaptive pooling to a
    # size that does not divide the input (dynamo) write
    "depth_to_space_dcr": _case("DepthToSpace", dict(blocksize=2), x_shape=(2, 8, 3, 5)),
    "depth_to_space_crd": _case("DepthToSpace", dict(blocksize=2, mode="CRD"), x_shape=(2, 8, 3, 5)),
    "space_to_depth": _case("SpaceToDepth", dict(blocksize=3), x_shape=(2, 2, 6, 9)),
    "mod_fmod": _case("Mod", dict(fmod=1), [_init("d", _RNG.normal(size=9) * 2 + 0.5)]),
    "mod_int": _case("Mod", {}, [_init("d", [3, -3, 5, 7, -2, 4, 6, 9, -5], np.int64)], inputs=["Xi", "d"],
                     out_type=_I, extra=[helper.make_node("Cast", ["X"], ["Xi"], to=TensorProto.INT64)]),
    "gather_nd": _case("GatherND", {}, [_init("i", [[[0, 1], [1, 3]], [[1, -1], [0, 0]]], np.int64)]),
    "gather_nd_one_element": _case("GatherND", {}, [_init("i", [1, 2, -1, 3], np.int64)]),
    "gather_nd_batch_dims": _case("GatherND", dict(batch_dims=1),
                                  [_init("i", [[[1, 2, 3], [0, -1, 4]], [[3, 3, 3], [2, 0, 8]]], np.int64)]),
}


def _x_for(name: str, spec) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # stable across runs (str hash is salted)
    x = rng.normal(size=spec["x_shape"]).astype(np.float32)
    if spec["op"] in ("Sqrt", "Log", "Reciprocal"):
        x = np.abs(x) + 0.1
    if name.startswith(("dequantize", "where", "mod_int")):
        x = np.round(x * 20)  # integer-valued, then cast inside the graph
    return x


@pytest.mark.parametrize("name", sorted(_CASES))
def test_operator_against_onnxruntime(name):
    spec = _CASES[name]
    inputs = spec["inputs"] or ["X", *[t.name for t in spec["inits"]]]
    inits, out_type = spec["inits"], spec["out_type"]
    if spec["outputs"] == 1:
        nodes = [*spec["extra"], helper.make_node(spec["op"], inputs, ["Y"], **spec["attrs"])]
    else:  # one output only: the parts are concatenated back in reverse order
        parts = [f"part{i}" for i in range(spec["outputs"])]
        nodes = [*spec["extra"], helper.make_node(spec["op"], inputs, parts, **spec["attrs"]),
                 helper.make_node("Concat", parts[::-1], ["Y"], axis=spec["attrs"]["axis"])]
    if spec["op"] == "Cast":  # and back to float, through the twin's integer path
        nodes = [helper.make_node("Cast", ["X"], ["Xi"], **spec["attrs"]),
                 helper.make_node("Cast", ["Xi"], ["Y"], to=TensorProto.FLOAT)]
        out_type = _F
    if spec["op"] == "Not":
        nodes = [helper.make_node("Greater", ["X", "zero"], ["Xb"]), helper.make_node("Not", ["Xb"], ["Y"])]
        inits, out_type = [_init("zero", 0.0)], TensorProto.BOOL
    x = _x_for(name, spec)
    proto = _model(nodes, [helper.make_tensor_value_info("X", _F, x.shape)],
                   [helper.make_tensor_value_info("Y", out_type, None)], inits, opset=spec["opset"], check=False)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"X": x})[0]
    with torch.no_grad():
        got = OnnxModule(proto).eval()(torch.from_numpy(x))
    assert got.dtype == torch.float32 and tuple(got.shape) == ref.shape, name
    np.testing.assert_allclose(got.numpy(), ref.astype(np.float32), rtol=1e-5, atol=1e-5, err_msg=name)


def test_range_constant_of_shape_and_shape_arithmetic():
    """Shape -> Gather -> Cast -> Range, ConstantOfShape and a dynamic Reshape, as exporters write them."""
    nodes = [
        helper.make_node("Shape", ["X"], ["s"]),
        helper.make_node("Gather", ["s", "three"], ["w"], axis=0),
        helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
        helper.make_node("Range", ["zero", "wf", "half"], ["r"]),                       # 0, .5, ..., w - .5
        helper.make_node("Unsqueeze", ["w", "zero_i"], ["w1"]),
        helper.make_node("Slice", ["r", "zero_i", "w1"], ["rs"]),                       # first w of them
        helper.make_node("ConstantOfShape", ["s"], ["c"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.25])),
        helper.make_node("Mul", ["X", "rs"], ["a"]),
        helper.make_node("Add", ["a", "c"], ["b"]),
        helper.make_node("Slice", ["s", "zero_i", "one_i"], ["n"]),
        helper.make_node("Concat", ["n", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["b", "shape"], ["Y"]),
    ]
    inits = [_init("three", 3, np.int64), _init("zero", 0.0), _init("half", 0.5), _init("zero_i", [0], np.int64),
             _init("one_i", [1], np.int64), _init("minus1", [-1], np.int64)]
    proto = _model(nodes, [helper.make_tensor_value_info("X", _F, ["N", 2, 3, 5])],
                   [helper.make_tensor_value_info("Y", _F, ["N", 30])], inits)
    for n in (1, 3):
        x = torch.rand(n, 2, 3, 5)
        twin = OnnxModule(proto)
        with torch.no_grad():
            torch.testing.assert_close(twin(x), _ort(proto, x), atol=1e-6, rtol=1e-6)


def test_uint8_input_graph_takes_real_values():
    """A graph declared on uint8 pixels: the twin takes float values and lets gradients through its Cast."""
    nodes = [helper.make_node("Cast", ["X"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["xf", "d"], ["xs"]),
             helper.make_node("Flatten", ["xs"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["Y"], transB=1)]
    w = np.random.default_rng(2).normal(size=(3, 12)).astype(np.float32)
    proto = _model(nodes, [helper.make_tensor_value_info("X", TensorProto.UINT8, ["N", 3, 2, 2])],
                   [helper.make_tensor_value_info("Y", _F, ["N", 3])], [_init("d", 255.0), _init("W", w)])
    pixels = np.random.default_rng(3).integers(0, 256, size=(4, 3, 2, 2), dtype=np.uint8)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = torch.from_numpy(sess.run(None, {"X": pixels})[0])
    twin = OnnxModule(proto)
    assert twin.report["input_type"] == "uint8"
    x = torch.from_numpy(pixels.astype(np.float32)).requires_grad_(True)
    got = twin(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    expected_grad = torch.from_numpy(w.sum(0) / 255.0).reshape(3, 2, 2).expand(4, 3, 2, 2)
    torch.testing.assert_close(x.grad, expected_grad)


# ----------------------------------------------------------------------------------------------------------- errors


def test_unsupported_ops_are_named_at_construction():
    nodes = [helper.make_node("Relu", ["X"], ["a"], name="ok"),
             helper.make_node("NonMaxSuppression", ["a", "a"], ["b"], name="nms_1"),
             helper.make_node("NonMaxSuppression", ["b", "b"], ["c"], name="nms_2"),
             helper.make_node("FusedThing", ["c"], ["d"], name="fused", domain="com.example"),
             helper.make_node("TopK", ["d", "k"], ["Y", "idx"], name="topk")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", _F, None)],
                              [helper.make_tensor_value_info("Y", _F, None)], [_init("k", [1], np.int64)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    with pytest.raises(UserError) as info:
        OnnxModule(proto)
    msg = str(info.value)
    assert "\n" not in msg and "Relu" not in msg
    assert "NonMaxSuppression (node 'nms_1')" in msg and "TopK (node 'topk')" in msg
    assert "com.example::FusedThing (node 'fused')" in msg and "nms_2" not in msg
    # through the skeleton too, and for unsupported forms of supported operators
    with pytest.raises(UserError, match="NonMaxSuppression"):
        OnnxModule.from_skeleton(graph_skeleton(proto))
    cubic = _model([helper.make_node("Resize", ["X", "", "sc"], ["Y"], mode="cubic", name="up")],
                   [helper.make_tensor_value_info("X", _F, [1, 1, 2, 2])],
                   [helper.make_tensor_value_info("Y", _F, [1, 1, 4, 4])], [_init("sc", [1, 1, 2, 2])])
    with pytest.raises(UserError, match=r"Resize mode 'cubic' \(node 'up'\)"):
        OnnxModule(cubic)
    assert "NonMaxSuppression" not in supported_ops() and "Conv" in supported_ops()
    # a file saved after ONNX Runtime's graph optimisation: its fused kernels are named, and what to import instead
    fused = helper.make_model(helper.make_graph(
        [helper.make_node("FusedConv", ["X", "w"], ["Y"], name="fc", domain="com.microsoft", activation="Relu")], "g",
        [helper.make_tensor_value_info("X", _F, None)], [helper.make_tensor_value_info("Y", _F, None)],
        [_init("w", _RNG.normal(size=(2, 4, 3, 3)))]),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(UserError, match=r"com.microsoft::FusedConv \(node 'fc'\).*as it was exported"):
        OnnxModule(fused)


def test_malformed_graphs_are_refused():
    proto = _model([helper.make_node("Add", ["X", "Z"], ["Y"])],
                   [helper.make_tensor_value_info("X", _F, [2]), helper.make_tensor_value_info("Z", _F, [2])],
                   [helper.make_tensor_value_info("Y", _F, [2])])
    with pytest.raises(UserError, match="one input and one output"):
        OnnxModule(proto)
    unsorted = _model([helper.make_node("Relu", ["a"], ["Y"], name="late"), helper.make_node("Neg", ["X"], ["a"])],
                      [helper.make_tensor_value_info("X", _F, [2])], [helper.make_tensor_value_info("Y", _F, [2])],
                      check=False)
    with pytest.raises(UserError, match="'late' \\(Relu\\) reads 'a' before any node writes it"):
        OnnxModule(unsorted)
    with pytest.raises(UserError, match="not an ONNX graph skeleton"):
        OnnxModule.from_skeleton(b"\xff\x00 not a skeleton")


def _fixed_batch_graph(batch: int) -> onnx.ModelProto:
    """Conv -> Reshape to the constant [batch, -1] -> Gemm, with the input's batch fixed at ``batch`` (what
    torch.onnx.export writes without dynamic_axes, from ``x.view(x.size(0), -1)``)."""
    rng = np.random.default_rng(batch)
    nodes = [helper.make_node("Conv", ["X", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "W2", "b"], ["Y"], transB=1)]
    inits = [_init("W", rng.normal(size=(2, 1, 3, 3))), _init("shape", [batch, -1], np.int64),
             _init("W2", rng.normal(size=(5, 32))), _init("b", rng.normal(size=5))]
    graph = helper.make_graph(nodes, "fixed", [helper.make_tensor_value_info("X", _F, [batch, 1, 4, 4])],
                              [helper.make_tensor_value_info("Y", _F, [batch, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("batch", [1, 3])
def test_a_fixed_batch_graph_runs_any_batch(batch, tmp_path, caplog):
    """A graph whose batch is fixed: the twin and the engine run it that many inputs at a time (the last chunk padded),
    so a batch of 7 gives each input what ONNX Runtime gives it in a batch of its own."""
    from exporters.onnx import OnnxRuntimeEngine

    proto = _fixed_batch_graph(batch)
    onnx.checker.check_model(proto, full_check=True)
    x = torch.rand(7, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    pad = np.zeros((batch - 1, 1, 4, 4), np.float32)
    ref = np.concatenate([session.run(None, {"X": np.concatenate([x[i:i + 1].numpy(), pad])})[0][:1]
                          for i in range(len(x))])
    twin = onnx_to_torch(proto)
    assert twin.static_batch == batch and OnnxModule.from_skeleton(graph_skeleton(proto)).static_batch == batch
    xg = x.clone().requires_grad_(True)
    got = twin(xg)
    np.testing.assert_allclose(got.detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert torch.isfinite(xg.grad).all() and (xg.grad.flatten(1).abs().sum(1) > 0).all()
    path = tmp_path / "fixed.onnx"
    onnx.save(proto, str(path))
    engine = OnnxRuntimeEngine(path, max_batch=64)
    assert engine.max_batch == batch  # the graph's own, whatever was asked, and said
    assert f"fixes its batch size at {batch}" in caplog.text
    np.testing.assert_allclose(engine(x).numpy(), ref, rtol=1e-5, atol=1e-5)
