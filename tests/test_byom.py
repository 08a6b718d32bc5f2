"""Models trained elsewhere, end to end: ``otkit models import`` and ``--twin`` on the fly (docs/byom.md).

Each source is made from a real module as a user would make it (torch.save of a state dict in a released layout, a
``torch.export`` program, an ONNX export); the imported twin must compute what the original computes (exactly for
fp32 weights, within the export tolerance of ONNX Runtime for a rebuilt graph), survive the round trip through a kit
checkpoint, and the commands must refuse bad input in one line with nothing written.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn as nn

from exporters.parity import FP32_TOLERANCE
from exporters.twins import TwinOptions, import_twin, load_any_twin
from kit.checkpoint import load_twin
from kit.convention import parse_convention
from kit.errors import UserError
from tests.clitools import assert_user_error, run

ARCH = '''
import torch.nn as nn


class Net(nn.Module):
    """A researcher's network: takes normalised input ((x - 0.5) / 0.25)."""

    def __init__(self, num_classes=10, input_shape=(1, 16, 16)):
        super().__init__()
        c, h, w = input_shape
        self.features = nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(8 * (h // 2) * (w // 2), num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))
'''


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory):
    """A network trained a few steps on digits outside the kit (normalised input), saved in several layouts."""
    import importlib.util

    from kit.data import load_dataset

    folder = tmp_path_factory.mktemp("elsewhere")
    (folder / "net.py").write_text(ARCH)
    spec = importlib.util.spec_from_file_location("byom_net_test", folder / "net.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    net = mod.Net()
    ds = load_dataset("digits:16", "train").subset(256, seed=0, notice=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(20):
        loss = nn.functional.cross_entropy(net((ds.x - 0.5) / 0.25), ds.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    state = net.state_dict()
    files = {
        "bare": {k: v for k, v in state.items()},
        "model_state_dict": {"epoch": 20, "model_state_dict": state, "optimizer_state_dict": opt.state_dict()},
        "ddp": {"state_dict": {"module." + k: v for k, v in state.items()}},
        "list": {"state_dict": [state]},
        "net": {"net": state, "acc": 0.9},
    }
    paths = {}
    for name, obj in files.items():
        paths[name] = folder / f"{name}.pth"
        torch.save(obj, paths[name])
    from safetensors.torch import save_file

    paths["safetensors"] = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, paths["safetensors"])
    native = torch.export.export(net, (torch.rand(2, 1, 16, 16),), dynamic_shapes=({0: torch.export.Dim("n")},))
    paths["pt2"] = folder / "net.pt2"
    torch.export.save(native, paths["pt2"])
    paths["onnx"] = folder / "net.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.rand(2, 1, 16, 16),), str(paths["onnx"]), dynamo=False, opset_version=18,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    x = load_dataset("digits:16", "test").subset(64, seed=0, notice=False).x
    return {"net": net, "arch": f"{folder / 'net.py'}:Net", "paths": paths, "x": x, "folder": folder}


NORM = parse_convention("mean=0.5;std=0.25")


def expected(env) -> torch.Tensor:
    with torch.no_grad():
        return env["net"]((env["x"] - 0.5) / 0.25)


@pytest.mark.parametrize("layout", ["bare", "model_state_dict", "ddp", "list", "net", "safetensors"])
def test_weights_in_every_layout_give_the_original_logits_exactly(elsewhere, layout, tmp_path):
    opts = TwinOptions(arch=elsewhere["arch"], num_classes=10, input_shape=(1, 16, 16), convention=NORM)
    twin = import_twin(elsewhere["paths"][layout], opts)
    with torch.no_grad():
        assert torch.equal(twin.model(elsewhere["x"]), expected(elsewhere))  # the normalisation folded in, exactly
    # through the CLI into a kit checkpoint and back
    out = tmp_path / "imported.safetensors"
    res = run("models", "import", elsewhere["paths"][layout], "--arch", elsewhere["arch"], "--num-classes", 10,
              "--input-shape", "1,16,16", "--mean", "0.5", "--std", "0.25", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["source"]["prefixes_stripped"] == (["module."] if layout == "ddp" else [])
    assert res.stderr.strip() == f"wrote {out} ({doc['checkpoint_sha256']})"  # on stderr beside the JSON, as elsewhere
    model, info = load_twin(out, arch=elsewhere["arch"])
    with torch.no_grad():
        assert torch.equal(model(elsewhere["x"]), expected(elsewhere))
    assert info.source["kind"] == "weights" and info.defense.startswith("unknown")


def test_program_twin_matches_the_original_and_round_trips(elsewhere, tmp_path):
    twin = import_twin(elsewhere["paths"]["pt2"], TwinOptions(num_classes=10, convention=NORM))
    assert twin.info.input_shape == [1, 16, 16]  # from the program's signature
    with torch.no_grad():
        torch.testing.assert_close(twin.model(elsewhere["x"]), expected(elsewhere), rtol=0, atol=1e-5)
    out = tmp_path / "p.safetensors"
    assert run("models", "import", elsewhere["paths"]["pt2"], "--mean", "0.5", "--std", "0.25", "--out",
               out).exit_code == 0
    model, _ = load_twin(out)  # no --arch: a program is a graph, nothing to import
    with torch.no_grad():
        assert torch.equal(model(elsewhere["x"]), twin.model(elsewhere["x"]))


def test_onnx_only_twin_matches_onnx_runtime_and_the_original_gradients(elsewhere, tmp_path):
    import onnxruntime as ort

    twin = import_twin(elsewhere["paths"]["onnx"], TwinOptions(convention=NORM))
    x = elsewhere["x"]
    sess = ort.InferenceSession(str(elsewhere["paths"]["onnx"]), providers=["CPUExecutionProvider"])
    ref = torch.from_numpy(sess.run(None, {"x": ((x - 0.5) / 0.25).numpy()})[0])
    with torch.no_grad():
        got = twin.model(x)
    atol, rtol = FP32_TOLERANCE["onnxruntime"]
    assert (got - ref).abs().max() <= atol + rtol * ref.abs().max()
    assert twin.parity["verdict"] == "pass"
    # gradients of the rebuilt graph are the original network's
    xa = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(twin.model(xa), ref.argmax(1), reduction="sum").backward()
    xb = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(elsewhere["net"]((xb - 0.5) / 0.25), ref.argmax(1), reduction="sum").backward()
    cos = nn.functional.cosine_similarity(xa.grad.flatten(1), xb.grad.flatten(1))
    assert cos.min() > 0.999
    # the kit checkpoint keeps the graph skeleton and the weights: the same logits, no source file needed
    out = tmp_path / "o.safetensors"
    assert run("models", "import", elsewhere["paths"]["onnx"], "--mean", "0.5", "--std", "0.25", "--out",
               out).exit_code == 0
    model, info = load_twin(out)
    with torch.no_grad():
        assert torch.equal(model(x), got)
    assert info.source["parity"]["samples_from"].startswith("uniform noise")


def test_audit_on_the_fly_with_weights_and_with_the_engine_alone(elsewhere, tmp_path):
    """The engine takes normalised input; the twin is the .pth (imported on the fly), then the ONNX file itself."""
    common = ["--attack", "pgd-linf@0.3", "--samples", "24", "--batch-size", "24", "--rungs", "3",
              "--blackbox-samples", "0", "--data", "digits:16", "--engine-input", "mean=0.5;std=0.25", "--json",
              "--allow-flag", "test-blind"]
    engine = elsewhere["paths"]["onnx"]
    a = run("-q", "audit", "--engine", engine, "--twin", elsewhere["paths"]["ddp"], "--arch", elsewhere["arch"],
            "--num-classes", 10, "--input-shape", "1,16,16", "--mean", "0.5", "--std", "0.25", *common,
            "--out", tmp_path / "a")
    b = run("-q", "audit", "--engine", engine, "--twin", engine, *common, "--out", tmp_path / "b")
    for res in (a, b):
        assert res.exit_code == 0, res.output
    da, db = json.loads(a.stdout), json.loads(b.stdout)
    assert da["verdict"] == db["verdict"] == "match"
    assert da["twin"]["source"]["kind"] == "weights" and db["twin"]["source"]["kind"] == "onnx"
    assert db["twin"]["input_convention"] == NORM.to_dict()
    # the same engine, the same examples: the engine's curve does not depend on which twin guided the search much
    assert da["attacks"][0]["engine"]["auac"] == pytest.approx(db["attacks"][0]["engine"]["auac"], abs=0.05)
    # verify takes the same twin; the engine's input convention comes from the report
    v = run("verify", tmp_path / "b", "--engine", engine, "--twin", engine, "--recheck", 4)
    assert v.exit_code == 0, v.output


# --------------------------------------------------------------------------------------------------- bad input
def _bad_onnx(tmp_path: Path, kind: str) -> Path:
    from onnx import TensorProto, helper

    if kind == "two-inputs":
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 4, 4]) for n in ("a", "b")]
        nodes = [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Flatten", ["s"], ["y"])]
    else:  # dynamic spatial dimensions
        inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 1, "h", "w"])]
        nodes = [helper.make_node("GlobalAveragePool", ["a"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, [out]), opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / f"{kind}.onnx"
    onnx.save(model, path)
    return path


class _Code:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.mkdir, (self.marker,))


@pytest.mark.parametrize("case", ["pickle-code", "no-layout", "no-arch-file", "bad-shape", "wrong-shape",
                                  "two-inputs", "dynamic-spatial", "contradiction", "no-classes", "arch-for-graph",
                                  "kit-checkpoint-flags", "missing"])
def test_bad_input_is_one_line_and_writes_nothing(elsewhere, case, tmp_path, digits_model):
    marker = tmp_path / "ran"
    paths, arch = elsewhere["paths"], elsewhere["arch"]
    weights = ["--arch", arch, "--num-classes", 10, "--input-shape", "1,16,16"]
    if case == "pickle-code":
        evil = tmp_path / "evil.pth"
        torch.save({"state_dict": _Code(marker)}, evil)
        args, needle = [evil, *weights], "weights_only=True"
    elif case == "no-layout":
        odd = tmp_path / "odd.pth"
        torch.save({"weights": {"a": {"w": torch.zeros(1)}}, "epoch": 3}, odd)
        args, needle = [odd, *weights], "weights, epoch"
    elif case == "no-arch-file":
        args, needle = [paths["bare"], "--arch", "missing.py:Net", "--num-classes", 10, "--input-shape", "1,16,16"], \
            "not found"
    elif case == "bad-shape":
        args, needle = [paths["bare"], "--arch", arch, "--num-classes", 10, "--input-shape", "1,16"], "C,H,W"
    elif case == "wrong-shape":
        args, needle = [paths["bare"], "--arch", arch, "--num-classes", 10, "--input-shape", "1,8,8"], "head.weight"
    elif case in ("two-inputs", "dynamic-spatial"):
        args, needle = [_bad_onnx(tmp_path, case)], "2 input(s)" if case == "two-inputs" else "not fixed"
    elif case == "contradiction":
        args, needle = [paths["pt2"], "--input-shape", "3,16,16"], "contradicts"
    elif case == "no-classes":
        args, needle = [paths["bare"], "--arch", arch, "--input-shape", "1,16,16"], "--num-classes"
    elif case == "arch-for-graph":
        args, needle = [paths["onnx"], "--arch", arch], "weight files only"
    elif case == "kit-checkpoint-flags":
        res = run("audit", "--engine", paths["onnx"], "--twin", digits_model[0], "--num-classes", 10, "--attack",
                  "pgd-linf@0.3", "--out", tmp_path / "a")
        assert_user_error(res, "is a kit checkpoint", "--num-classes")
        assert not (tmp_path / "a").exists()
        return
    else:
        args, needle = [tmp_path / "nothing.pth", *weights], "not found"
    out = tmp_path / "out.safetensors"
    assert_user_error(run("models", "import", *args, "--out", out), needle)
    assert not out.exists() and not marker.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".safetensors")] == []


def test_import_refuses_to_replace_without_overwrite(elsewhere, tmp_path):
    out = tmp_path / "m.safetensors"
    args = ["models", "import", elsewhere["paths"]["pt2"], "--out", out]
    assert run(*args).exit_code == 0
    before = out.read_bytes()
    assert_user_error(run(*args), "--overwrite")
    assert out.read_bytes() == before
    assert run(*args, "--overwrite").exit_code == 0


def test_classes_file_and_dataset_are_recorded(elsewhere, tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"digit {i}" for i in range(10)) + "\n")
    out = tmp_path / "m.safetensors"
    res = run("models", "import", elsewhere["paths"]["pt2"], "--classes", names, "--dataset", "digits:16",
              "--out", out, "--json")
    assert res.exit_code == 0, res.output
    _, info = load_twin(out)
    assert info.class_names[3] == "digit 3" and info.dataset["spec"] == "digits:16"
    assert info.dataset["fingerprint"].startswith("sha256:")
    with pytest.raises(UserError, match="contradicts --classes"):
        import_twin(elsewhere["paths"]["pt2"], TwinOptions(num_classes=3, classes=tuple("abcdefghij")))


def test_load_any_twin_leaves_kit_checkpoints_as_they_are(digits_model):
    twin = load_any_twin(digits_model[0])
    model, info = load_twin(digits_model[0])
    assert twin.kind == "checkpoint" and twin.info.weights_sha256 == info.weights_sha256


# ------------------------------------------------------------------------------ found by review: each a repro
def _strip_metadata(src: Path, dst: Path, keep_format: bool) -> Path:
    model = onnx.load(src)
    keep = [(p.key, p.value) for p in model.metadata_props if keep_format and p.key == "otkit.format"]
    del model.metadata_props[:]
    for k, v in keep:
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, dst)
    return dst


def test_a_wrong_engine_input_cannot_pass(digits_model, tmp_path):
    """A kit export without input_convention metadata (written before it existed) refuses a description; a file
    with no metadata at all, described wrongly, fails on the fp32 logit gap even where top-1 predictions agree."""
    from exporters.checkpoint import export_checkpoint

    kit_onnx = export_checkpoint(digits_model[0], "onnx", tmp_path / "m.onnx").path
    older = _strip_metadata(kit_onnx, tmp_path / "older.onnx", keep_format=True)
    args = ["--attack", "pgd-linf@0.3", "--samples", "16", "--rungs", "2", "--blackbox-samples", "0"]
    assert_user_error(run("-q", "audit", "--engine", older, "--engine-input", "mean=0.01;std=1.01", "--twin",
                          digits_model[0], *args, "--out", tmp_path / "a"), "contradicts")
    bare = _strip_metadata(kit_onnx, tmp_path / "bare.onnx", keep_format=False)
    res = run("-q", "audit", "--engine", bare, "--engine-input", "mean=0.01;std=1.01", "--twin", digits_model[0],
              *args, "--json", "--out", tmp_path / "b")
    assert res.exit_code == 1, res.output
    clean = json.loads(res.stdout)["clean"]
    assert clean["verdict"] == "mismatch" and clean["max_logit_gap"] > clean["max_logit_gap_tolerance"]
    assert "max logit gap" in res.stderr


def test_verify_refuses_a_twin_built_with_other_flags(elsewhere, tmp_path):
    engine = elsewhere["paths"]["onnx"]
    flags = ["--arch", elsewhere["arch"], "--num-classes", 10, "--input-shape", "1,16,16"]
    res = run("-q", "audit", "--engine", engine, "--engine-input", "mean=0.5;std=0.25", "--twin",
              elsewhere["paths"]["bare"], *flags, "--mean", "0.5", "--std", "0.25", "--attack", "pgd-linf@0.3",
              "--samples", "16", "--rungs", "2", "--blackbox-samples", "0", "--data", "digits:16",
              "--allow-flag", "test-blind", "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    good = run("verify", tmp_path / "a", "--engine", engine, "--twin", elsewhere["paths"]["bare"], *flags, "--recheck",
               2)
    assert good.exit_code == 0, good.output  # the report's folded convention is the default
    bad = run("verify", tmp_path / "a", "--engine", engine, "--twin", elsewhere["paths"]["bare"], *flags, "--mean",
              "0.4", "--std", "0.25", "--recheck", 2)
    assert bad.exit_code == 1 and "twin input convention differs" in bad.stderr


def test_twins_that_cannot_run_are_refused_before_use(elsewhere, tmp_path):
    paths = elsewhere["paths"]
    # a graph whose shape does not fit the data: one line, with the NHWC hint where it applies
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")

        class NHWC(nn.Module):
            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, z):
                return self.net(z.permute(0, 3, 1, 2))

        nhwc = tmp_path / "nhwc.onnx"
        torch.onnx.export(NHWC(elsewhere["net"]).eval(), (torch.rand(2, 16, 16, 1),), str(nhwc), dynamo=False,
                          opset_version=18, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    assert_user_error(run("models", "import", nhwc, "--dataset", "digits:16", "--out", tmp_path / "o.safetensors"),
                      "--input-layout nhwc")
    assert run("models", "import", nhwc, "--dataset", "digits:16", "--input-layout", "nhwc", "--mean", "0.5",
               "--std", "0.25", "--out", tmp_path / "o.safetensors").exit_code == 0
    # a program traced for one batch size
    static = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(elsewhere["net"], (torch.rand(2, 1, 16, 16),)), static)
    assert_user_error(run("models", "import", static, "--out", tmp_path / "s.safetensors"), "dynamic batch")
    # a shape whose layers do not fit in memory
    assert_user_error(run("models", "import", paths["bare"], "--arch", "cnn-small", "--num-classes", 10,
                          "--input-shape", "1,60000,60000", "--out", tmp_path / "h.safetensors"), "cannot build")
    # the flags a contradiction names are the ones given
    assert_user_error(run("models", "import", _kit_onnx(tmp_path), "--mean", "0.5", "--out",
                          tmp_path / "k.safetensors"), "--input-range/--mean/--std/--input-layout", "contradicts")


def _kit_onnx(tmp_path: Path) -> Path:
    import models as zoo
    from exporters.onnx.write import export_onnx

    model = zoo.create("cnn-small", num_classes=10, input_shape=(1, 16, 16)).eval()
    return export_onnx(model, tmp_path / "kit.onnx", torch.rand(8, 1, 16, 16)).path


def test_external_data_and_lightning_prefixes_import(elsewhere, tmp_path):
    ext = tmp_path / "ext"
    ext.mkdir()
    model = onnx.load(elsewhere["paths"]["onnx"])
    onnx.save(model, ext / "net.onnx", save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
              size_threshold=0)
    twin = import_twin(ext / "net.onnx", TwinOptions(convention=NORM))
    with torch.no_grad():
        torch.testing.assert_close(twin.model(elsewhere["x"]), expected(elsewhere), rtol=0, atol=1e-4)
    ckpt = tmp_path / "lightning.ckpt"
    torch.save({"epoch": 3, "state_dict": {"model." + k: v for k, v in elsewhere["net"].state_dict().items()}},
               ckpt)
    twin = import_twin(ckpt, TwinOptions(arch=elsewhere["arch"], num_classes=10, input_shape=(1, 16, 16),
                                         convention=NORM))
    assert twin.info.source["prefixes_stripped"] == ["model."]
    with torch.no_grad():
        assert torch.equal(twin.model(elsewhere["x"]), expected(elsewhere))


def test_an_nhwc_looking_onnx_graph_gets_a_hint(tmp_path, caplog):
    """A graph whose input reads (16, 16, 1) as (C, H, W) is most likely channels-last: the import says which flag
    reads it so; with --input-layout nhwc the note is gone and the shape is (1, 16, 16)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("GlobalAveragePool", ["t"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 16, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(rng.normal(size=(10, 1)).astype(np.float32), "w")])
    path = tmp_path / "nhwc.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    res = run("models", "import", path, "--num-classes", 10, "--out", tmp_path / "a.safetensors", "--json")
    assert res.exit_code == 0, res.output
    said = res.stderr + caplog.text  # the CLI logs to stderr; under pytest the log capture takes it first
    assert "give --input-layout nhwc" in said and json.loads(res.stdout)["input_shape"] == [16, 16, 1]
    caplog.clear()
    res = run("models", "import", path, "--num-classes", 10, "--input-layout", "nhwc", "--out",
              tmp_path / "b.safetensors", "--json")
    assert res.exit_code == 0 and "--input-layout" not in res.stderr + caplog.text, res.output
    assert json.loads(res.stdout)["input_shape"] == [1, 16, 16]
