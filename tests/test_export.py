"""ONNX export of the whole zoo at fp32, fp16 and int8, checked against PyTorch through ONNX Runtime.

Every architecture is exported once (the dynamo exporter costs seconds per model) at the smallest input every model
accepts, 1x16x16 (cnn-cw is unpadded and needs 16x16), which is also the shape of the real samples used for parity and
calibration: the embedded digits resized to 16x16. The fp16 and int8 files are derived from that one FP32 graph.
Models of the zoo are randomly initialised here; the trained digits model (conftest) goes through the CLI.
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner

import kit
import models
from exporters.formats import ExportFormat, Precision, resolve_precision
from exporters.onnx import OnnxRuntimeEngine, engine_sha256, read_metadata, torch_to_onnx, write_onnx_export
from exporters.parity import ParityError, compare_logits
from kit.checkpoint import read_checkpoint, weights_sha256
from kit.cli import cli
from kit.data import load_dataset
from kit.errors import UserError

ARCHS = [name if name != "wrn-D-W" else "wrn-10-1" for name in models.list_models()]
SHAPE = (1, 16, 16)
NUM_CLASSES = 10


@pytest.fixture(scope="module")
def digits16():
    """Real samples: 48 test images for parity, 32 training images for int8 calibration."""
    test = load_dataset("digits:16", "test").subset(48, seed=1)
    train = load_dataset("digits:16", "train").subset(32, seed=2)
    return test.x, test.y, train.x


@pytest.fixture(scope="module", params=ARCHS)
def zoo_export(request, tmp_path_factory, digits16):
    """One FP32 export per architecture, written at fp32, fp16 and int8 with their parity checks."""
    name = request.param
    x, y, calib = digits16
    torch.manual_seed(0)
    model = models.create(name, NUM_CLASSES, SHAPE).eval()
    graph = torch_to_onnx(model, SHAPE)
    folder = tmp_path_factory.mktemp(f"zoo-{name}")
    written = {p: write_onnx_export(graph, folder / f"{name}-{p}.onnx", model, x, parity_y=y, precision=p,
                                    calibration_x=calib if p == "int8" else None, max_batch=32)
               for p in ("fp32", "fp16", "int8")}
    return name, model, graph, written


def _fresh_inputs(n: int, seed: int) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def test_fp32_export_round_trips_through_onnxruntime(zoo_export):
    name, model, graph, written = zoo_export
    exp = written["fp32"]
    assert graph.exporter == "dynamo" and graph.exporter_note == ""
    assert exp.opset >= 18 and exp.parity.verdict == "pass" and exp.parity.top1_agreement == 1.0
    proto = onnx.load(str(exp.path))
    assert [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim[:1]] == ["batch"]
    engine = OnnxRuntimeEngine(exp.path)
    assert engine.sha256 == exp.sha256 and engine.precision == "fp32" and engine.input_shape == SHAPE
    # a batch size the export never saw, larger than max_batch (so the runner splits it), on fresh inputs
    x = _fresh_inputs(70, seed=7)
    with torch.no_grad():
        expected = model(x)
    got = engine(x)
    assert got.dtype == torch.float32 and got.shape == (70, NUM_CLASSES)
    torch.testing.assert_close(got, expected, atol=1e-4 + 1e-4 * float(expected.abs().max()), rtol=0)


def test_fp16_export_stores_float16_and_keeps_float32_io(zoo_export):
    name, model, _, written = zoo_export
    exp = written["fp16"]
    proto = onnx.load(str(exp.path))
    floats = [t for t in proto.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert floats and all(t.data_type == onnx.TensorProto.FLOAT16 for t in floats)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert exp.parity.verdict == "reported" and exp.parity.tolerance is None
    x = _fresh_inputs(32, seed=8)
    with torch.no_grad():
        expected = model(x)
    got = OnnxRuntimeEngine(exp.path)(x)
    scale = float(expected.abs().max())
    gap = float((got - expected).abs().max())
    assert 0 < gap < 1e-2 * scale  # float16 rounding is visible, and small (measured <= 1e-3 of the scale)


def test_int8_export_is_static_qdq(zoo_export):
    name, model, _, written = zoo_export
    exp = written["int8"]
    proto = onnx.load(str(exp.path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 2 and ops.count("DequantizeLinear") >= ops.count("QuantizeLinear")
    inits = {t.name: t for t in proto.graph.initializer}
    int8_weights = [t for t in inits.values() if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert int8_weights, "no int8 weight tensors"
    # symmetric quantisation (what TensorRT expects): every zero point is 0
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in inits:
            assert not onnx.numpy_helper.to_array(inits[node.input[2]]).any()
    assert read_metadata(proto)["calibration"]["samples"] == 32
    assert exp.parity.verdict == "reported"
    x = _fresh_inputs(48, seed=9)
    with torch.no_grad():
        expected = model(x)
    report = compare_logits(expected, OnnxRuntimeEngine(exp.path)(x), precision="int8", name=name)
    # random-weight models have nearly tied logits, so agreement is a loose bound here (measured >= 0.9)
    assert report.max_abs_diff < 0.25 * report.logit_scale and report.top1_agreement >= 0.75


def test_metadata_records_the_twin(zoo_export):
    name, model, _, written = zoo_export
    for precision, exp in written.items():
        meta = read_metadata(onnx.load(str(exp.path)))
        assert meta["weights_sha256"] == weights_sha256(model.state_dict())
        assert meta["arch"] == name and meta["arch_record"]["name"] == name
        assert meta["classes"] == [str(i) for i in range(NUM_CLASSES)] and meta["num_classes"] == NUM_CLASSES
        assert meta["input_shape"] == list(SHAPE) and meta["input_range"] == [0.0, 1.0]
        assert meta["kit_version"] == kit.__version__ and meta["precision"] == precision
        assert meta["exporter"] == "dynamo" and meta["opset"] >= 18 and meta["max_batch"] == 32


# ----------------------------------------------------------------------------------------------- exporter fallback
@pytest.fixture(scope="module")
def legacy_graph():
    """cnn-small exported after the dynamo exporter 'failed' (the legacy exporter is fast, too)."""
    torch.manual_seed(0)
    model = models.create("cnn-small", NUM_CLASSES, SHAPE).eval()
    real_export = torch.onnx.export

    def failing_dynamo(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("simulated exporter failure\nsecond line")
        return real_export(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.onnx, "export", failing_dynamo)
        graph = torch_to_onnx(model, SHAPE)
    return model, graph


def test_legacy_exporter_only_when_dynamo_fails_and_recorded(legacy_graph, digits16, tmp_path):
    model, graph = legacy_graph
    assert graph.exporter == "torchscript"
    assert graph.exporter_note == "dynamo exporter failed (RuntimeError: simulated exporter failure)"
    x, y, _ = digits16
    exp = write_onnx_export(graph, tmp_path / "legacy.onnx", model, x, parity_y=y)
    meta = read_metadata(onnx.load(str(exp.path)))
    assert meta["exporter"] == "torchscript" and "simulated exporter failure" in meta["exporter_note"]
    assert exp.parity.verdict == "pass" and exp.opset >= 18


def test_fp32_parity_failure_is_loud_and_writes_nothing(legacy_graph, digits16, tmp_path):
    model, graph = legacy_graph
    other = models.create("cnn-small", NUM_CLASSES, SHAPE).eval()
    with torch.no_grad():
        other.load_state_dict(model.state_dict())
        other.head.bias.add_(0.01)  # a twin that is not what was exported
    x, y, _ = digits16
    out = tmp_path / "bad.onnx"
    with pytest.raises(ParityError) as err:
        write_onnx_export(graph, out, other, x, parity_y=y)
    report = err.value.report
    assert report.verdict == "fail" and report.max_abs_diff == pytest.approx(0.01, rel=1e-3)
    assert "max|dlogit| 0.01" in str(err.value) and "tolerance" in str(err.value)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_compare_logits_verdicts():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    ok = compare_logits(a, a + 1e-6, precision="fp32", name="x", labels=torch.tensor([0, 0]))
    assert ok.verdict == "pass" and ok.twin_accuracy == 0.5 and ok.top1_agreement == 1.0
    bad = compare_logits(a, a + 1e-2, precision="fp32", name="x")
    assert bad.verdict == "fail" and bad.tolerance == pytest.approx(1e-4 + 2e-4)
    flipped = compare_logits(a, a.flip(1), precision="int8", name="x")
    assert flipped.verdict == "reported" and flipped.top1_agreement == 0.0 and flipped.max_abs_diff == 2.0
    nan = compare_logits(a, torch.full_like(a, float("nan")), precision="fp16", name="x")
    assert nan.verdict == "fail"


def test_precision_vocabulary():
    assert resolve_precision("onnx-int8", None) is Precision.INT8
    assert resolve_precision("tensorrt", None) is Precision.FP32
    assert resolve_precision("tensorrt", "fp16") is Precision.FP16
    with pytest.raises(UserError, match="contradicts"):
        resolve_precision("onnx-fp16", "int8")
    assert [f.value for f in ExportFormat] == ["onnx", "onnx-fp16", "onnx-int8", "tensorrt"]
    r = CliRunner().invoke(cli, ["export", "--help"])
    assert "onnx|onnx-fp16|onnx-int8|tensorrt" in r.output and "fp32|fp16|int8" in r.output


# -------------------------------------------------------------------------------------------------------------- CLI
def run(*args: str):
    return CliRunner().invoke(cli, ["--quiet", "--device", "cpu", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def cli_exports(digits_model, tmp_path_factory):
    """The trained digits model exported by `otkit export` at each ONNX format (JSON output)."""
    path, _ = digits_model
    folder = tmp_path_factory.mktemp("cli-export")
    docs = {}
    for fmt in ("onnx", "onnx-int8"):
        r = run("export", str(path), "--format", fmt, "--samples", "200", "--calibration-samples", "128",
                "--out", str(folder / f"m-{fmt}.onnx"), "--json")
        assert r.exit_code == 0, r.output
        docs[fmt] = json.loads(r.stdout)
    return path, docs


def test_cli_export_trained_model(cli_exports):
    path, docs = cli_exports
    _, info = read_checkpoint(path)
    for fmt, doc in docs.items():
        parity = doc["parity"]
        assert doc["written"] and doc["weights_sha256"] == info.weights_sha256 and doc["data"] == "digits:16"
        assert parity["samples"] == 200 and parity["twin_accuracy"] > 0.9
        meta = read_metadata(onnx.load(doc["path"]))
        assert meta["weights_sha256"] == info.weights_sha256 and meta["classes"] == info.class_names
        assert meta["dataset"]["fingerprint"] == info.dataset["fingerprint"]
        if fmt == "onnx":
            assert parity["verdict"] == "pass" and parity["top1_agreement"] == 1.0
        else:  # a trained model has clear margins: reduced precision keeps (almost) every prediction
            assert parity["verdict"] == "reported" and parity["top1_agreement"] >= 0.95
            assert abs(parity["engine_accuracy"] - parity["twin_accuracy"]) <= 0.03
    calibration = read_metadata(onnx.load(docs["onnx-int8"]["path"]))["calibration"]
    assert calibration["split"] == "train" and calibration["samples"] == 128


def test_cli_export_fp16_table(digits_model, tmp_path):
    path, _ = digits_model
    out = tmp_path / "m16.onnx"
    r = run("export", str(path), "--format", "onnx-fp16", "--samples", "100", "--out", str(out))
    assert r.exit_code == 0, r.output
    header, _, row = r.stdout.splitlines()[:3]
    for word in ("max|dlogit|", "top-1 agree", "twin acc", "verdict"):
        assert word in header
    for word in ("m16.onnx", "fp16", "dynamo", "reported", "100"):
        assert word in row
    assert "wrote" not in r.stderr  # --quiet: no status line (without it: "wrote PATH (sha256:...)")
    engine = OnnxRuntimeEngine(out)
    assert engine.precision == "fp16" and engine.num_classes == 10


def test_cli_export_json_keeps_the_status_line_on_stderr(digits_model, tmp_path):
    """With --json the document alone is on stdout and the status line on stderr, as for every command."""
    path, _ = digits_model
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(cli, ["--device", "cpu", "export", str(path), "--samples", "50", "--out", str(out), "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert r.stderr.strip().splitlines()[-1] == f"wrote {out} ({doc['sha256']})" == f"wrote {out} ({engine_sha256(out)})"


def test_help_imports_no_export_library():
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from kit.cli import cli; "
            "r = CliRunner().invoke(cli, ['export', '--help']); assert r.exit_code == 0, r.output; "
            "r = CliRunner().invoke(cli, ['engine', '--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('onnx', 'onnxruntime', 'tensorrt', 'onnxscript') or m in ('exporters.onnx', 'exporters.engines')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_parity_failure_exits_1_and_writes_nothing(digits_model, tmp_path, monkeypatch):
    """An FP32 export beyond tolerance: the table on stdout, one error line, exit status 1, no file.

    The tolerance is made negative so that any export fails, and the dynamo exporter is made to fail so that the
    (fast) legacy exporter runs: the fallback note goes to the table's exporter column.
    """
    import exporters.parity

    path, _ = digits_model
    monkeypatch.setitem(exporters.parity.FP32_TOLERANCE, "onnxruntime", (-1.0, 0.0))
    real_export = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no dynamo"))
                        if k.get("dynamo", True) else real_export(*a, **k))
    out = tmp_path / "m.onnx"
    r = run("export", str(path), "--samples", "40", "--out", str(out))
    assert r.exit_code == 1, r.output
    assert "fail" in r.stdout.splitlines()[2] and "max|dlogit|" in r.stdout
    (line,) = r.stderr.strip().splitlines()[-1:]
    assert line.startswith("Error: parity check failed: m.onnx [onnxruntime cpu] [fp32] on 40 samples: max|dlogit|")
    assert "nothing written" in line and not out.exists() and list(tmp_path.iterdir()) == []
