"""Engine runners and `otkit engine`: one interface over the twin, ONNX Runtime and TensorRT, and their user errors.

The ONNX files here come from the trained digits model (conftest) through the legacy exporter, which takes a fraction
of a second (the current exporter is covered by tests/test_export.py). TensorRT cannot be installed on CPU machines:
its code is type-checked against the ``tensorrt-stubs`` package (TensorRT 10 API), its loader's refusals are tested
with fake sidecars, and the tests that build and run engines skip without a GPU and TensorRT.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from exporters.engines import Engine, TorchEngine, check_compatible, load_engine
from exporters.formats import Precision
from exporters.onnx import OnnxRuntimeEngine, torch_to_onnx, write_onnx_export
from exporters.tensorrt import SIDECAR_FORMAT, TensorRTEngine, network_plan, sidecar_path, tensorrt_version
from kit.checkpoint import load_twin
from kit.data import load_dataset
from kit.errors import UserError
from tests.test_cli import assert_user_error, run

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
TRT_VERSION = tensorrt_version()


@pytest.fixture(scope="module")
def digits_onnx(digits_model, tmp_path_factory):
    """The trained digits twin, and its fp32 and int8 ONNX files."""
    path, _ = digits_model
    model, info = load_twin(path)
    test = load_dataset("digits:16", "test").subset(128, seed=0)
    train = load_dataset("digits:16", "train").subset(128, seed=0)
    graph = torch_to_onnx(model, info.input_shape, dynamo=False)
    folder = tmp_path_factory.mktemp("engines")
    files = {p: write_onnx_export(graph, folder / f"digits-{p}.onnx", model, test.x, info=info, parity_y=test.y,
                                  precision=p, calibration_x=train.x).path for p in ("fp32", "int8")}
    return path, model, info, files


# ---------------------------------------------------------------------------------------------------------- runners
def test_onnx_engine_batches_and_returns_on_the_callers_device(digits_onnx):
    _, model, info, files = digits_onnx
    x = load_dataset("digits:16", "test").x[:40]
    whole = OnnxRuntimeEngine(files["fp32"])
    split = OnnxRuntimeEngine(files["fp32"], max_batch=7)
    assert whole.max_batch == 256 and split.max_batch == 7
    assert whole.providers == ["CPUExecutionProvider"] and whole.backend == "onnxruntime"
    out = whole(x)
    assert out.dtype == torch.float32 and out.device == x.device and out.shape == (40, 10)
    torch.testing.assert_close(split(x), out, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), atol=1e-4 * float(out.abs().max()), rtol=0)
    torch.testing.assert_close(whole(x.double()), out)  # any float dtype is accepted
    assert whole(x[:0]).shape == (0, 10)
    with pytest.raises(ValueError, match=r"\(N, 1, 16, 16\)"):
        whole(x[:, :, :8])
    with pytest.raises(ValueError, match="floating-point"):
        whole((x * 255).to(torch.uint8))
    assert whole.describe()["sha256"] == whole.sha256 and whole.sha256.startswith("sha256:")


def test_torch_engine_is_the_twin(digits_onnx):
    path, model, info, _ = digits_onnx
    twin = TorchEngine.from_checkpoint(path)
    x = load_dataset("digits:16", "test").x[:50]
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(twin(x), expected)
    torch.testing.assert_close(TorchEngine.from_checkpoint(path, max_batch=16)(x), expected, atol=1e-5, rtol=0)
    assert twin.sha256 == info.weights_sha256 and twin.precision == "fp32" and twin.input_shape == (1, 16, 16)
    assert isinstance(twin, Engine) and twin.num_classes == 10


def test_load_engine_chooses_by_file_type(digits_onnx, tmp_path):
    path, _, _, files = digits_onnx
    assert isinstance(load_engine(path), TorchEngine)
    onnx_engine = load_engine(files["int8"], providers=["cpu"], max_batch=32)
    assert isinstance(onnx_engine, OnnxRuntimeEngine)
    assert onnx_engine.precision == "int8" and onnx_engine.max_batch == 32
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    with pytest.raises(UserError, match="unknown engine file type"):
        load_engine(other)
    with pytest.raises(UserError, match="providers apply to ONNX files only"):
        load_engine(path, providers=["cpu"])
    with pytest.raises(UserError, match="not found"):
        load_engine(tmp_path / "missing.onnx")


def _bare_session(engine: OnnxRuntimeEngine, x: torch.Tensor) -> torch.Tensor:
    """The reference: the engine's ONNX Runtime session called through its public API on a contiguous numpy copy."""
    name, out = engine.io_names
    arr = np.ascontiguousarray(x.detach().to(torch.float32).numpy())
    return torch.from_numpy(engine.session.run([out], {name: arr})[0])


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_io_binding_fast_path_matches_the_bare_session(digits_onnx, precision):
    """The runner binds torch memory by address; whatever the layout of the caller's tensor, it must read the same
    pixels and give the same logits as session.run on a numpy copy (same kernels: bitwise equal)."""
    _, _, _, files = digits_onnx
    engine = OnnxRuntimeEngine(files[precision])
    assert engine.io_binding and engine._fast is not None
    data = load_dataset("digits:16", "test").x[:64]
    cases = {
        "batch of 1": data[:1],
        "contiguous": data[:16],
        "view with a storage offset": data[5:21],
        "strided (every other image)": data[::2],
        "channels_last": data[:8].contiguous(memory_format=torch.channels_last),
        "transposed view": data[:8].transpose(2, 3),
        "float64": data[:8].double(),
        "requires_grad": data[:8].clone().requires_grad_(True),
    }
    for what, x in cases.items():
        got = engine(x)
        assert got.shape == (len(x), 10) and got.dtype == torch.float32 and not got.requires_grad, what
        assert torch.equal(got, _bare_session(engine, x)), what
    a = engine(data[:4])
    a_copy = a.clone()
    b = engine(data[4:8])  # each call returns its own tensor: a later call does not overwrite an earlier result
    assert torch.equal(a, a_copy) and not torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_fast_path_and_public_fallback_agree(digits_onnx, monkeypatch):
    """Without ONNX Runtime's C-level binding the runner falls back to InferenceSession.run, with identical logits."""
    import exporters.onnx.runner as onnx_module

    _, model, _, files = digits_onnx
    x = load_dataset("digits:16", "test").x[:40]
    fast = OnnxRuntimeEngine(files["fp32"], max_batch=16)

    class NoCLevelSession:  # what a session object without the private `_sess` looks like to the probe
        pass

    assert onnx_module._cpu_binding(NoCLevelSession(), fast._io) is None
    monkeypatch.setattr(onnx_module, "_cpu_binding", lambda session, io: None)
    slow = OnnxRuntimeEngine(files["fp32"], max_batch=16)
    assert slow._fast is None and not slow.io_binding
    assert torch.equal(fast(x), slow(x))
    assert torch.equal(fast(x[::3]), slow(x[::3]))
    with torch.no_grad():
        torch.testing.assert_close(slow(x), model(x), atol=1e-4 * float(model(x).abs().max()), rtol=0)


def test_concurrent_callers_get_their_own_logits(digits_onnx):
    """One IO binding per thread: callers in parallel threads must not read each other's inputs or outputs."""
    _, _, _, files = digits_onnx
    engine = OnnxRuntimeEngine(files["fp32"])
    data = load_dataset("digits:16", "test").x
    batches = [data[i * 7:i * 7 + 1 + i % 5] for i in range(24)]
    expected = [_bare_session(engine, b) for b in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda b: [engine(b) for _ in range(5)], batches))
    for got, ref in zip(results, expected):
        assert all(torch.equal(g, ref) for g in got)


def test_float16_interface_is_bound_as_float16(tmp_path):
    """A graph whose input and output are float16 (not an otkit export, whose I/O stays float32): the runner binds
    half-precision buffers and returns float32 logits equal to the closed form x.flatten() @ W computed in float16."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 3)).astype(np.float16)
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    graph = helper.make_graph(
        nodes, "half", [helper.make_tensor_value_info("input", TensorProto.FLOAT16, ["batch", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", 3])],
        [numpy_helper.from_array(w, "w")])
    path = tmp_path / "half.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    engine = OnnxRuntimeEngine(path)
    assert engine.io_binding and engine.input_shape == (1, 4, 4) and engine.num_classes == 3
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    got = engine(x)
    assert got.dtype == torch.float32 and got.shape == (5, 3)
    half = x.to(torch.float16).reshape(5, 16).numpy()
    expected = (half.astype(np.float32) @ w.astype(np.float32)).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(got.numpy(), expected, rtol=2e-3, atol=2e-3)


def test_torch_engine_converts_only_when_needed(digits_onnx):
    _, model, _, _ = digits_onnx
    twin = TorchEngine(model, (1, 16, 16), 10, "-")
    x = load_dataset("digits:16", "test").x[:12]
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(twin(x), expected)
    out = twin(x.double().requires_grad_(True))  # converted to float32, no graph kept
    assert out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"\(N, 1, 16, 16\)"):
        twin(x[0])
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        twin(x.numpy())


def test_check_compatible(digits_onnx):
    _, _, _, files = digits_onnx
    engine = OnnxRuntimeEngine(files["fp32"])
    check_compatible(engine, (1, 16, 16), 10, "digits:16")
    with pytest.raises(UserError, match="takes inputs 1x16x16 but digits has 1x8x8"):
        check_compatible(engine, (1, 8, 8), 10, "digits")
    with pytest.raises(UserError, match="predicts 10 classes but cifar100 has 100"):
        check_compatible(engine, (1, 16, 16), 100, "cifar100")


# ------------------------------------------------------------------------------------------------------- otkit engine
def test_engine_run_against_the_twin(digits_onnx):
    path, _, info, files = digits_onnx
    r = run("--device", "cpu", "engine", "run", str(files["fp32"]), "--data", "digits:16", "--twin", str(path),
            "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["parity"]["verdict"] == "pass" and doc["parity"]["samples"] == doc["data"]["n"] == 449
    assert doc["accuracy"] == doc["parity"]["twin_accuracy"] > 0.9
    assert doc["engine"]["precision"] == "fp32" and doc["engine"]["providers"] == ["CPUExecutionProvider"]
    r8 = run("--device", "cpu", "engine", "run", str(files["int8"]), "--data", "digits:16", "--twin", str(path),
             "--batch-size", "64")
    assert r8.exit_code == 0, r8.output
    assert "int8" in r8.stdout and "reported" in r8.stdout and "accuracy 0.9" in r8.stdout
    row = next(line for line in r8.stdout.splitlines() if "reported" in line)
    assert f" {OnnxRuntimeEngine(files['int8']).metadata['exporter']} " in row  # the table's exporter column


def test_engine_exporter_is_the_record_or_the_producer(digits_onnx):
    """A kit export names the exporter its metadata records; a file from elsewhere, its ONNX producer."""
    import onnx

    _, _, _, files = digits_onnx
    proto = onnx.load(str(files["fp32"]))
    recorded = next(p.value for p in proto.metadata_props if p.key == "otkit.exporter")
    assert OnnxRuntimeEngine(files["fp32"]).exporter == recorded in ("dynamo", "torchscript")
    del proto.metadata_props[:]
    proto.producer_name, proto.producer_version = "tf2onnx", "1.16.1"
    assert OnnxRuntimeEngine(proto.SerializeToString()).exporter == "tf2onnx 1.16.1"
    proto.producer_name, proto.producer_version = "", ""
    assert OnnxRuntimeEngine(proto.SerializeToString()).exporter == ""


def test_engine_info(digits_onnx):
    path, _, info, files = digits_onnx
    r = run("engine", "info", str(files["int8"]), "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["sha256"] == "sha256:" + hashlib.sha256(files["int8"].read_bytes()).hexdigest()
    assert doc["format"] == "onnx" and doc["opset"]["ai.onnx"] >= 18 and doc["precision"] == "int8"
    assert doc["inputs"] == [{"name": "input", "type": "float", "shape": ["batch", 1, 16, 16]}]
    assert doc["outputs"][0]["shape"] == ["batch", 10]
    assert doc["metadata"]["weights_sha256"] == info.weights_sha256 and doc["metadata"]["exporter"] == "torchscript"
    assert doc["checks"] == {"checker_full": "pass", "strict_shape_inference": "pass"}
    assert doc["otkit_engine"]["runnable"] and "CPUExecutionProvider" in doc["providers_available"]
    assert doc["ops"]["QuantizeLinear"] > 0
    text = run("engine", "info", str(files["fp32"]))
    assert text.exit_code == 0 and "weights_sha256" in text.stdout and "CPUExecutionProvider" in text.stdout
    ck = run("engine", "info", str(path), "--json")
    assert ck.exit_code == 0 and json.loads(ck.stdout)["weights_sha256"] == info.weights_sha256


# ------------------------------------------------------------------------------------------------------ user errors
def test_corrupt_onnx(tmp_path):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07this is not protobuf at all \xff\xfe" * 8)
    line = assert_user_error(run("engine", "info", str(bad)), "corrupt.onnx", "not a valid ONNX file")
    assert "Error parsing message" not in line  # protobuf's words and its (private) message type, not ours
    assert_user_error(run("engine", "run", str(bad), "--data", "digits:16"), "corrupt.onnx")


def test_truncated_onnx(digits_onnx, tmp_path):
    _, _, _, files = digits_onnx
    data = files["fp32"].read_bytes()
    for cut in (len(data) // 2, len(data) - 7):
        short = tmp_path / f"cut{cut}.onnx"
        short.write_bytes(data[:cut])
        line = assert_user_error(run("engine", "info", str(short)), short.name, "not a valid ONNX file")
        assert "Error parsing message" not in line
        assert_user_error(run("engine", "run", str(short), "--data", "digits:16"), short.name)


def test_onnx_with_wrong_input_rank(tmp_path):
    w = helper.make_tensor("w", TensorProto.FLOAT, [256, 10], [0.01] * 2560)
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "w"], ["logits"])], "flat",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 256])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], [w])
    path = tmp_path / "flat.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    assert_user_error(run("engine", "run", str(path), "--data", "digits:16"), "flat.onnx", "rank-2", "(N, C, H, W)")
    info = run("engine", "info", str(path), "--json")
    assert info.exit_code == 0 and json.loads(info.stdout)["otkit_engine"]["runnable"] is False


def test_engine_and_dataset_must_fit(digits_onnx):
    _, _, _, files = digits_onnx
    assert_user_error(run("engine", "run", str(files["fp32"]), "--data", "digits"), "takes inputs 1x16x16",
                      "digits has 1x8x8")


def _fake_engine(tmp_path: Path, **overrides) -> Path:
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not really a TensorRT plan" * 10)
    side = {"format": SIDECAR_FORMAT, "tensorrt_version": "10.0.1.6",
            "gpu": {"name": "NVIDIA Imaginary X1", "compute_capability": "1.0"},
            "engine_sha256": "sha256:" + hashlib.sha256(engine.read_bytes()).hexdigest(), "precision": "fp16",
            "input_shape": [1, 16, 16], "num_classes": 10,
            "profile": {"min": [1, 1, 16, 16], "opt": [64, 1, 16, 16], "max": [64, 1, 16, 16]}, **overrides}
    sidecar_path(engine).write_text(json.dumps(side))
    return engine


def test_engine_built_for_another_gpu(tmp_path):
    engine = _fake_engine(tmp_path)
    r = run("engine", "run", str(engine), "--data", "digits:16")
    assert_user_error(r, "model.engine was built for NVIDIA Imaginary X1 (compute capability 1.0) with TensorRT "
                      "10.0.1.6", "runs only on the GPU model and TensorRT version that built it")
    with pytest.raises(UserError, match="NVIDIA Imaginary X1"):
        load_engine(engine, "cuda" if HAS_CUDA else "cpu")
    info = run("engine", "info", str(engine), "--json")
    assert info.exit_code == 0, info.output
    doc = json.loads(info.stdout)
    assert doc["runnable_here"] is False and "Imaginary" in doc["reason"]
    assert doc["sidecar"]["precision"] == "fp16" and doc["sha256"] == doc["sidecar"]["engine_sha256"]


def test_engine_sidecar_missing_or_mismatched(tmp_path):
    engine = _fake_engine(tmp_path, engine_sha256="sha256:" + "0" * 64)
    assert_user_error(run("engine", "run", str(engine), "--data", "digits:16"), "does not match its sidecar")
    sidecar_path(engine).unlink()
    assert_user_error(run("engine", "run", str(engine), "--data", "digits:16"), "has no sidecar model.engine.json")
    sidecar_path(engine).write_text("{not json")
    assert_user_error(run("engine", "run", str(engine), "--data", "digits:16"), "not valid JSON")


@pytest.mark.skipif(TRT_VERSION is not None, reason="checks the message on machines without TensorRT")
def test_export_without_tensorrt(digits_model, tmp_path):
    path, _ = digits_model
    out = tmp_path / "m.engine"
    assert_user_error(run("export", str(path), "--format", "tensorrt", "--out", str(out)),
                      "TensorRT is not installed", "otkit[gpu]")
    assert list(tmp_path.iterdir()) == []  # refused before any work: no ONNX file either


def test_export_option_errors(digits_model, tmp_path):
    path, _ = digits_model
    assert_user_error(run("export", str(path), "--format", "onnx-fp16", "--precision", "int8", "--out",
                          str(tmp_path / "m.onnx")), "contradicts")
    assert_user_error(run("export", str(path), "--out", str(tmp_path / "m.engine")), "must end in .onnx")
    assert_user_error(run("export", str(path), "--out", str(tmp_path / "nope" / "m.onnx")), "does not exist")
    assert_user_error(run("export", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "m.onnx")),
                      "not found")
    assert_user_error(run("export", str(path), "--data", "digits", "--out", str(tmp_path / "m.onnx")),
                      "takes inputs 1x16x16 but digits has 1x8x8")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on machines without CUDA")
def test_cuda_provider_without_cuda(digits_onnx):
    _, _, _, files = digits_onnx
    assert_user_error(run("--device", "cpu", "engine", "run", str(files["fp32"]), "--data", "digits:16",
                          "--provider", "cuda"), "provider(s) cuda run on a CUDA device")


# --------------------------------------------------------------------------------------------- TensorRT, statically
def test_network_plan_per_major_version():
    assert network_plan(10, "fp32") == network_plan(10, Precision.FP32)
    p10 = {p: network_plan(10, p) for p in ("fp32", "fp16", "int8")}
    assert (p10["fp32"].onnx_precision, p10["fp32"].strongly_typed, p10["fp32"].fp16_flag) == ("fp32", False, False)
    assert (p10["fp16"].onnx_precision, p10["fp16"].strongly_typed, p10["fp16"].fp16_flag) == ("fp32", False, True)
    assert (p10["int8"].onnx_precision, p10["int8"].strongly_typed, p10["int8"].fp16_flag) == ("int8", True, False)
    for p in ("fp32", "fp16", "int8"):  # TensorRT 11: no precision flags, types come from the ONNX file
        plan = network_plan(11, p)
        assert (plan.onnx_precision, plan.strongly_typed, plan.fp16_flag) == (p, True, False)


def test_type_stubs_alone_do_not_count_as_tensorrt():
    spec = importlib.util.find_spec("tensorrt")
    if spec is None or spec.origin not in (None, "namespace"):
        pytest.skip("needs the tensorrt-stubs type stubs without the TensorRT library")
    assert tensorrt_version() is None
    doc = json.loads(run("info", "--json").stdout)
    assert doc["tensorrt"] == {"available": False, "version": None}


def _repair_stub(text: str) -> str:
    """Make the generated stubs parse: parameters named ``in`` (a keyword) and defaults missing after a default.

    The tensorrt-stubs files are produced by pybind11-stubgen and a handful of their ~10,000 lines are not valid
    Python (the same in every release on PyPI); the API they describe is left untouched.
    """
    lines = text.splitlines()
    for _ in range(500):
        try:
            ast.parse("\n".join(lines))
            return "\n".join(lines) + "\n"
        except SyntaxError as e:
            i = (e.lineno or 1) - 1
            line = lines[i]
            fixed = re.sub(r"([(,]\s*)in(\s*:)", r"\1in_\2", line)
            if fixed == line:
                m = re.match(r"^(\s*def \w+\()(.*)(\)\s*->.*:\s*)$", line)
                if m is None:
                    raise
                params, seen = [], False
                for p in m.group(2).split(", "):
                    seen = seen or "=" in p
                    params.append(p + " = ..." if seen and "=" not in p and not p.startswith("*") else p)
                fixed = m.group(1) + ", ".join(params) + m.group(3)
            if fixed == line:
                raise
            lines[i] = fixed
    raise AssertionError("stub repair did not converge")


def _stubs_pin() -> str:
    """The tensorrt-stubs pin of pyproject.toml ([tool.otkit.typecheck] no-deps)."""
    tomllib = pytest.importorskip("tomllib")
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["otkit"]["typecheck"]["no-deps"]
    (pin,) = [p for p in pins if p.startswith("tensorrt-stubs==")]
    return str(pin)


PROBE = '''
import tensorrt as trt


def misuse() -> None:
    logger = trt.Logger(trt.Logger.WARNING)
    config = trt.Builder(logger).create_builder_konfig()
    context = trt.Runtime(logger).deserialize_cuda_engine(b"").create_execution_context()
    context.execute_async_v2([], 0)
'''


def test_tensorrt_code_type_checks_against_tensorrt_stubs(tmp_path):
    """mypy checks exporters/tensorrt/ against the TensorRT 10 stubs; a probe proves misspelt calls are caught."""
    pytest.importorskip("mypy")
    pin = _stubs_pin()
    try:
        dist = importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"tensorrt-stubs is not installed: pip install --no-deps {pin}")
    assert f"tensorrt-stubs=={dist.version}" == pin, f"installed tensorrt-stubs {dist.version}, pyproject pins {pin}"
    stubs = tmp_path / "stubs"
    pyi = [f for f in dist.files or [] if f.suffix == ".pyi" and f.parts[0] in ("tensorrt", "tensorrt_bindings")]
    assert pyi, "tensorrt-stubs holds no .pyi files"
    for f in pyi:
        dst = stubs / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(_repair_stub(Path(str(f.locate())).read_text()))
    probe = tmp_path / "probe_trt.py"
    probe.write_text(PROBE)
    config = tmp_path / "mypy.ini"
    config.write_text(
        f"[mypy]\nmypy_path = {stubs}\nfollow_imports = silent\nignore_missing_imports = True\n"
        "[mypy-torch.*,numpy.*,onnx.*,onnxruntime.*,kit.*,models.*,exporters.base,exporters.graph,"
        "exporters.parity,exporters.formats]\nfollow_imports = skip\n"
        "[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*]\nignore_errors = True\n"
    )
    out = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir",
                          str(tmp_path / "cache"), "--no-error-summary", "--hide-error-context",
                          "exporters/tensorrt", str(probe)], cwd=ROOT, capture_output=True, text=True)
    lines = out.stdout.splitlines()
    assert not [ln for ln in lines if ln.startswith("exporters/")], out.stdout
    probe_errors = "\n".join(ln for ln in lines if "probe_trt.py" in ln)
    assert '"Builder" has no attribute "create_builder_konfig"' in probe_errors, out.stdout + out.stderr
    assert '"IExecutionContext" has no attribute "execute_async_v2"' in probe_errors, out.stdout


# ------------------------------------------------------------------------------------------------- on a CUDA machine
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_onnxruntime_cuda_io_binding(digits_onnx):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    _, model, _, files = digits_onnx
    engine = OnnxRuntimeEngine(files["fp32"], device="cuda", max_batch=50)
    assert engine.providers[0] == "CUDAExecutionProvider"
    x = load_dataset("digits:16", "test").x[:120].cuda()
    out = engine(x)
    assert out.device == x.device and out.dtype == torch.float32
    with torch.no_grad():
        ref = model.to("cpu")(x.cpu())
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4 * float(ref.abs().max()) + 1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or TRT_VERSION is None, reason="needs a CUDA device and TensorRT")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_export_and_run(digits_model, tmp_path, precision):
    path, _ = digits_model
    out = tmp_path / f"m-{precision}.engine"
    r = run("--device", "cuda", "export", str(path), "--format", "tensorrt", "--precision", precision,
            "--samples", "128", "--max-batch", "64", "--timing-cache", str(tmp_path / "timing.cache"),
            "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    side = json.loads(sidecar_path(out).read_text())
    assert side["tensorrt_version"] == TRT_VERSION and side["precision"] == precision
    assert side["gpu"]["name"] == torch.cuda.get_device_name() and side["profile"]["max"] == [64, 1, 16, 16]
    assert side["onnx"]["sha256"] == doc["onnx"]["sha256"] and (tmp_path / "timing.cache").is_file()
    engine = load_engine(out, "cuda")
    assert isinstance(engine, TensorRTEngine) and engine.max_batch == 64 and engine.sha256 == side["engine_sha256"]
    x = load_dataset("digits:16", "test").x[:150].cuda()
    model, _ = load_twin(path, device="cuda")
    from exporters.parity import measure_parity

    report = measure_parity(model, engine, x, precision=precision, name=engine.name, runtime="tensorrt")
    assert report.passed and report.top1_agreement >= (1.0 if precision == "fp32" else 0.95)
    shutil.copy(out, tmp_path / "copy.engine")  # an engine without its sidecar is refused
    with pytest.raises(UserError, match="no sidecar"):
        load_engine(tmp_path / "copy.engine", "cuda")


def test_parity_runtime_follows_what_builds_the_kernels(digits_onnx):
    """ONNX Runtime's CPU and CUDA providers get its FP32 tolerance; its TensorRT provider (TF32 cannot be turned off)
    and the kit's TensorRT engines get TensorRT's."""
    from exporters.parity import FP32_TOLERANCE

    path, _, _, files = digits_onnx
    engine = OnnxRuntimeEngine(files["fp32"])
    assert engine.parity_runtime == "onnxruntime" and TorchEngine.from_checkpoint(path).parity_runtime == "onnxruntime"
    engine.providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]  # what such a session reports
    assert engine.parity_runtime == "tensorrt"
    assert FP32_TOLERANCE["tensorrt"][0] > FP32_TOLERANCE["onnxruntime"][0]
