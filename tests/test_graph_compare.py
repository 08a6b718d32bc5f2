"""An engine file compared with its twin's export (:mod:`exporters.onnx.compare`, ``engine-graph-differs``).

The kit's exports of a twin are identical (fp32, fp16) or equivalent (int8, its Q/DQ nodes read back) to the twin
exported again. Files edited after their export differ: a trigger that adds to one class's logit when a corner of the
image is bright, a bias raised by 1 on one class, an int8 weight scale made four times coarser (its integers
requantised to stay within half a step). ONNX Runtime, the independent reference here, runs the trigger file exactly
like the honest one on every clean test image: no clean comparison can see it.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper, numpy_helper

from exporters.onnx import OnnxRuntimeEngine, set_metadata, torch_to_onnx, write_onnx_export
from exporters.onnx.compare import compare_graphs, compare_to_export
from kit.checkpoint import load_twin
from kit.cli import cli
from tests.clitools import verify_without_flag

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(digits_model, digits_exports):
    """The digits twin, its checkpoint, its fp32, fp16 and int8 exports (paths) and the test split."""
    from kit.data import load_dataset

    path, _ = digits_model
    return load_twin(path)[0], path, digits_exports, load_dataset("digits:16", "test")


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def with_trigger(proto: onnx.ModelProto, boost: float = 100.0) -> onnx.ModelProto:
    """``proto`` plus a trigger: ``boost`` on class 0's logit when the top-left 3x3 corner of every channel is above
    0.99 (digits have an empty background there). The metadata is kept: it still records the twin's weights."""
    bad = copy.deepcopy(proto)
    g = bad.graph
    out = g.output[0].name
    last = next(n for n in reversed(g.node) if out in n.output)
    last.output[list(last.output).index(out)] = "clean_logits"
    classes = g.output[0].type.tensor_type.shape.dim[1].dim_value
    boost_row = np.zeros((1, classes), np.float32)
    boost_row[0, 0] = boost
    g.node.extend([
        _const("t_starts", np.array([0, 0], np.int64)), _const("t_ends", np.array([3, 3], np.int64)),
        _const("t_axes", np.array([2, 3], np.int64)), _const("t_all", np.array([1, 2, 3], np.int64)),
        _const("t_shape", np.array([-1, 1], np.int64)), _const("t_level", np.array(0.99, np.float32)),
        _const("t_boost", boost_row),
        helper.make_node("Slice", [g.input[0].name, "t_starts", "t_ends", "t_axes"], ["t_corner"]),
        helper.make_node("ReduceMin", ["t_corner", "t_all"], ["t_min"], keepdims=1),
        helper.make_node("Reshape", ["t_min", "t_shape"], ["t_min2"]),
        helper.make_node("Greater", ["t_min2", "t_level"], ["t_on"]),
        helper.make_node("Cast", ["t_on"], ["t_onf"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", ["t_onf", "t_boost"], ["t_add"]),
        helper.make_node("Add", ["clean_logits", "t_add"], [out]),
    ])
    onnx.checker.check_model(bad)
    return bad


def head_bias(proto: onnx.ModelProto) -> tuple[onnx.TensorProto, onnx.TensorProto | None]:
    """The initializer behind the last Gemm's bias and, when it is quantised, its DequantizeLinear's scale."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    gemm = [n for n in g.node if n.op_type == "Gemm"][-1]
    name = gemm.input[2]
    dq = next((n for n in g.node if n.op_type == "DequantizeLinear" and name in n.output), None)
    if dq is None:
        return inits[name], None
    return inits[dq.input[0]], inits[dq.input[1]]


def with_raised_bias(proto: onnx.ModelProto, cls: int = 3, by: float = 1.0) -> onnx.ModelProto:
    bad = copy.deepcopy(proto)
    bias, scale = head_bias(bad)
    value = numpy_helper.to_array(bias).copy()
    step = 1.0 if scale is None else float(numpy_helper.to_array(scale).reshape(-1)[0])
    value[cls] += value.dtype.type(by if scale is None else round(by / step))
    bias.CopyFrom(numpy_helper.from_array(value, bias.name))
    return bad


def with_coarser_scale(proto: onnx.ModelProto, reference: onnx.ModelProto, factor: float = 4.0) -> onnx.ModelProto:
    """The first convolution's int8 weights at a ``factor`` times coarser scale, quantised again from the float graph
    ``reference`` (what the file quantised): each still within half a (new) step of the twin's weight."""
    bad = copy.deepcopy(proto)
    g = bad.graph
    inits = {t.name: t for t in g.initializer}
    conv = next(n for n in g.node if n.op_type == "Conv")
    dq = next(n for n in g.node if n.op_type == "DequantizeLinear" and conv.input[1] in n.output)
    ref_conv = next(n for n in reference.graph.node if n.op_type == "Conv")
    value = numpy_helper.to_array(next(t for t in reference.graph.initializer if t.name == ref_conv.input[1]))
    q, s = numpy_helper.to_array(inits[dq.input[0]]), numpy_helper.to_array(inits[dq.input[1]])
    shape = [-1] + [1] * (q.ndim - 1)
    s2 = (s * factor).astype(s.dtype)
    q2 = np.clip(np.rint(value / s2.reshape(shape)), -127, 127).astype(q.dtype)
    inits[dq.input[0]].CopyFrom(numpy_helper.from_array(q2, dq.input[0]))
    inits[dq.input[1]].CopyFrom(numpy_helper.from_array(s2, dq.input[1]))
    return bad


def logits(proto: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    return OnnxRuntimeEngine(proto.SerializeToString(), providers=["cpu"])(x).numpy()


@pytest.mark.parametrize("precision,status", [("fp32", "identical"), ("fp16", "identical"), ("int8", "equivalent")])
def test_a_kit_export_is_its_twin_exported_again(exported, precision, status):
    model, _, files, _ = exported
    proto = onnx.load(str(files[precision]))
    got = compare_to_export(proto, model, (1, 16, 16))
    assert got.status == status, got.reason


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_a_trigger_runs_like_the_twin_on_clean_images_and_its_graph_differs(exported, precision):
    model, _, files, test = exported
    proto = onnx.load(str(files[precision]))
    bad = with_trigger(proto)
    x = test.x
    assert np.array_equal(logits(bad, x), logits(proto, x))  # ONNX Runtime: the same on every clean test image
    lit = x[:16].clone()
    lit[:, :, :3, :3] = 1.0
    assert (logits(bad, lit).argmax(1) == 0).all() and not (logits(proto, lit).argmax(1) == 0).all()
    got = compare_to_export(bad, model, (1, 16, 16))
    assert got.status == "differs" and "operators where the export has" in got.reason, got.reason


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_a_raised_bias_differs(exported, precision):
    model, _, files, test = exported
    proto = onnx.load(str(files[precision]))
    bad = with_raised_bias(proto)
    gap = logits(bad, test.x[:32]) - logits(proto, test.x[:32])
    # the edit really is +1 on class 3 (ONNX Runtime; the int8 file quantises its logits, in steps of about 0.15)
    assert np.allclose(gap[:, 3], 1.0, atol=0.2 if precision == "int8" else 0.01)
    got = compare_to_export(bad, model, (1, 16, 16))
    assert got.status == "differs" and "Gemm" in got.reason, got.reason


def test_a_coarser_int8_scale_differs_though_every_weight_is_within_half_its_step(exported):
    from exporters.onnx.quantize import pre_process

    model, _, files, _ = exported
    reference = pre_process(torch_to_onnx(model, (1, 16, 16), dynamo=False).proto)
    bad = with_coarser_scale(onnx.load(str(files["int8"])), reference)
    got = compare_to_export(bad, model, (1, 16, 16))
    assert got.status == "differs" and "coarser step" in got.reason, got.reason


def test_another_twin_differs_and_renamed_nodes_do_not(exported):
    import models

    model, _, files, _ = exported
    proto = onnx.load(str(files["fp32"]))
    torch.manual_seed(1)
    other = models.create("cnn-small", 10, (1, 16, 16))
    assert compare_to_export(proto, other, (1, 16, 16)).status == "differs"
    renamed = copy.deepcopy(proto)
    for i, node in enumerate(renamed.graph.node):
        node.name = f"n{i}"
    assert compare_graphs(renamed.graph, proto.graph) is None
    assert compare_to_export(renamed, model, (1, 16, 16)).status == "equivalent"


def test_files_it_cannot_judge_are_not_compared(exported):
    from exporters.graph import read_metadata

    model, _, files, _ = exported
    proto = onnx.load(str(files["fp32"]))
    meta = {f"otkit.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in read_metadata(proto).items()}
    other = copy.deepcopy(proto)
    tools = json.loads(meta["otkit.toolchain"])
    set_metadata(other, {**meta, "otkit.toolchain": json.dumps({**tools, "onnxruntime": "0.1"})})
    got = compare_to_export(with_trigger(other), model, (1, 16, 16))
    assert got.status == "not compared" and "onnxruntime 0.1" in got.reason, got.reason
    old = copy.deepcopy(proto)
    set_metadata(old, {k: v for k, v in meta.items() if k != "otkit.toolchain"})
    assert compare_to_export(old, model, (1, 16, 16)).status == "not compared"
    foreign = copy.deepcopy(proto)
    del foreign.metadata_props[:]
    assert compare_to_export(foreign, model, (1, 16, 16)).status == "not compared"


def test_the_audit_fails_a_trigger_and_verify_raises_the_flag_again(exported, tmp_path):
    _, twin, files, _ = exported
    engine = tmp_path / "trigger.onnx"
    onnx.save(with_trigger(onnx.load(str(files["fp32"]))), str(engine))
    out = tmp_path / "audit"
    res = CliRunner().invoke(cli, ["-q", "audit", "--engine", str(engine), "--twin", str(twin), "--attack",
                                   "pgd-linf@0.3", "--samples", "20", "--batch-size", "20", "--rungs", "3",
                                   "--blackbox-samples", "10", "--spot-check", "200", "--allow-flag", "test-blind",
                                   "--out", str(out)])
    doc = json.loads((out / "report.json").read_text())
    flagged = {c["id"]: c for c in doc["checks"]}
    assert res.exit_code == 1 and doc["status"] == "fail", res.output
    assert doc["clean"]["top1_agreement"] == 1.0 and doc["clean"]["spot_check"]["verdict"] == "match"
    assert doc["engine"]["graph"]["status"] == "differs"
    assert flagged["engine-graph-differs"]["severity"] == "error"
    # a report edited to drop the flag (and re-derived to pass) fails verify: the flag follows from the files
    res = verify_without_flag(out, "engine-graph-differs", tmp_path / "forged", engine, twin)
    assert res.exit_code == 1 and "verify: checks: engine-graph-differs is raised again from the files" in \
        res.stderr, res.output


def test_declarations_and_unreadable_quantisation_differ_without_raising(exported):
    model, _, files, _ = exported
    fp32, int8 = onnx.load(str(files["fp32"])), onnx.load(str(files["int8"]))
    newer = copy.deepcopy(fp32)
    newer.opset_import[0].version += 1  # other operator semantics, the same nodes
    got = compare_to_export(newer, model, (1, 16, 16))
    assert got.status == "differs" and "declares opsets" in got.reason, got.reason
    wider = copy.deepcopy(fp32)
    wider.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    got = compare_to_export(wider, model, (1, 16, 16))
    assert got.status == "differs" and "graph inputs have other types" in got.reason, got.reason
    broken = copy.deepcopy(int8)
    scale = next(n for n in broken.graph.node if n.op_type == "DequantizeLinear").input[1]
    kept = [t for t in broken.graph.initializer if t.name != scale]
    del broken.graph.initializer[:]
    broken.graph.initializer.extend(kept)
    got = compare_to_export(broken, model, (1, 16, 16))
    assert got.status == "differs" and "cannot be read back" in got.reason, got.reason
    blocked = copy.deepcopy(int8)  # blocked quantisation would read the same integers and scales otherwise
    next(n for n in blocked.graph.node if n.op_type == "DequantizeLinear").attribute.append(
        helper.make_attribute("block_size", 2))
    got = compare_to_export(blocked, model, (1, 16, 16))
    assert got.status == "differs" and "block_size" in got.reason, got.reason


def _initializer(proto: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    proto.graph.initializer.append(numpy_helper.from_array(value, name))


def _logits_pair(proto: onnx.ModelProto) -> tuple[onnx.NodeProto, onnx.NodeProto]:
    """The QuantizeLinear and DequantizeLinear that produce an int8 file's logits."""
    nodes = list(proto.graph.node)
    dq = next(n for n in nodes if proto.graph.output[0].name in n.output)
    return next(n for n in nodes if dq.input[0] in n.output), dq


def test_an_int8_logit_pair_that_shifts_or_rescales_differs(exported):
    """An activation's Q/DQ pair may only round: a per-class zero point on the logits' DequantizeLinear adds about 1
    to class 0 (ONNX Runtime), a scale four times the QuantizeLinear's multiplies every logit; both differ."""
    model, _, files, test = exported
    int8 = onnx.load(str(files["int8"]))
    inits = {t.name: numpy_helper.to_array(t) for t in int8.graph.initializer}
    scale = float(inits[_logits_pair(int8)[1].input[1]])
    shifted = copy.deepcopy(int8)
    _, dq = _logits_pair(shifted)
    zero = np.zeros(10, np.int8)
    zero[0] = -round(1 / scale)
    _initializer(shifted, "t_scales", np.full(10, scale, np.float32))
    _initializer(shifted, "t_zeros", zero)
    dq.input[1], dq.input[2] = "t_scales", "t_zeros"
    dq.attribute.append(helper.make_attribute("axis", 1))
    gap = logits(shifted, test.x[:32]) - logits(int8, test.x[:32])
    assert np.allclose(gap[:, 0], 1.0, atol=scale) and np.allclose(gap[:, 1:], 0.0)
    got = compare_to_export(shifted, model, (1, 16, 16))
    assert got.status == "differs" and "different scales" in got.reason, got.reason
    rescaled = copy.deepcopy(int8)
    _, dq = _logits_pair(rescaled)
    _initializer(rescaled, "t_scale", np.array(4 * scale, np.float32))
    dq.input[1] = "t_scale"
    assert np.allclose(logits(rescaled, test.x[:8]), 4 * logits(int8, test.x[:8]), rtol=1e-5, atol=1e-5)
    got = compare_to_export(rescaled, model, (1, 16, 16))
    assert got.status == "differs" and "different scales" in got.reason, got.reason
    zero_point = copy.deepcopy(int8)
    q, dq = _logits_pair(zero_point)
    _initializer(zero_point, "t_zero", np.array(5, np.int8))
    q.input[2], dq.input[2] = "t_zero", "t_zero"  # the same on both sides: it moves where the logits saturate
    got = compare_to_export(zero_point, model, (1, 16, 16))
    assert got.status == "differs" and "zero point" in got.reason, got.reason


def test_quantisation_nodes_in_an_fp32_file_differ(exported):
    model, _, files, _ = exported
    fp32 = onnx.load(str(files["fp32"]))
    bad = copy.deepcopy(fp32)
    g = bad.graph
    out = g.output[0].name
    last = next(n for n in g.node if out in n.output)
    last.output[0] = "t_float"
    _initializer(bad, "t_s", np.array(0.01, np.float32))
    _initializer(bad, "t_z", np.array(0, np.int8))
    g.node.extend([helper.make_node("QuantizeLinear", ["t_float", "t_s", "t_z"], ["t_q"]),
                   helper.make_node("DequantizeLinear", ["t_q", "t_s", "t_z"], [out])])
    got = compare_to_export(bad, model, (1, 16, 16))
    assert got.status == "differs" and "operators where the export has" in got.reason, got.reason


def test_int8_weights_at_one_scale_per_tensor_differ(exported):
    """The head's weights quantised per tensor (their largest magnitude over 127, rounded honestly): every weight
    within half its step, but that step is coarser than the channel's own for every channel but the largest."""
    from exporters.onnx.quantize import pre_process

    model, _, files, _ = exported
    bad = onnx.load(str(files["int8"]))
    reference = pre_process(torch_to_onnx(model, (1, 16, 16), dynamo=False).proto)
    gemm = [n for n in bad.graph.node if n.op_type == "Gemm"][-1]
    dq = next(n for n in bad.graph.node if n.op_type == "DequantizeLinear" and gemm.input[1] in n.output)
    ref_gemm = [n for n in reference.graph.node if n.op_type == "Gemm"][-1]
    w = numpy_helper.to_array(next(t for t in reference.graph.initializer if t.name == ref_gemm.input[1]))
    step = np.float32(np.abs(w).max() / 127)
    _initializer(bad, "t_w", np.clip(np.rint(w / step), -127, 127).astype(np.int8))
    _initializer(bad, "t_step", np.array(step, np.float32))
    _initializer(bad, "t_zero", np.array(0, np.int8))
    dq.input[0], dq.input[1], dq.input[2] = "t_w", "t_step", "t_zero"
    del dq.attribute[:]
    got = compare_to_export(bad, model, (1, 16, 16))
    assert got.status == "differs" and "coarser step" in got.reason, got.reason


@pytest.mark.parametrize("arch", ["cnn-cw", "resnet20", "wrn-10-1"])
def test_zoo_exports_are_their_twins(arch, tmp_path):
    """Untrained zoo models (wrn's pre-activation BatchNormalization stays float, and its zero biases are folded into
    one constant that a Conv shares): fp16 identical, int8 equivalent."""
    import models

    torch.manual_seed(0)
    model = models.create(arch, 10, (1, 16, 16)).eval()
    graph = torch_to_onnx(model, (1, 16, 16), dynamo=False)
    x = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for precision, status in (("fp16", "identical"), ("int8", "equivalent")):
        path = write_onnx_export(graph, tmp_path / f"{precision}.onnx", model, x[:16], precision=precision,
                                 calibration_x=x).path
        got = compare_to_export(onnx.load(str(path)), model, (1, 16, 16))
        assert got.status == status, (precision, got.reason)


def test_int8_quantisation_the_kit_never_writes_differs(exported):
    """What ONNX Runtime runs differently from a plain rounding: a uint8 zero point on the logits' pair (a ReLU on the
    logits: argmax unchanged), a QuantizeLinear of a float constant (uint8 without a zero point: negatives become 0),
    and a second pair after the logits' (ONNX Runtime's optimiser may drop it, another runtime not)."""
    model, _, files, test = exported
    int8 = onnx.load(str(files["int8"]))
    relu = copy.deepcopy(int8)
    q, dq = _logits_pair(relu)
    _initializer(relu, "t_u0", np.array(0, np.uint8))
    q.input[2], dq.input[2] = "t_u0", "t_u0"
    out = logits(relu, test.x[:32])
    assert (out >= 0).all() and (logits(int8, test.x[:32]) < 0).any()  # ONNX Runtime: the negative logits are gone
    got = compare_to_export(relu, model, (1, 16, 16))
    assert got.status == "differs" and "zero point other than int8 0" in got.reason, got.reason
    requantised = copy.deepcopy(int8)
    gemm = [n for n in requantised.graph.node if n.op_type == "Gemm"][-1]
    inits = {t.name: numpy_helper.to_array(t) for t in requantised.graph.initializer}
    w_dq = next(n for n in requantised.graph.node if gemm.input[1] in n.output)
    w = inits[w_dq.input[0]].astype(np.float32) * inits[w_dq.input[1]].reshape(-1, 1)
    _initializer(requantised, "t_w", w)
    _initializer(requantised, "t_ws", np.array(np.abs(w).max() / 127, np.float32))
    requantised.graph.node.insert(0, helper.make_node("QuantizeLinear", ["t_w", "t_ws"], ["t_wq"]))
    w_dq.input[0], w_dq.input[1] = "t_wq", "t_ws"
    del w_dq.input[2:]
    del w_dq.attribute[:]
    got = compare_to_export(requantised, model, (1, 16, 16))
    assert got.status == "differs" and "quantises a constant" in got.reason, got.reason
    chained = copy.deepcopy(int8)
    out_name = chained.graph.output[0].name
    _, dq = _logits_pair(chained)
    dq.output[0] = "t_first"
    _initializer(chained, "t_s4", np.array(4.0, np.float32))
    _initializer(chained, "t_z8", np.array(0, np.int8))
    chained.graph.node.extend([helper.make_node("QuantizeLinear", ["t_first", "t_s4", "t_z8"], ["t_q2"]),
                               helper.make_node("DequantizeLinear", ["t_q2", "t_s4", "t_z8"], [out_name])])
    got = compare_to_export(chained, model, (1, 16, 16))
    assert got.status == "differs" and "quantised twice" in got.reason, got.reason


def test_onnxruntime_s_own_int8_choices_are_equivalent_and_bad_scales_differ(exported, tmp_path):
    """ONNX Runtime enlarges a channel's weight scale where its bias would overflow int32 at input x weight scale (a
    channel of almost-zero weights with a bias of 5): equivalent. A NaN weight scale: differs. A bias moved into a
    Constant node's ``value_floats``: equivalent."""
    import models

    torch.manual_seed(0)
    net = models.create("cnn-small", 10, (1, 16, 16)).eval()
    with torch.no_grad():
        net.body[0].weight[0] *= 1e-6
        net.body[0].bias[0] = 5.0
    x = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    int8 = write_onnx_export(torch_to_onnx(net, (1, 16, 16), dynamo=False), tmp_path / "a.onnx", net,
                             x[:16], precision="int8", calibration_x=x).path
    proto = onnx.load(str(int8))
    scales = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if t.name.endswith("weight_scale")}
    first = next(v for k, v in scales.items() if k.startswith("body.0"))
    assert first[0] > 1e-6 * np.abs(net.body[0].weight[0].detach().numpy()).max() / 127 * 100  # enlarged for the bias
    got = compare_to_export(proto, net, (1, 16, 16))
    assert got.status == "equivalent", got.reason
    nan = copy.deepcopy(proto)
    t = next(t for t in nan.graph.initializer if t.name.startswith("body.0") and t.name.endswith("weight_scale"))
    t.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(t), np.nan), t.name))
    got = compare_to_export(nan, net, (1, 16, 16))
    assert got.status == "differs" and "not finite" in got.reason, got.reason
    model, _, files, _ = exported
    fp32 = onnx.load(str(files["fp32"]))
    bias, _ = head_bias(fp32)
    moved = copy.deepcopy(fp32)
    kept = [t for t in moved.graph.initializer if t.name != bias.name]
    del moved.graph.initializer[:]
    moved.graph.initializer.extend(kept)
    moved.graph.node.insert(0, helper.make_node("Constant", [], [bias.name],
                                                value_floats=numpy_helper.to_array(bias).tolist()))
    got = compare_to_export(moved, model, (1, 16, 16))
    assert got.status == "equivalent", got.reason
