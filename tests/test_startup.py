"""Lean start-up (issue 20): what ``--help``, running an ONNX engine and reading the embedded digits import, and that
what replaced the heavy imports gives what they gave.

* ``--help`` of every command imports no torch (nor onnx, ONNX Runtime, numpy, scipy, scikit-learn, matplotlib): the
  attack registry imports no attack module, the lists of defenses and check ids are copies checked here;
* the digits come from ``kit/data/digits.npz`` (no scikit-learn at run time), bit for bit what scikit-learn gave;
* an ``.onnx`` engine is read with :mod:`exporters.onnxproto` (no ``onnx`` import), which reads what ``onnx`` reads;
* matplotlib is imported only to write a PNG.

Behaviour only (which modules a process imports), never timing: start-up figures are in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kit.data import load_dataset
from kit.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

#: libraries none of the ``--help`` screens may import
HELP_FORBIDDEN = ("torch", "onnx", "ml_dtypes", "onnxruntime", "numpy", "scipy", "sklearn", "matplotlib")


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    r = _python(code + "\nimport json as _j, sys as _s\nprint(_j.dumps(sorted(_s.modules)))")
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout.strip().splitlines()[-1]))


def _cli_modules(*args: str) -> tuple[int, set[str], str]:
    """``otkit ARGS`` in a fresh interpreter (as ``python -m kit``): exit status, modules imported, stderr."""
    probe = ("import json, runpy, sys\n"
             f"sys.argv = ['otkit', *{list(args)!r}]\n"
             "code = 0\n"
             "try:\n    runpy.run_module('kit', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code or 0\n"
             "print('MODULES ' + json.dumps([code, sorted(sys.modules)]), file=sys.stderr)")
    r = _python(probe)
    line = next(x for x in reversed(r.stderr.splitlines()) if x.startswith("MODULES "))
    code, modules = json.loads(line[len("MODULES "):])
    return code, set(modules), r.stderr


def _loaded(modules: set[str], *libraries: str) -> list[str]:
    return [lib for lib in libraries if lib in modules]


# ------------------------------------------------------------------------------------------------------------ --help
def test_audit_help_imports_no_torch():
    """``python -X importtime -m kit audit --help``: no torch among the modules it imports (read from -X importtime),
    and the help still lists every attack and check id."""
    from kit.attacks.registry import list_attacks
    from kit.cli.common import FLAG_IDS

    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "kit", "audit", "--help"], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    imported = {m.group(1) for m in re.finditer(r"^import time:.*\|\s*(\S+)\s*$", r.stderr, re.M)}
    assert "kit.cli" in imported and "kit.attacks.registry" in imported  # the parse saw the imports
    assert not [m for m in imported if m.split(".")[0] in HELP_FORBIDDEN], sorted(imported)
    listed = re.sub(r"-\s+", "-", " ".join(r.stdout.split()))  # click wraps the lists, splitting names at hyphens
    assert all(name in listed for name in list_attacks()) and all(i in listed for i in FLAG_IDS)


def test_no_help_screen_imports_heavy_libraries():
    """``--help`` of the root and of every command and group, all in one fresh interpreter."""
    probe = """
import json, sys
import click
from click.testing import CliRunner
from kit.cli import cli

def paths(group, prefix):
    for name, cmd in group.commands.items():
        yield [*prefix, name]
        if isinstance(cmd, click.Group):
            yield from paths(cmd, [*prefix, name])

seen = []
for args in [[], *paths(cli, [])]:
    r = CliRunner().invoke(cli, [*args, "--help"])
    assert r.exit_code == 0, (args, r.output)
    seen.append(" ".join(args))
print(json.dumps(seen))
"""
    r = _python(probe + "\nprint(json.dumps(sorted(sys.modules)))")
    assert r.returncode == 0, r.stderr
    seen_line, modules_line = r.stdout.strip().splitlines()[-2:]
    seen, modules = json.loads(seen_line), set(json.loads(modules_line))
    assert {"audit", "train", "certify", "evaluate", "engine run", "verify"} <= set(seen)
    assert not _loaded(modules, *HELP_FORBIDDEN), _loaded(modules, *HELP_FORBIDDEN)


def test_attack_registry_imports_no_attack():
    """The registry's names come without torch; its specs (norms are kit.attacks.base.Norm) when asked for."""
    modules = _modules_after("from kit.attacks.registry import PRESETS, expand, list_attacks\n"
                             "assert 'pgd-linf' in list_attacks() and expand('autoattack')[0] == 'apgd-ce'\n"
                             "import kit.attacks")
    assert not _loaded(modules, "torch", "kit.attacks.base", "kit.attacks.pgd")

    import kit.attacks
    from kit.attacks import registry
    from kit.attacks.base import Norm

    attacks = registry.ATTACKS
    assert list(attacks) + list(registry.PRESETS) == registry.list_attacks()
    assert registry.get_attack("pgd-linf") is attacks["pgd-linf"] and attacks["pgd-linf"].norm is Norm.LINF
    assert {s.norm for s in attacks.values()} == set(Norm)
    assert attacks["square-linf"].gradient_free and not attacks["pgd-l2"].gradient_free
    for name in kit.attacks.__all__:  # the lazy package gives what the eager one did
        assert getattr(kit.attacks, name) is getattr(importlib.import_module(kit.attacks._WHERE[name]), name)
    assert set(kit.attacks.__all__) <= set(dir(kit.attacks))
    with pytest.raises(AttributeError):
        kit.attacks.NoSuchAttack  # noqa: B018
    with pytest.raises(AttributeError):
        registry.NO_SUCH_NAME  # noqa: B018


def test_cli_copies_of_registry_names():
    """The names ``--help`` shows without importing their registries are the registries' own."""
    from evaluators.checks import CHECKS
    from kit.cli.common import DEFENSE_NAMES, FLAG_IDS
    from kit.defenses import list_defenses

    assert FLAG_IDS == tuple(CHECKS)
    assert DEFENSE_NAMES == tuple(list_defenses())


def test_defense_choice_is_checked_against_the_registry(tmp_path):
    from tests.clitools import run

    r = run("train", "--help")
    assert r.exit_code == 0 and "[standard|madry|" in r.output and "smoothadv]" in r.output
    r = run("train", "--defense", "no-such-defense", "--out", tmp_path / "m.safetensors")
    assert r.exit_code == 2 and "no-such-defense" in r.output and "standard" in r.output


# ------------------------------------------------------------------------------------------------------------ digits
def _shipped() -> tuple[np.ndarray, np.ndarray]:
    from kit.data import digits

    with np.load(ROOT / "kit" / "data" / digits.DIGITS_FILE, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["images", "labels"]
        return npz["images"], npz["labels"]


def test_shipped_digits_fingerprint():
    from kit.data.digits import DIGITS_SHA256, digits_sha256

    images, labels = _shipped()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and int(images.max()) == 16
    assert labels.shape == (1797,) and labels.dtype == np.uint8 and set(labels.tolist()) == set(range(10))
    assert digits_sha256(images, labels) == DIGITS_SHA256
    assert digits_sha256(images, labels[::-1]) != DIGITS_SHA256  # the pairing counts
    assert digits_sha256(images.astype(np.int64), labels) != DIGITS_SHA256  # so do the dtypes


def test_shipped_digits_are_scikit_learns():
    datasets = pytest.importorskip("sklearn.datasets")

    ref = datasets.load_digits()
    images, labels = _shipped()
    assert np.array_equal(images.astype(np.float64), ref.images) and np.array_equal(labels.astype(np.int64), ref.target)


def _digits_the_old_way(arg: str | None, split: str, seed: int):
    """The digits as the kit loaded them before the .npz: scikit-learn's arrays, then the same transform."""
    from sklearn.datasets import load_digits

    from kit.data._common import labels_tensor, split_indices

    d = load_digits()
    images, target = np.array(d.images, dtype=np.float64), np.array(d.target, dtype=np.int64)
    idx = split_indices(len(target), seed, split, "digits")
    x = torch.from_numpy((images[idx] / 16.0).astype(np.float32)).unsqueeze(1).contiguous()
    size = 8 if arg is None else int(arg)
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=False).clamp_(0.0, 1.0).contiguous()
    return x, labels_tensor(target[idx])


@pytest.mark.parametrize("arg", [None, "16", "5", "28"])
def test_digits_are_bit_identical_to_the_scikit_learn_path(arg):
    pytest.importorskip("sklearn")
    from kit.data.dataset import Dataset

    spec = "digits" if arg is None else f"digits:{arg}"
    for split in ("train", "test"):
        for seed in (0, 7):
            ds = load_dataset(spec, split, seed=seed)
            x, y = _digits_the_old_way(arg, split, seed)
            assert ds.x.dtype == x.dtype and ds.y.dtype == y.dtype
            assert torch.equal(ds.x, x) and torch.equal(ds.y, y)
            old = Dataset(x=x, y=y, class_names=ds.class_names, spec=spec, split=split)
            assert ds.fingerprint == old.fingerprint  # what checkpoints record


def test_digits_need_no_scikit_learn():
    modules = _modules_after("from kit.data import load_dataset\nload_dataset('digits:16', 'test')")
    assert not _loaded(modules, "sklearn", "scipy", "matplotlib", "onnx")


def test_damaged_digits_file_is_a_user_error(tmp_path, monkeypatch):
    from kit.data import digits

    bad = tmp_path / "pkg"
    bad.mkdir()
    np.savez(bad / digits.DIGITS_FILE, images=np.zeros((1797, 8, 8), np.uint8), labels=np.zeros(1797, np.uint8))
    monkeypatch.setattr(digits.resources, "files", lambda package: bad)
    digits._digits_raw.cache_clear()
    try:
        with pytest.raises(UserError, match="not the kit's"):
            digits._digits_raw()
        (bad / digits.DIGITS_FILE).write_bytes(b"not a zip")
        with pytest.raises(UserError, match="cannot be read"):
            digits._digits_raw()
    finally:
        digits._digits_raw.cache_clear()


def test_digits_npz_is_package_data():
    """Installed (editable or from a wheel), the package carries the file: pyproject.toml names it."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "digits.npz" in config["tool"]["setuptools"]["package-data"]["kit.data"]
    assert "scikit-learn>=1.3" not in config["project"]["dependencies"]
    from importlib import resources

    assert (resources.files("kit.data") / "digits.npz").is_file()


def test_make_digits_script_writes_the_same_arrays(tmp_path):
    pytest.importorskip("sklearn")
    from kit.data.digits import DIGITS_SHA256, digits_sha256

    out = tmp_path / "digits.npz"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_digits_npz.py"), "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    with np.load(out, allow_pickle=False) as npz:
        assert digits_sha256(npz["images"], npz["labels"]) == DIGITS_SHA256
    again = tmp_path / "again.npz"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_digits_npz.py"), "--out", str(again)],
                   capture_output=True, check=True, cwd=ROOT, timeout=300)
    assert again.read_bytes() == out.read_bytes()  # no write time in the archive


# -------------------------------------------------------------------------------------------------------------- ONNX
@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """An untrained cnn-small exported by the kit in fp32, fp16 and int8, and a bare graph made with onnx.helper."""
    from onnx import TensorProto, helper

    import models
    from exporters.onnx import torch_to_onnx, write_onnx_export

    folder = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = models.create("cnn-small", 10, (1, 16, 16)).eval()
    graph = torch_to_onnx(model, (1, 16, 16), dynamo=False)
    x = torch.rand(32, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    files = {p: write_onnx_export(graph, folder / f"{p}.onnx", model, x, precision=p,
                                  calibration_x=x if p == "int8" else None).path for p in ("fp32", "fp16", "int8")}
    w = helper.make_tensor("w", TensorProto.FLOAT, [64, 10], np.linspace(-1, 1, 640).tolist())
    bare = helper.make_graph([helper.make_node("Flatten", ["input"], ["flat"]),
                              helper.make_node("MatMul", ["flat", "w"], ["logits"])], "bare",
                             [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 8, 8])],
                             [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])], [w])
    files["bare"] = folder / "bare.onnx"
    files["bare"].write_bytes(helper.make_model(bare, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
    return files


def test_onnxproto_fields_are_onnxs():
    """Every field of the kit's reader has ONNX's number, type, label and oneof; every enum ONNX's values."""
    import onnx

    from exporters import onnxproto

    def onnx_descriptor(path: str):
        obj = onnx
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj.DESCRIPTOR

    for path in onnxproto._MESSAGES:
        ours, theirs = onnxproto.message_class(path).DESCRIPTOR, onnx_descriptor(path)
        for f in ours.fields:
            t = theirs.fields_by_name[f.name]
            assert (f.number, f.type, f.is_repeated) == (t.number, t.type, t.is_repeated), (path, f.name)
            assert (f.containing_oneof and f.containing_oneof.name) == (t.containing_oneof and t.containing_oneof.name)
            for a, b in ((f.message_type, t.message_type), (f.enum_type, t.enum_type)):
                assert (a and a.full_name.replace(onnxproto.PACKAGE + ".", "onnx.", 1)) == (b and b.full_name)
    for path, values in onnxproto._ENUMS.items():
        outer, _, name = path.rpartition(".")
        theirs = onnx_descriptor(outer).enum_types_by_name[name]
        assert {v.name: int(v) for v in values} == {v.name: v.number for v in theirs.values}, path


def test_read_graph_reads_what_load_onnx_reads(onnx_files):
    from exporters.graph import (
        external_data_files,
        graph_interface,
        infer_precision,
        load_onnx,
        precision_census,
        read_graph,
        read_metadata,
        uses_external_data,
    )

    for name, path in onnx_files.items():
        full, data, label = load_onnx(path)
        lite, lite_data, lite_label = read_graph(path)
        assert (lite_data, lite_label) == (data, label)
        assert read_metadata(lite) == read_metadata(full), name
        assert graph_interface(lite, label, read_metadata(lite)) == graph_interface(full, label, read_metadata(full))
        assert infer_precision(lite) == infer_precision(full), name
        assert precision_census(lite) == precision_census(full), name
        assert uses_external_data(lite) is uses_external_data(full) is False
        assert external_data_files(lite, path) == external_data_files(full, path) == []
        assert (lite.ir_version, lite.producer_name, [(o.domain, o.version) for o in lite.opset_import]) == \
               (full.ir_version, full.producer_name, [(o.domain, o.version) for o in full.opset_import])
    assert read_metadata(read_graph(onnx_files["int8"])[0])["precision"] == "int8"


def test_external_data_is_confined_and_hashed_without_onnx(onnx_files, tmp_path):
    import onnx

    from exporters.graph import external_data_files, load_onnx, read_graph, uses_external_data
    from exporters.onnx import OnnxRuntimeEngine, engine_sha256

    folder = tmp_path / "ext"
    folder.mkdir()
    proto = onnx.load(str(onnx_files["fp32"]))
    path = folder / "model.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
                    size_threshold=0)
    lite, full = read_graph(path)[0], load_onnx(path)[0]
    assert uses_external_data(lite) and external_data_files(lite, path) == external_data_files(full, path) == \
           [("w.bin", (folder / "w.bin").resolve())]
    engine, reference = OnnxRuntimeEngine(path), OnnxRuntimeEngine(onnx_files["fp32"])
    x = torch.rand(4, 1, 16, 16)
    assert torch.equal(engine(x), reference(x))
    assert engine.sha256 == engine_sha256(path) != engine_sha256(onnx_files["fp32"])
    (folder / "w.bin").write_bytes((folder / "w.bin").read_bytes()[::-1])
    assert engine_sha256(path) != engine.sha256  # the data file's bytes count
    # a location outside the model's folder is refused by both readers, with the same message
    proto = onnx.load(str(onnx_files["fp32"]))
    for t in proto.graph.initializer:
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        t.external_data.add(key="location", value="../outside.bin")
    (tmp_path / "outside.bin").write_bytes(b"\0" * 1024)
    escaping = folder / "escaping.onnx"
    escaping.write_bytes(proto.SerializeToString())
    messages = []
    for read in (read_graph, load_onnx):
        with pytest.raises(UserError, match="outside the model's folder") as e:
            read(escaping)
        messages.append(str(e.value))
    assert messages[0] == messages[1]
    with pytest.raises(UserError, match="outside the model's folder"):
        OnnxRuntimeEngine(escaping)
    with pytest.raises(UserError, match="from its file, not from bytes"):
        read_graph(path.read_bytes())


def test_corrupt_and_truncated_files_are_refused_by_the_reader(onnx_files, tmp_path):
    from exporters.graph import load_onnx, read_graph
    from exporters.onnx import OnnxRuntimeEngine

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07this is not protobuf at all \xff\xfe" * 8)
    with pytest.raises(UserError, match="bad.onnx is not a valid ONNX file"):
        read_graph(bad)
    with pytest.raises(UserError, match="bad.onnx"):
        OnnxRuntimeEngine(bad)
    data = onnx_files["fp32"].read_bytes()
    for cut in (len(data) // 2, len(data) - 7, 3):
        short = tmp_path / f"cut{cut}.onnx"
        short.write_bytes(data[:cut])
        with pytest.raises(UserError, match=f"cut{cut}.onnx is not a valid ONNX file"):
            load_onnx(short)
        with pytest.raises(UserError, match=f"cut{cut}.onnx"):
            OnnxRuntimeEngine(short)
    with pytest.raises(UserError, match="not found|no such|missing"):
        OnnxRuntimeEngine(tmp_path / "missing.onnx")


def test_running_an_onnx_engine_imports_no_onnx(onnx_files):
    """Open, hash and run an .onnx engine, and take its precision census, in a fresh interpreter: no onnx (nor its
    ml_dtypes), and the logits are those of the engine opened here, where onnx is imported."""
    from exporters.engines import load_engine

    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    code = f"""
import sys, torch
from exporters.engines import load_engine
from exporters.graph import precision_census, read_graph
from exporters.onnx import engine_sha256
engine = load_engine({str(onnx_files['int8'])!r})
x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
print(repr(engine(x).tolist()), engine.sha256 == engine_sha256({str(onnx_files['int8'])!r}), engine.precision,
      precision_census(read_graph({str(onnx_files['int8'])!r})[0])["weights"]["int8_share"] > 0.9)
"""
    r = _python(code + "\nimport json\nprint(json.dumps(sorted(sys.modules)))")
    assert r.returncode == 0, r.stderr
    result, modules = r.stdout.strip().splitlines()[-2:]
    assert not _loaded(set(json.loads(modules)), "onnx", "ml_dtypes", "onnxscript", "sklearn", "scipy", "matplotlib")
    logits, same_sha, precision, int8 = result.rsplit(" ", 3)
    assert (same_sha, precision, int8) == ("True", "int8", "True")
    assert torch.equal(torch.tensor(eval(logits)), load_engine(onnx_files["int8"])(x))


def test_engine_run_cli_imports_no_onnx_and_no_matplotlib(onnx_files):
    """``otkit engine run`` on an .onnx file: engine, data, result, and no PNG, so no matplotlib."""
    code, modules, err = _cli_modules("engine", "run", str(onnx_files["bare"]), "--data", "digits", "--samples", "20")
    assert code == 0, err
    assert "onnxruntime" in modules and "torch" in modules
    assert not _loaded(modules, "onnx", "ml_dtypes", "sklearn", "scipy", "matplotlib", "jsonschema")


def test_onnx_package_is_lazy():
    modules = _modules_after("import exporters.onnx\nfrom exporters.onnx import engine_sha256, OnnxRuntimeEngine")
    assert not _loaded(modules, "onnx", "exporters.onnx.export", "exporters.onnx.write", "exporters.onnx.metadata")
    import exporters.onnx

    for name in exporters.onnx.__all__:
        assert getattr(exporters.onnx, name) is getattr(importlib.import_module(exporters.onnx._WHERE[name]), name)


# -------------------------------------------------------------------------------------------------------- matplotlib
def test_matplotlib_only_for_pngs():
    """The report, rendering, plotting, audit and pipeline modules import matplotlib only when they draw."""
    modules = _modules_after("import kit.cli, evaluators.report, evaluators.render, evaluators.plots, "
                             "evaluators.audit, evaluators.certificate, evaluators.pipeline")
    assert not _loaded(modules, "matplotlib", "PIL")
