"""Models trained elsewhere: weights files in the layouts real releases use, torch.export programs, timm/torchvision.

Every layout is written the way researchers write it (``torch.save`` of a real module's state, with optimizer state,
DataParallel or torch.compile wrappers, safetensors) and read back into a fresh module whose logits must equal the
original's exactly. Files that would run code carry a payload that creates a marker folder: the marker's absence is the
proof that nothing ran.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import logging
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import models
from kit.errors import UserError
from kit.twins.from_program import load_program, program_record, rebuild_program
from kit.twins.hub import build_hub, is_hub_arch, rebuild_hub
from kit.twins.layouts import find_state_dict, load_strict, read_weights, strip_prefixes

SHAPE = (1, 16, 16)


def make_model(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return models.create("cnn-small", num_classes=num_classes, input_shape=SHAPE).eval()


@pytest.fixture(scope="module")
def trained():
    """A cnn-small with weights unlike a fresh one's, and a batch of inputs."""
    model = make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(1))


class MakeDirOnLoad:
    """Unpickling this calls ``os.makedirs(marker)``: the marker folder is the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def import_into_fresh(path: Path, key: str | None = None) -> tuple[nn.Module, str, list[str]]:
    state, where = find_state_dict(read_weights(path), key=key, source=str(path))
    state, removed = strip_prefixes(state)
    fresh = make_model()
    fresh.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    load_strict(fresh, state, str(path))
    return fresh, where, removed


def optimizer_state(model: nn.Module) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    model(torch.rand(2, *SHAPE)).sum().backward()
    opt.step()
    model.zero_grad()
    return opt.state_dict()


# ---------------------------------------------------------------------------------------------------------------------
# layouts


LAYOUTS = {
    "bare": (lambda m: m.state_dict(), None, "top level", []),
    "state_dict": (lambda m: {"state_dict": m.state_dict()}, None, "'state_dict'", []),
    "model_state_dict+training state": (
        lambda m: {"model_state_dict": m.state_dict(), "epoch": 3, "optimizer": optimizer_state(copy.deepcopy(m))},
        None, "'model_state_dict'", []),
    "model": (lambda m: {"model": m.state_dict(), "epoch": 90}, None, "'model'", []),
    "net": (lambda m: {"net": m.state_dict(), "acc": 93.1}, None, "'net'", []),
    "state_dict list": (lambda m: {"state_dict": [m.state_dict()]}, None, "'state_dict'[0]", []),
    "DataParallel": (lambda m: {"state_dict": nn.DataParallel(m).state_dict()}, None, "'state_dict'", ["module."]),
    "torch.compile": (lambda m: torch.compile(m).state_dict(), None, "top level", ["_orig_mod."]),
    "DataParallel of compiled": (lambda m: nn.DataParallel(torch.compile(m)).state_dict(), None, "top level",
                                 ["module.", "_orig_mod."]),
    "custom key": (lambda m: {"ema": {"weights": m.state_dict(), "decay": 0.999}, "epoch": 1}, "ema.weights",
                   "'ema.weights'", []),
    "args and numpy scalars beside": (
        lambda m: {"model": m.state_dict(), "args": argparse.Namespace(lr=0.1, arch="cnn"),
                   "best_acc1": np.float64(0.93)}, None, "'model'", []),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_round_trip_gives_identical_logits(layout, trained, tmp_path):
    model, x = trained
    build, key, where_expected, removed_expected = LAYOUTS[layout]
    path = tmp_path / "weights.pth"
    torch.save(build(model), path)
    fresh, where, removed = import_into_fresh(path, key=key)
    assert where == where_expected
    assert removed == removed_expected
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_safetensors_round_trip(trained, tmp_path):
    from safetensors.torch import save_file

    model, x = trained
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    fresh, where, _ = import_into_fresh(path)
    assert where == "top level"
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_half_precision_checkpoint_is_cast_to_the_model_dtype(trained, tmp_path, caplog):
    model, x = trained
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
               tmp_path / "fp16.pt")
    reference = copy.deepcopy(model)
    reference.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    with caplog.at_level(logging.INFO, logger="kit.twins.layouts"):
        fresh, _, _ = import_into_fresh(tmp_path / "fp16.pt")
    assert all(p.dtype == torch.float32 for p in fresh.parameters())
    assert "torch.float16 -> torch.float32" in caplog.text
    with torch.no_grad():
        assert torch.equal(fresh(x), reference(x))


def test_integer_tensors_are_never_cast(tmp_path):
    bn = nn.BatchNorm2d(3)
    state = dict(bn.state_dict())
    state["num_batches_tracked"] = state["num_batches_tracked"].float()
    with pytest.raises(UserError, match="num_batches_tracked: checkpoint holds torch.float32 values, model expects "
                                        "torch.int64"):
        load_strict(nn.BatchNorm2d(3), state, "bn.pt")


def test_pickle_with_code_is_refused_and_never_runs(trained, tmp_path):
    model, _ = trained
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": model.state_dict(), "extra": MakeDirOnLoad(marker)}, path)
    with pytest.raises(UserError) as err:
        read_weights(path)
    message = str(err.value)
    assert "refusing to load" in message and "weights_only=True" in message and "os.makedirs" in message
    assert "False" not in message and "trust" not in message  # never torch's advice to load unsafely
    assert "\n" not in message
    assert not marker.exists()
    import pickle  # the payload is live: an ordinary unpickler runs it

    pickle.loads(pickle.dumps(MakeDirOnLoad(tmp_path / "live")))
    assert (tmp_path / "live").is_dir()


def test_whole_pickled_model_is_refused_naming_its_class(trained, tmp_path):
    model, _ = trained
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(UserError, match="models.small.CNNSmall.*weights_only=True"):
        read_weights(tmp_path / "whole.pt")


@pytest.mark.parametrize("name,content,expected", [
    ("garbage.pt", b"not a checkpoint at all" * 4, r"does not read it \(pickle opcode 110\)"),
    ("old-style.pt", b"(ios\nsystem\nS'true'\no.", r"does not read it \(pickle opcode 105\).*possibly code"),
    ("zip.pt", b"PK\x03\x04" + bytes(60), "not a readable PyTorch file"),
    ("empty.pth", b"", "not a readable PyTorch file"),
    ("broken.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{oops}", "not a readable safetensors file"),
    ("weights.h5", b"\x89HDF", "unknown weights file type"),
    ("program.pt2", b"PK", "imported as a program"),
])
def test_unreadable_files_are_one_line_user_errors(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=expected) as err:
        read_weights(path)
    assert "\n" not in str(err.value)


def test_truncated_and_missing_files(trained, tmp_path):
    model, _ = trained
    torch.save(model.state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable PyTorch file"):
        read_weights(tmp_path / "cut.pt")
    with pytest.raises(UserError, match="not found"):
        read_weights(tmp_path / "absent.pt")


def test_no_layout_fits_lists_top_level_keys_and_suggests_key():
    obj = {"epoch": 3, "optimizer": {"state": {}}, "weights_v2": {"a": 1}, "hparams": {"lr": 0.1}}
    with pytest.raises(UserError) as err:
        find_state_dict(obj, source="ckpt.pt")
    message = str(err.value)
    for key in ("epoch", "optimizer", "weights_v2", "hparams", "--key"):
        assert key in message


def test_long_key_lists_are_truncated():
    obj = {f"entry_{i}": i for i in range(30)}
    with pytest.raises(UserError, match=r"entry_9, \.\.\. \(20 more\)"):
        find_state_dict(obj, source="ckpt.pt")


def test_top_level_with_non_tensors_is_not_a_state_dict(trained):
    model, _ = trained
    mixed = {**model.state_dict(), "epoch": 3}
    with pytest.raises(UserError, match="no state dict found"):
        find_state_dict(mixed)


def test_ema_weights_are_taken_only_when_alone(trained):
    model, _ = trained
    sd = model.state_dict()
    ema = {k: v + 1 for k, v in sd.items()}
    assert find_state_dict({"model": sd, "model_ema": ema})[1] == "'model'"
    assert find_state_dict({"model_ema": ema, "epoch": 2})[1] == "'model_ema'"
    assert find_state_dict({"model": sd, "model_ema": ema}, key="model_ema")[0]["head.bias"].equal(ema["head.bias"])


def test_several_state_dicts_are_ambiguous(trained):
    model, _ = trained
    sd = model.state_dict()
    with pytest.raises(UserError, match=r"holds 2 state dicts.*--key \(state_dict\.0, state_dict\.1\)"):
        find_state_dict({"state_dict": [sd, sd]})
    state, where = find_state_dict({"state_dict": [sd, sd]}, key="state_dict.1")
    assert where == "'state_dict.1'" and set(state) == set(sd)


def test_key_that_is_absent_or_not_a_state_dict(trained):
    model, _ = trained
    obj = {"ema": {"weights": model.state_dict()}, "epoch": 1}
    with pytest.raises(UserError, match=r"no 'nope' under 'ema' \(keys there: weights\)"):
        find_state_dict(obj, key="ema.nope")
    with pytest.raises(UserError, match="holds a int there, not a state dict"):
        find_state_dict(obj, key="epoch")


def test_prefixes_are_stripped_only_when_every_key_has_them():
    t = torch.zeros(1)
    assert strip_prefixes({"module.a": t, "b": t}) == ({"module.a": t, "b": t}, [])
    state, removed = strip_prefixes({"_orig_mod.module.a": t, "_orig_mod.module.b": t})
    assert list(state) == ["a", "b"] and removed == ["_orig_mod.", "module."]


def test_shape_mismatch_names_the_first_offending_tensor(trained):
    model, _ = trained
    with pytest.raises(UserError, match=r"head\.weight: checkpoint has \(10, 100\), model expects \(100, 100\) "
                                        r"\(2 tensors differ\)"):
        load_strict(make_model(num_classes=100), model.state_dict(), "ckpt.pt")


def test_missing_and_unexpected_keys_are_counted_and_named(trained):
    model, _ = trained
    state = dict(model.state_dict())
    del state["head.bias"]
    state["classifier.weight"] = torch.zeros(1)
    with pytest.raises(UserError) as err:
        load_strict(make_model(), state, "ckpt.pt")
    message = str(err.value)
    assert "1 key of the model missing from the checkpoint (first: head.bias)" in message
    assert "1 checkpoint key unknown to the model (first: classifier.weight)" in message


def test_a_foreign_prefix_is_pointed_out(trained):
    model, _ = trained
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="every checkpoint key starts with 'model.'"):
        load_strict(make_model(), state, "lightning.ckpt")


# ---------------------------------------------------------------------------------------------------------------------
# torch.export programs


class SmallCNN(nn.Module):
    def __init__(self, channels: int = 3, num_classes: int = 7) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Dropout(0.3), nn.AdaptiveAvgPool2d(2))
        self.fc = nn.Linear(32, num_classes)
        self.register_buffer("mean", torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))

    def forward(self, x):
        return self.fc(self.features(x - self.mean).flatten(1)) * torch.tensor(2.0)  # a lifted tensor constant


def export_to(model: nn.Module, path: Path, example: tuple, dynamic: bool = True) -> Path:
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
    torch.export.save(torch.export.export(model, example, dynamic_shapes=shapes), path)
    return path


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():
        model.features[1].running_mean.uniform_(-0.2, 0.2)
        model.features[1].running_var.uniform_(0.5, 2.0)
    path = export_to(model, tmp_path_factory.mktemp("pt2") / "model.pt2", (torch.rand(3, 3, 12, 12),))
    return model, path


def test_program_loads_and_matches_the_original(program):
    model, path = program
    module, info = load_program(path)
    for n in (1, 5):
        x = torch.rand(n, 3, 12, 12)
        with torch.no_grad():
            assert torch.allclose(module(x), model(x), atol=1e-6, rtol=0)
    assert info["input_shape"] == [3, 12, 12] and info["num_classes"] == 7
    assert info["batch_dynamic"] is True and info["batch_range"] == [1, 64]
    assert info["program_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["torch_version_saved"] == torch.__version__ and info["traced_mode"] == "eval"


@pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # torch's own, when a GraphModule is deep-copied
def test_program_module_is_eval_only_differentiable_and_keeps_its_constants(program):
    _, path = program
    module, _ = load_program(path)
    assert module.eval() is module and not module.training
    with pytest.raises(UserError, match="cannot be put in training mode"):
        module.train()
    x = torch.rand(2, 3, 12, 12, requires_grad=True)
    module(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    plain = [n for sub in module.modules() for n, v in vars(sub).items() if isinstance(v, torch.Tensor)]
    assert plain == []  # lifted constants became buffers: .to(device) moves them
    assert "lifted_tensor_0" in dict(module.named_buffers()) and "lifted_tensor_0" not in module.state_dict()
    assert set(module.state_dict()) == set(SmallCNN().state_dict())
    moved = copy.deepcopy(module).to("meta")  # every tensor follows .to(): constants too
    assert all(t.device.type == "meta" for t in (*moved.parameters(), *moved.buffers()))
    assert moved(torch.rand(2, 3, 12, 12, device="meta")).shape == (2, 7)


def test_program_record_round_trip(program):
    model, path = program
    module, _ = load_program(path)
    record = json.loads(json.dumps(program_record(path)))  # as stored: JSON text in the checkpoint's metadata
    assert record["kind"] == "program" and len(record["archive"]) < 20_000
    rebuilt = rebuild_program(record)
    assert all(float(p.detach().abs().sum()) == 0.0 for p in rebuilt.parameters())  # the weights travel separately
    rebuilt.load_state_dict(module.state_dict(), strict=True)
    x = torch.rand(5, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), module(x))
    tampered = dict(record, archive_sha256="0" * 64)
    with pytest.raises(UserError, match="does not match its recorded sha256"):
        rebuild_program(tampered)


def test_program_with_two_inputs_is_refused(tmp_path):
    class Two(nn.Module):
        def forward(self, x, y):
            return x.flatten(1)[:, :3] + y

    path = export_to(Two(), tmp_path / "two.pt2", (torch.rand(2, 1, 2, 2), torch.rand(2, 3)), dynamic=False)
    with pytest.raises(UserError, match="takes 2 inputs"):
        load_program(path)


def test_program_exported_in_training_mode_is_refused(tmp_path):
    path = export_to(SmallCNN().train(), tmp_path / "train.pt2", (torch.rand(2, 3, 8, 8),))
    with pytest.raises(UserError, match="exported in training mode.*model.eval"):
        load_program(path)


def test_corrupt_program_is_refused(program, tmp_path):
    _, path = program
    (tmp_path / "junk.pt2").write_bytes(b"definitely not a zip file" * 10)
    data = path.read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[: len(data) // 2])
    for name in ("junk.pt2", "cut.pt2"):
        with pytest.raises(UserError, match="not a torch.export archive") as err:
            load_program(tmp_path / name)
        assert "\n" not in str(err.value)


def rewrite_archive(src: Path, dst: Path, edit) -> Path:
    """Copy a .pt2 archive record by record, letting ``edit(records)`` change them (what an attacker would do)."""
    from torch.export.pt2_archive import PT2ArchiveReader, PT2ArchiveWriter

    reader = PT2ArchiveReader(str(src))
    records = {n: reader.read_bytes(n) for n in reader.get_file_names() if not n.startswith(".data/")}
    edit(records)
    with PT2ArchiveWriter(str(dst)) as writer:
        for name, data in records.items():
            writer.write_bytes(name, data)
    return dst


def pickled(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def edit_json(records: dict, name: str, change) -> None:
    doc = json.loads(records[name])
    change(doc)
    records[name] = json.dumps(doc).encode()


def _pickled_weight(marker):
    def edit(records):
        cfg = json.loads(records["data/weights/model_weights_config.json"])
        meta = cfg["config"]["fc.bias"]
        meta["use_pickle"] = True
        records["data/weights/" + meta["path_name"]] = pickled(MakeDirOnLoad(marker))
        records["data/weights/model_weights_config.json"] = json.dumps(cfg).encode()
    return edit


def _pickled_sample_inputs(marker):
    def edit(records):
        records["data/sample_inputs/model.pt"] = pickled(MakeDirOnLoad(marker))
    return edit


def _sympy_expression(marker):
    payload = f"(lambda: 0).__globals__['__builtins__']['__import__']('os').makedirs({str(marker)!r})"

    def change(doc):
        doc["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]["as_expr"]["expr_str"] = payload
    return lambda records: edit_json(records, "models/model.json", change)


def _input_name(marker):
    name = f"x=__import__('os').makedirs({str(marker)!r})"

    def edit(records):
        text = records["models/model.json"].decode()
        records["models/model.json"] = text.replace('"name": "x"', json.dumps({"name": name})[1:-1]).replace(
            '"x": {"dtype"', json.dumps(name) + ': {"dtype"').encode()
    return edit


def _aoti(marker):
    def edit(records):
        records["data/aotinductor/model/model.so"] = b"\x7fELF"
    return edit


@pytest.mark.parametrize("attack,expected", [
    (_pickled_weight, "stored as a pickle"),
    (_pickled_sample_inputs, "sample inputs hold objects other than tensors"),
    (_sympy_expression, "shape expression"),
    (_input_name, "not a plain identifier"),
    (_aoti, "compiled AOTInductor code"),
])
def test_malicious_program_archive_is_refused_before_anything_runs(program, tmp_path, attack, expected):
    """Each of these archives runs its payload under torch.export.load (see kit/twins/from_program.py)."""
    _, path = program
    marker = tmp_path / "pwned"
    evil = rewrite_archive(path, tmp_path / "evil.pt2", attack(marker))
    with pytest.raises(UserError, match=expected) as err:
        load_program(evil)
    assert "refusing to load" in str(err.value)
    with pytest.raises(UserError, match=expected):
        program_record(evil)
    assert not marker.exists()


def test_guards_code_of_the_archive_is_never_run(program, tmp_path):
    _, path = program
    marker = tmp_path / "pwned"

    def change(doc):
        doc["guards_code"] = [f"__import__('os').makedirs({str(marker)!r}) is None"]

    evil = rewrite_archive(path, tmp_path / "guards.pt2", lambda r: edit_json(r, "models/model.json", change))
    module, _ = load_program(evil)
    module(torch.rand(2, 3, 12, 12))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# timm / torchvision


def tiny_net(num_classes: int, in_chans: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_chans, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


@pytest.fixture
def fake_timm(monkeypatch):
    calls = []
    timm = types.ModuleType("timm")
    timm.__version__ = "9.9.9-fake"

    def create_model(name, **kwargs):
        calls.append((name, kwargs))
        return tiny_net(kwargs["num_classes"], kwargs.get("in_chans", 3))

    timm.create_model = create_model
    timm.is_model = lambda name: name in ("resnet18", "vit_tiny_patch16_224")
    monkeypatch.setitem(sys.modules, "timm", timm)
    return calls


@pytest.fixture
def fake_torchvision(monkeypatch):
    calls = []
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.99-fake"
    tv_models = types.ModuleType("torchvision.models")

    def get_model(name, **kwargs):
        calls.append((name, kwargs))
        return tiny_net(kwargs["num_classes"], 3)

    tv_models.get_model = get_model
    tv_models.list_models = lambda: ["resnet18", "mobilenet_v3_small"]
    tv.models = tv_models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", tv_models)
    return calls


def test_is_hub_arch():
    assert is_hub_arch("timm:resnet18") and is_hub_arch("torchvision:resnet18")
    assert not is_hub_arch("cnn-small") and not is_hub_arch("timm:") and not is_hub_arch("net.py:Net")
    assert not is_hub_arch("keras:resnet")


def test_timm_model_is_built_untrained_and_rebuilt(fake_timm):
    model, record = build_hub("timm:resnet18", 10, (1, 16, 16), {"drop_rate": 0.1})
    assert fake_timm == [("resnet18", {"pretrained": False, "num_classes": 10, "in_chans": 1, "drop_rate": 0.1})]
    assert record == {"kind": "timm", "name": "resnet18", "num_classes": 10, "input_shape": [1, 16, 16],
                      "kwargs": {"drop_rate": 0.1}, "package_version": "9.9.9-fake"}
    rebuilt = rebuild_hub(json.loads(json.dumps(record)))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(rebuilt(x), model(x))
    assert fake_timm[1] == fake_timm[0]


def test_torchvision_model_is_built_without_weights(fake_torchvision):
    _, record = build_hub("torchvision:resnet18", 100, (3, 32, 32))
    assert fake_torchvision == [("resnet18", {"weights": None, "num_classes": 100})]
    assert record["kind"] == "torchvision" and record["package_version"] == "0.99-fake"
    with pytest.raises(UserError, match="3-channel"):
        build_hub("torchvision:resnet18", 10, (1, 28, 28))


def test_unknown_hub_model_names_it(fake_timm, fake_torchvision):
    with pytest.raises(UserError, match="timm has no model named 'resnet1800'"):
        build_hub("timm:resnet1800", 10, (3, 32, 32))
    with pytest.raises(UserError, match="torchvision has no model named 'vgg99'"):
        build_hub("torchvision:vgg99", 10, (3, 32, 32))
    assert fake_timm == [] and fake_torchvision == []


def test_weights_loading_kwargs_are_refused(fake_timm):
    for key in ("pretrained", "checkpoint_path", "num_classes"):
        with pytest.raises(UserError, match=f"'{key}' is set by otkit or would load weights"):
            build_hub("timm:resnet18", 10, (3, 32, 32), {key: True})
    assert fake_timm == []


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now fails as if it were not installed
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(UserError) as err:
        build_hub("timm:resnet18", 10, (3, 32, 32))
    assert str(err.value) == "timm is not installed: pip install 'otkit[timm]'"
    with pytest.raises(UserError, match=r"torchvision is not installed: pip install 'otkit\[torchvision\]'"):
        rebuild_hub({"kind": "torchvision", "name": "resnet18", "num_classes": 10, "input_shape": [3, 32, 32]})


def test_real_timm_builds_without_downloading():
    pytest.importorskip("timm")
    model, record = build_hub("timm:resnet18", 10, (3, 32, 32))
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10) and record["package_version"]


def test_real_torchvision_builds_without_downloading():
    pytest.importorskip("torchvision")
    model, record = build_hub("torchvision:resnet18", 10, (3, 32, 32))
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10) and record["package_version"]
