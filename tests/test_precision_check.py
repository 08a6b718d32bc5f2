"""The deployed precision is the claimed one (issue 18): the graph census, the rule, and the flag on a planted lie.

A cnn-small is exported by the kit at fp32, fp16 and int8; the census is checked against counts taken here with
numpy from the files' own tensors, and against the model's hand-computed weight sizes. Then the fault is planted: the
fp32 file's ``otkit.precision`` is rewritten to int8 (and fp16), and the check must fail it. Tiny hand-built graphs
pin the rule's edges (the 90% bar, casts, shared weights, QOperator nodes, graphs without weights).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import models
from evaluators import checks as C
from exporters.graph import (
    REDUCED_PRECISION_BAR,
    deployed_precision,
    infer_precision,
    load_onnx,
    precision_census,
    read_metadata,
)
from exporters.onnx import OnnxRuntimeEngine, torch_to_onnx, write_onnx_export
from exporters.onnx.metadata import set_metadata
from kit.data import load_dataset

SHAPE = (1, 16, 16)
PRECISIONS = ("fp32", "fp16", "int8")
# cnn-small at 1x16x16: Conv 16x1x4x4, Conv 32x16x4x4, Gemm 100x512, Gemm 10x100 (biases are not compute weights)
CNN_SMALL_WEIGHTS = [16 * 1 * 4 * 4, 32 * 16 * 4 * 4, 100 * 512, 10 * 100]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A randomly initialised cnn-small written by the kit at fp32, fp16 and int8: precision -> path."""
    folder = tmp_path_factory.mktemp("precision")
    test = load_dataset("digits:16", "test").subset(16, seed=1)
    calib = load_dataset("digits:16", "train").subset(16, seed=2)
    torch.manual_seed(0)
    model = models.create("cnn-small", 10, SHAPE).eval()
    graph = torch_to_onnx(model, SHAPE, dynamo=False)
    return {p: write_onnx_export(graph, folder / f"cnn-small-{p}.onnx", model, test.x, precision=p,
                                 calibration_x=calib.x if p == "int8" else None, max_batch=16).path
            for p in PRECISIONS}


def _load(path):
    proto, _, _ = load_onnx(path)
    return proto


def _plant(path, out, precision):
    """Copy the file at ``path`` to ``out`` with its ``otkit.precision`` claim rewritten to ``precision``."""
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props if p.key.startswith("otkit.")}
    meta["otkit.precision"] = precision
    set_metadata(proto, meta)
    onnx.save(proto, str(out))
    return out


# ---------------------------------------------------------------------------------------- the census, independently
def _independent_counts(proto: onnx.ModelProto) -> dict:
    """What the census must find, from the file's tensors (numpy sizes and dtypes) and a direct node walk."""
    g = proto.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    by_type: dict[str, dict[str, int]] = {}
    for t in g.initializer:
        entry = by_type.setdefault(TensorProto.DataType.Name(t.data_type), {"tensors": 0, "elements": 0})
        entry["tensors"] += 1
        entry["elements"] += int(inits[t.name].size)
    casts: dict[str, int] = {}
    for n in g.node:
        if n.op_type == "Cast":
            to = TensorProto.DataType.Name(helper.get_attribute_value(n.attribute[0]))
            casts[to] = casts.get(to, 0) + 1
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    weights = {"int8": 0, "fp16": 0, "fp32": 0}
    sizes = []
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm"):
            continue
        w = n.input[1]
        if w in producer and producer[w].op_type == "DequantizeLinear":
            arr = inits[producer[w].input[0]]
            assert arr.dtype == np.int8
            weights["int8"] += arr.size
        else:
            arr = inits[w]
            weights["fp16" if arr.dtype == np.float16 else "fp32"] += arr.size
        sizes.append(int(arr.size))
    return {
        "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in g.node),
        "dequantize_linear": len(dq),
        "qdq_activation_pairs": sum(n.input[0] in producer and producer[n.input[0]].op_type == "QuantizeLinear"
                                    for n in dq),
        "weight_dequantize": sum(n.input[0] in inits and inits[n.input[0]].dtype.kind == "i" for n in dq),
        "constants": by_type,
        "casts": casts,
        "weights": weights,
        "sizes": sizes,
    }


@pytest.mark.parametrize("precision", PRECISIONS)
def test_census_of_each_export_matches_an_independent_count(exports, precision):
    proto = _load(exports[precision])
    census = precision_census(proto)
    want = _independent_counts(proto)
    json.dumps(census)  # JSON-ready: the audit may store it in its report
    for key in ("quantize_linear", "dequantize_linear", "qdq_activation_pairs", "weight_dequantize", "constants",
                "casts"):
        assert census[key] == want[key], key
    w = census["weights"]
    assert sorted(want["sizes"]) == sorted(CNN_SMALL_WEIGHTS)  # the walk found the model's four weights
    assert w["ops"] == {"Conv": 2, "Gemm": 2} and w["tensors"] == 4 and w["elements"] == sum(CNN_SMALL_WEIGHTS)
    for cls in ("int8", "fp16", "fp32"):
        assert w[cls]["elements"] == want["weights"][cls], cls
    assert w["other"] == {"tensors": 0, "elements": 0} and w["without_constant_weight"] == 0
    assert census["inputs"] == ["FLOAT"] and census["outputs"] == ["FLOAT"]  # fp16 keeps float32 io (casts)
    assert [t["elements"] for t in census["tensors"]] == CNN_SMALL_WEIGHTS


def test_census_numbers_of_the_three_exports(exports):
    c = {p: precision_census(_load(exports[p])) for p in PRECISIONS}
    total = sum(CNN_SMALL_WEIGHTS)  # 60,648
    assert c["fp32"]["weights"]["fp32"] == {"tensors": 4, "elements": total}
    assert c["fp32"]["casts"] == {} and c["fp32"]["dequantize_linear"] == 0
    assert c["fp16"]["weights"]["fp16"] == {"tensors": 4, "elements": total} and c["fp16"]["weights"]["fp16_share"] == 1
    assert c["fp16"]["casts"] == {"FLOAT16": 1, "FLOAT": 1} and "FLOAT" not in c["fp16"]["constants"]
    q = c["int8"]
    assert q["weights"]["int8"] == {"tensors": 4, "elements": total} and q["weights"]["int8_share"] == 1
    assert q["weights"]["int8_activations"] == 4  # every Conv/Gemm also takes a Q/DQ'd activation
    assert q["dq_constants"]["INT8"] == {"tensors": 4, "elements": total}  # the weights; biases are INT32
    assert q["dq_constants"]["INT32"]["tensors"] == 4
    assert q["qdq_activation_pairs"] == q["quantize_linear"] > 0
    assert q["dequantize_linear"] == q["qdq_activation_pairs"] + q["weight_dequantize"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_honest_exports_are_deployed_as_claimed_and_not_flagged(exports, precision):
    proto = _load(exports[precision])
    census = precision_census(proto)
    claimed = read_metadata(proto)["precision"]
    assert claimed == precision == deployed_precision(census) == infer_precision(proto)
    assert C.check_deployed_precision(claimed, census, exports[precision].name) is None


# ------------------------------------------------------------------------------------------------ the planted lies
def test_fp32_graph_claiming_int8_is_flagged(exports, tmp_path):
    path = _plant(exports["fp32"], tmp_path / "liar-int8.onnx", "int8")
    proto = _load(path)
    claimed = read_metadata(proto)["precision"]
    assert claimed == "int8" and OnnxRuntimeEngine(path).precision == "int8"  # the runner believes the label
    census = precision_census(proto)
    assert deployed_precision(census) == "fp32"
    f = C.check_deployed_precision(claimed, census, path.name)
    assert f is not None and f.id == "precision-not-deployed" and f.severity == "error" and f.attack is None
    assert f.message.startswith("liar-int8.onnx claims int8 but 0 of 4 Conv/Gemm weight tensors (0% of 60,648 "
                                "elements) are quantised to int8")
    assert "it computes in fp32" in f.message


def test_fp32_graph_claiming_fp16_is_flagged(exports, tmp_path):
    path = _plant(exports["fp32"], tmp_path / "liar-fp16.onnx", "fp16")
    proto = _load(path)
    f = C.check_deployed_precision(read_metadata(proto)["precision"], precision_census(proto), path.name)
    assert f is not None and f.severity == "error"
    assert ("claims fp16 but 0 of 4 Conv/Gemm weight tensors (0% of 60,648 elements) are float16 or narrower"
            in f.message)
    assert "it computes in fp32" in f.message


@pytest.mark.parametrize("graph,claim,found,words", [
    ("int8", "fp32", "int8", "4 of 4 Conv/Gemm weight tensors (100% of 60,648 elements) are quantised to int8"),
    ("fp16", "fp32", "fp16", "4 of 4 Conv/Gemm weight tensors (100% of 60,648 elements) are float16 or narrower"),
    ("fp16", "int8", "fp16", "0 of 4 Conv/Gemm weight tensors (0% of 60,648 elements) are quantised to int8"),
    ("int8", "fp16", "int8", "4 of 4 Conv/Gemm weight tensors (100% of 60,648 elements) are quantised to int8"),
])
def test_every_other_mismatch_is_flagged_too(exports, graph, claim, found, words):
    census = precision_census(_load(exports[graph]))
    f = C.check_deployed_precision(claim, census, "m.onnx")
    assert f is not None and f.id == "precision-not-deployed"
    assert f.message.startswith(f"m.onnx claims {claim} but {words}") and f"it computes in {found}" in f.message


def test_claims_are_read_loosely_and_unknown_claims_are_flagged(exports):
    census = precision_census(_load(exports["int8"]))
    assert C.check_deployed_precision(" INT8 ", census, "m.onnx") is None
    assert C.check_deployed_precision("", census, "m.onnx") is None  # no claim, nothing to contradict
    f = C.check_deployed_precision("q8", census, "m.onnx")
    assert f is not None and "claims precision 'q8', which is not fp32, fp16 or int8" in f.message


# --------------------------------------------------------------------------------------- hand-built graphs, the rule
def _f32(name, *shape, dtype=np.float32):
    return numpy_helper.from_array(np.zeros(shape, dtype=dtype), name)


def _model(nodes, inits, inputs=(("x", TensorProto.FLOAT),), output=("y", TensorProto.FLOAT)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, None) for n, t in inputs],
                              [helper.make_tensor_value_info(*output, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _dq_weight(name, n):
    """An int8 weight of ``n`` elements dequantised per tensor: (nodes, initializers), output ``name``."""
    return ([helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [name])],
            [_f32(f"{name}_q", n, dtype=np.int8), _f32(f"{name}_s"), _f32(f"{name}_z", dtype=np.int8)])


def _mixed(int8_elements, fp32_elements):
    """MatMul by a dequantised int8 weight, then MatMul by a float32 weight."""
    nodes, inits = _dq_weight("w1", int8_elements)
    nodes += [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])]
    return _model(nodes, [*inits, _f32("w2", fp32_elements)])


@pytest.mark.parametrize("int8,fp32,want", [(90, 10, "int8"), (100, 9, "int8"), (89, 11, "fp32"), (0, 5, "fp32"),
                                            (5, 0, "int8")])
def test_the_bar_is_ninety_percent_of_the_weight_elements(int8, fp32, want):
    assert REDUCED_PRECISION_BAR == 0.9
    census = precision_census(_mixed(int8, fp32))
    w = census["weights"]
    assert w["int8"]["elements"] == int8 and w["fp32"]["elements"] == fp32 and w["tensors"] == 2
    assert w["int8_activations"] == 0  # weight-only: x is not dequantised
    assert deployed_precision(census) == want


def test_int8_and_fp16_together_make_fp16():
    nodes, inits = _dq_weight("w1", 50)
    nodes += [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])]
    census = precision_census(_model(nodes, [*inits, _f32("w2", 45, dtype=np.float16)]))
    assert deployed_precision(census) == "fp16"  # 50 + 45 of 95 are 16 bits or narrower, only 53% are int8
    f = C.check_deployed_precision("int8", census, "m.onnx")
    assert f is not None and "1 of 2 MatMul weight tensors (52.6% of 95 elements) are quantised to int8" in f.message


def test_casts_decide_what_the_operator_receives():
    up = _model([helper.make_node("Cast", ["w"], ["w32"], to=TensorProto.FLOAT),
                 helper.make_node("Gemm", ["x", "w32"], ["y"])], [_f32("w", 4, 4, dtype=np.float16)])
    c = precision_census(up)
    assert c["tensors"][0] == {"op": "Gemm", "node": "", "tensor": "w", "elements": 16, "stored": "FLOAT16",
                               "seen": "FLOAT", "class": "fp32"}
    assert deployed_precision(c) == "fp32" and c["casts"] == {"FLOAT": 1} and c["constants"]["FLOAT16"]["tensors"] == 1
    down = _model([helper.make_node("Cast", ["w"], ["w16"], to=TensorProto.FLOAT16),
                   helper.make_node("Gemm", ["x", "w16"], ["y"])], [_f32("w", 4, 4)],
                  inputs=(("x", TensorProto.FLOAT16),), output=("y", TensorProto.FLOAT16))
    c = precision_census(down)
    assert c["weights"]["fp16"] == {"tensors": 1, "elements": 16} and deployed_precision(c) == "fp16"
    assert c["inputs"] == ["FLOAT16"] and c["outputs"] == ["FLOAT16"]


def test_weights_are_traced_through_layout_nodes_and_counted_once():
    nodes, inits = _dq_weight("wq", 12)
    nodes += [
        helper.make_node("Transpose", ["wq"], ["wt"]),
        helper.make_node("MatMul", ["x", "wt"], ["h1"]),
        helper.make_node("MatMul", ["h1", "wt"], ["h2"]),  # the same weight again: counted once
        helper.make_node("MatMul", ["h1", "h2"], ["h3"]),  # two activations: no weight
        helper.make_node("Constant", [], ["c"], value=_f32("cv", 3, 4)),
        helper.make_node("Reshape", ["c", "shape"], ["cr"]),
        helper.make_node("MatMul", ["h3", "cr"], ["y"]),  # a Constant node's weight, through a Reshape
    ]
    census = precision_census(_model(nodes, [*inits, numpy_helper.from_array(np.array([4, 3], np.int64), "shape")]))
    w = census["weights"]
    assert w["int8"] == {"tensors": 1, "elements": 12} and w["fp32"] == {"tensors": 1, "elements": 12}
    assert w["ops"] == {"MatMul": 2} and w["without_constant_weight"] == 1
    assert census["constants"]["FLOAT"] == {"tensors": 2, "elements": 1 + 12}  # the scale and the Constant node
    assert census["weight_dequantize"] == 1 and census["dq_constants"] == {"INT8": {"tensors": 1, "elements": 12}}
    assert deployed_precision(census) == "fp32"  # 50% int8


def test_qoperator_graphs_are_int8_without_qdq_nodes():
    m = _model([helper.make_node("ConvInteger", ["x", "w"], ["y"])], [_f32("w", 2, 1, 3, 3, dtype=np.int8)],
               inputs=(("x", TensorProto.INT8),), output=("y", TensorProto.INT32))
    c = precision_census(m)
    assert c["weights"]["int8"] == {"tensors": 1, "elements": 18} and c["weights"]["int8_activations"] == 1
    assert deployed_precision(c) == "int8" and c["dequantize_linear"] == 0


def test_graphs_without_compute_weights_fall_back_to_the_node_rule():
    relu = helper.make_node("Relu", ["x"], ["y"])
    assert deployed_precision(precision_census(_model([relu], []))) == "fp32"
    half = _model([helper.make_node("Add", ["x", "b"], ["y"])], [_f32("b", 3, dtype=np.float16)],
                  inputs=(("x", TensorProto.FLOAT16),), output=("y", TensorProto.FLOAT16))
    assert deployed_precision(precision_census(half)) == "fp16"
    nodes, inits = _dq_weight("b", 3)
    quant = _model([*nodes, helper.make_node("Add", ["x", "b"], ["y"])], inits)
    c = precision_census(quant)
    assert c["weights"]["tensors"] == 0 and deployed_precision(c) == "int8"
    f = C.check_deployed_precision("fp32", c, "m.onnx")
    assert f is not None and "no constant Conv/Gemm/MatMul weight to measure" in f.message
    # compute nodes whose weights are all computed at run time: nothing reduced can be shown, fp32
    dyn = _model([helper.make_node("MatMul", ["x", "x"], ["y"])], [])
    assert deployed_precision(precision_census(dyn)) == "fp32"


def test_the_census_leaves_the_graph_unchanged(exports):
    proto = _load(exports["int8"])
    before = copy.deepcopy(proto)
    precision_census(proto)
    assert proto == before
