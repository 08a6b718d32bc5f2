"""Opening a checkpoint never runs code the user did not name in that call, and its hash covers metadata and weights.

Every architecture file below creates a marker file when imported: the marker is the proof that code ran. A
checkpoint whose architecture is a Python file is opened only with ``--arch FILE.py:NAME`` given on the command line,
matching the record's callable name and sha256 (checked before the import); nothing a checkpoint's metadata names is
imported otherwise, whatever path it holds. ``checkpoint_sha256`` covers the metadata and the weights together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from kit.checkpoint import CheckpointInfo, load_twin, read_checkpoint, save_checkpoint
from kit.errors import UserError
from tests.clitools import assert_user_error, run

DATA = "digits:8"
SHAPE = (1, 8, 8)

ARCH_SOURCE = '''
from pathlib import Path

import torch.nn as nn

Path({marker!r}).write_text("ran")  # importing this file is running code: the tests look for this marker


class Net(nn.Module):
    def __init__(self, num_classes, input_shape, hidden=16):
        super().__init__()
        c, h, w = input_shape
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.body(x)
'''


class _Net(nn.Module):
    """The same network as ARCH_SOURCE's, built here so that writing a checkpoint imports nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_arch(path: Path, marker: Path, extra: str = "") -> Path:
    path.write_text(ARCH_SOURCE.format(marker=str(marker)) + extra)
    return path


def _save(path: Path, spec: str, file_sha256: str) -> CheckpointInfo:
    """A file-architecture checkpoint written with the kit's own save_checkpoint (so its hashes are consistent)."""
    torch.manual_seed(0)
    record = {"kind": "file", "spec": spec, "file_sha256": file_sha256, "num_classes": 10,
              "input_shape": list(SHAPE), "kwargs": {}}
    info = CheckpointInfo(arch=record, num_classes=10, class_names=[str(i) for i in range(10)],
                          input_shape=list(SHAPE), normalization={"mean": None, "std": None},
                          dataset={"spec": DATA})
    return save_checkpoint(_Net().eval(), path, info)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A checkpoint folder with an honest architecture file beside the checkpoint, and a marker path; the tests run
    from another folder (a relative spec never resolves to the checkpoint's folder by accident)."""
    ck_dir, work, out = tmp_path / "ck", tmp_path / "work", tmp_path / "out"
    for d in (ck_dir, work, out):
        d.mkdir()
    monkeypatch.chdir(work)
    marker = tmp_path / "MARKER"
    arch = _write_arch(ck_dir / "net.py", marker)
    ckpt = ck_dir / "m.safetensors"
    _save(ckpt, "net.py:Net", _sha(arch))
    assert not marker.exists()
    return {"tmp": tmp_path, "ckpt": ckpt, "arch": arch, "marker": marker, "out": out}


def _commands(ckpt: Path, out: Path, arch: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Every command that builds the twin from a checkpoint, with ``arch`` (``("--arch", SPEC)``) when given."""
    return {
        "export": ["export", ckpt, "--data", DATA, "--samples", "16", "--out", out / "m.onnx", *arch],
        "engine run": ["engine", "run", ckpt, "--data", DATA, "--samples", "16", *arch],
        "engine run --twin": ["engine", "run", ckpt, "--data", DATA, "--samples", "16", "--twin", ckpt, *arch],
        "audit": ["audit", "--engine", ckpt, "--twin", ckpt, "--data", DATA, "--attack", "pgd-linf@0.3", "--samples",
                  "4", "--blackbox-samples", "0", "--rungs", "2", "--allow-flag", "test-blind", "--out", out / "audit",
                  *arch],
        "evaluate": ["evaluate", "--model", ckpt, "--data", DATA, "--attack", "pgd-linf@0.3", "--samples", "4",
                     "--rungs", "2", "--out", out / "eval", *arch],
    }


# ------------------------------------------------------------------------------- (a) a tampered spec is never imported
@pytest.mark.parametrize("where", ["absolute path", "beside the checkpoint"])
def test_metadata_naming_another_file_never_imports_it(env, where):
    """An attacker rewrites the spec (and recomputes every hash: they are not signatures) to point at a file of
    theirs: no command imports it, each refuses in one line naming --arch."""
    tmp, marker = env["tmp"], env["marker"]
    if where == "absolute path":
        (tmp / "elsewhere").mkdir()
        evil = _write_arch(tmp / "elsewhere" / "evil.py", marker)
        spec = f"{evil}:Net"
    else:
        evil = _write_arch(env["ckpt"].parent / "beside.py", marker)
        spec = "beside.py:Net"
    bad = env["ckpt"].parent / "evil.safetensors"
    _save(bad, spec, _sha(evil))
    for name, args in _commands(bad, env["out"]).items():
        line = assert_user_error(run(*args), "--arch", "runs its code")
        assert not marker.exists(), f"{name} imported the file the metadata names ({line})"
        assert f"--arch {spec}" not in line  # the attacker's path is never offered as advice to copy
    with pytest.raises(UserError, match="--arch"):
        load_twin(bad)
    assert not marker.exists()


@pytest.fixture
def zoo_report(env):
    """A report with adversarials from an audit of a zoo checkpoint of the same input shape (no user code at all)."""
    import models

    zoo = env["tmp"] / "zoo.safetensors"
    model = models.create("cnn-small", num_classes=10, input_shape=SHAPE)
    save_checkpoint(model, zoo, CheckpointInfo(arch={"kind": "zoo", "config": model.config}, num_classes=10,
                                               class_names=[str(i) for i in range(10)], input_shape=list(SHAPE),
                                               normalization={"mean": None, "std": None}, dataset={"spec": DATA}))
    r = run(*_commands(zoo, env["out"])["audit"])
    assert r.exit_code in (0, 1), r.output
    assert not env["marker"].exists()
    return env["out"] / "audit" / "report.json"  # the audit report's engine and twin: out/../zoo.safetensors


def test_verify_recheck_of_a_tampered_checkpoint_engine_never_imports(env, zoo_report):
    """verify --recheck runs the engine: a checkpoint engine naming a file is refused before anything is imported."""
    marker = env["marker"]
    evil = _write_arch(env["tmp"] / "evil.py", marker)
    bad = env["ckpt"].parent / "evil.safetensors"
    _save(bad, f"{evil}:Net", _sha(evil))
    assert_user_error(run("verify", zoo_report, "--engine", bad, "--recheck", "2"), "--arch")
    assert not marker.exists()


# ------------------------------------------------------------------- (b) an honest file checkpoint needs --arch given
def test_file_checkpoint_without_arch_is_refused_and_says_how_to_trust_it(env):
    ckpt, marker = env["ckpt"], env["marker"]
    for name, args in _commands(ckpt, env["out"]).items():
        line = assert_user_error(run(*args), str(ckpt), "net.py:Net", "--arch PATH/TO/FILE.py:Net", _sha(env["arch"]))
        assert not marker.exists(), f"{name} imported the architecture without --arch ({line})"


def test_verify_recheck_without_arch_is_refused(env, zoo_report):
    assert_user_error(run("verify", zoo_report, "--engine", env["ckpt"], "--recheck", "2"), "--arch PATH/TO/FILE.py:Net")
    assert not env["marker"].exists()
    zoo = env["tmp"] / "zoo.safetensors"  # a zoo architecture runs no user code: it needs no --arch
    r = run("verify", zoo_report, "--engine", zoo, "--twin", zoo, "--recheck", "2")
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------ (c) a modified file is refused before its import
def test_arch_file_that_changed_is_refused_before_import(env):
    ckpt, marker = env["ckpt"], env["marker"]
    changed = _write_arch(env["tmp"] / "net.py", marker, extra="\n# one more line\n")
    for name, args in _commands(ckpt, env["out"], ("--arch", f"{changed}:Net")).items():
        line = assert_user_error(run(*args), "sha256", _sha(env["arch"]))
        assert not marker.exists(), f"{name} imported a file whose sha256 differs ({line})"


def test_arch_with_another_callable_name_is_refused(env):
    line = assert_user_error(run(*_commands(env["ckpt"], env["out"], ("--arch", f"{env['arch']}:Other"))["evaluate"]),
                             ":Net")
    assert "Other" in line and not env["marker"].exists()
    with pytest.raises(UserError, match="does not match"):
        load_twin(env["ckpt"], arch=f"{env['arch']}:Other")
    with pytest.raises(UserError, match="does not match"):
        load_twin(env["ckpt"], arch="cnn-small")
    assert not env["marker"].exists()


# ------------------------------------------------------------------------------- (d) the right --arch works everywhere
@pytest.fixture
def audited(env):
    """An audit of the file checkpoint against itself, run with the right --arch: (report path)."""
    r = run(*_commands(env["ckpt"], env["out"], ("--arch", f"{env['arch']}:Net"))["audit"])
    assert r.exit_code == 0, r.output
    return {"report": env["out"] / "audit" / "report.json"}


def test_right_arch_works_for_every_command(env, audited):
    ckpt, marker, arch = env["ckpt"], env["marker"], ("--arch", f"{env['arch']}:Net")
    assert marker.exists()  # the audit fixture imported the named file: code runs only when named
    for name, args in _commands(ckpt, env["out"], arch).items():
        if name == "audit":
            continue  # done by the fixture
        marker.unlink()
        r = run(*args)
        assert r.exit_code == 0, (name, r.output)
        assert marker.exists(), name
    assert (env["out"] / "m.onnx").is_file() and (env["out"] / "eval" / "curves.json").is_file()
    r = run("verify", audited["report"], "--engine", ckpt, "--twin", ckpt, "--recheck", "2", *arch)
    assert r.exit_code == 0, r.output
    twin, info = load_twin(ckpt, arch=f"{env['arch']}:Net")
    assert info.arch["spec"] == "net.py:Net" and not twin.training


def test_train_and_resume_with_a_file_arch(tmp_path, monkeypatch):
    """``otkit train --arch FILE`` names the file itself (training and --resume import it); the checkpoint it writes
    then needs that --arch again to be opened."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    _write_arch(tmp_path / "net.py", marker)
    common = ["train", "--arch", "net.py:Net", "--data", DATA, "--batch-size", "256", "--eval-samples", "50",
              "--eval-adv-samples", "0", "--out", "m.safetensors"]
    r = run(*common, "--epochs", "1")
    assert r.exit_code == 0, r.output
    r = run(*common, "--epochs", "2", "--resume")
    assert r.exit_code == 0, r.output
    _, info = read_checkpoint(tmp_path / "m.safetensors")
    assert info.train_config["epochs_done"] == 2 and info.checkpoint_sha256.startswith("sha256:")
    marker.unlink()
    assert_user_error(run("engine", "run", "m.safetensors", "--data", DATA, "--samples", "16"), "--arch PATH/TO/FILE.py:Net")
    assert not marker.exists()
    r = run("engine", "run", "m.safetensors", "--data", DATA, "--samples", "16", "--arch", "net.py:Net")
    assert r.exit_code == 0, r.output


def test_run_pipeline_passes_the_run_files_arch(tmp_path, monkeypatch):
    """``otkit run``: the run file's [train] arch was named by the user; the pipeline names it again to reload its own
    checkpoint for the export and the audit (and the checkpoint it leaves needs --arch like any other)."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    _write_arch(tmp_path / "net.py", marker)
    (tmp_path / "run.toml").write_text(f"""
name = "filearch"
[train]
defense = "standard"
arch = "net.py:Net"
data = "{DATA}"
epochs = 1
batch_size = 256
eval_samples = 50
eval_adv_samples = 0
[export]
formats = ["onnx"]
samples = 16
[audit]
attacks = ["pgd-linf@0.3"]
samples = 4
batch_size = 4
rungs = 2
blackbox_samples = 0
""")
    r = run("--quiet", "run", "run.toml", "--out", "runs")
    assert r.exit_code in (0, 1), r.output
    summary = json.loads((tmp_path / "runs" / "filearch" / "summary.json").read_text())
    assert [a["format"] for a in summary["artifacts"]] == ["onnx"] and summary["artifacts"][0]["verdict"]
    marker.unlink()
    assert_user_error(run("export", "runs/filearch/model.safetensors", "--out", "x.onnx"), "--arch PATH/TO/FILE.py:Net")
    assert not marker.exists()


# -------------------------------------------------------------------- (e) metadata edits are caught by read_checkpoint
def _edit_metadata(path: Path, out: Path, edit) -> None:
    """Rewrite the otkit metadata record of a .safetensors file, weights untouched."""
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    record = json.loads(header["__metadata__"]["otkit"])
    edit(record)
    header["__metadata__"]["otkit"] = json.dumps(record, sort_keys=True)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    out.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n:])


@pytest.mark.parametrize("edit", [
    lambda r: r.update(class_names=[f"c{i}" for i in range(10)]),
    lambda r: r.update(normalization={"mean": [0.5], "std": [0.1]}),
    lambda r: r["arch"].update(spec="/tmp/evil.py:Net"),
    lambda r: r["dataset"].update(spec="mnist"),
], ids=["class names", "normalisation", "arch spec", "dataset"])
def test_metadata_edit_is_refused(env, edit):
    bad = env["tmp"] / "edited.safetensors"
    _edit_metadata(env["ckpt"], bad, edit)
    with pytest.raises(UserError, match="metadata or weights modified"):
        read_checkpoint(bad)
    assert_user_error(run("models", "show", bad), "metadata or weights modified")
    assert_user_error(run("evaluate", "--model", bad, "--data", DATA, "--attack", "pgd-linf@0.3", "--out",
                          env["out"], "--arch", f"{env['arch']}:Net"), "metadata or weights modified")
    assert not env["marker"].exists()


def test_checkpoint_sha256_covers_metadata_and_weights(env):
    from kit.checkpoint import checkpoint_sha256

    _, info = read_checkpoint(env["ckpt"])
    record = json.loads(json.dumps(info.to_dict()))
    assert info.format == "otkit.checkpoint/2" and info.weights_sha256.startswith("sha256:")
    assert info.checkpoint_sha256 == checkpoint_sha256(record, info.weights_sha256)
    assert checkpoint_sha256({**record, "defense": "trades"}, info.weights_sha256) != info.checkpoint_sha256
    assert checkpoint_sha256(record, "sha256:" + "0" * 64) != info.checkpoint_sha256


def test_checkpoint_from_before_the_metadata_hash_loads_with_a_warning(env, caplog):
    old = env["tmp"] / "old.safetensors"

    def legacy(r):
        r.pop("checkpoint_sha256")
        r["format"] = "otkit.checkpoint/1"

    _edit_metadata(env["ckpt"], old, legacy)
    with caplog.at_level(logging.WARNING, logger="kit.checkpoint"):
        _, info = read_checkpoint(old)
    assert info.format == "otkit.checkpoint/1"
    assert any("checkpoint_sha256" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError, match="--arch"):  # the import gate holds for old checkpoints too
        load_twin(old)
    assert not env["marker"].exists()
