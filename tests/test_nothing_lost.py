"""Nothing lost (issue 15, items 3, 4, 5, 9): a command that exits 2 changes nothing on disk; one process per output
(a lock naming its holder); an epoch's files committed together or not at all; an existing checkpoint is continued
or replaced only when asked; a run file or training options are checked whole before any work."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kit.cli import cli
from kit.defenses.trainer import TrainConfig, sidecar, train
from kit.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--arch", "cnn-small", "--data", "digits:8", "--epochs", "1", "--batch-size", "128", "--eval-samples", "50",
         "--eval-adv-samples", "0"]


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"defense": "standard", "arch": "cnn-small", "data": "digits:8", "epochs": 1,
                          "batch_size": 128, "eval_samples": 50, "eval_adv_samples": 0, **kw})


def invoke(*args: str):
    res = CliRunner().invoke(cli, ["-q", *map(str, args)])
    return res.exit_code, res.output


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(output: str, *words: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    for w in words:
        assert w in lines[0], output


@pytest.fixture(scope="module")
def twin_and_engine(tmp_path_factory):
    """A cnn-small trained one epoch on digits:8 and its fp32 ONNX export."""
    from exporters.checkpoint import export_checkpoint

    folder = tmp_path_factory.mktemp("nothing-lost")
    ckpt = train(cfg(), folder / "twin.safetensors").path
    engine = folder / "twin.onnx"
    export_checkpoint(ckpt, "onnx", engine, samples=32, calibration_samples=32)
    return ckpt, engine


def audit_args(twin_and_engine) -> list[str]:
    ckpt, engine = twin_and_engine
    return ["audit", "--engine", engine, "--twin", ckpt, "--attack", "pgd-linf@0.3", "--samples", "16",
            "--batch-size", "8", "--rungs", "2", "--blackbox-samples", "0"]


# ------------------------------------------------------------------------------------------ 3. exit 2 changes nothing
def test_resume_of_a_finished_audit_keeps_its_report(twin_and_engine, tmp_path):
    out = tmp_path / "report"
    code, output = invoke(*audit_args(twin_and_engine), "--out", out)
    assert code in (0, 1) and (out / "report.json").exists(), output
    before = snapshot(out)
    code, output = invoke(*audit_args(twin_and_engine), "--resume", "--out", out)
    assert code == 2 and snapshot(out) == before, output
    one_error_line(output, "nothing to resume", "complete")


def test_refused_audit_resume_into_a_new_folder_creates_nothing(twin_and_engine, tmp_path):
    code, output = invoke(*audit_args(twin_and_engine), "--resume", "--out", tmp_path / "new" / "report")
    assert code == 2
    one_error_line(output, "nothing to resume")
    assert not (tmp_path / "new" / "report").exists()


RUN = """
name = "tiny"
[train]
defense = "standard"
data = "digits:8"
epochs = 1
batch_size = 128
eval_samples = 50
eval_adv_samples = 0
[export]
formats = ["onnx"]
samples = 16
calibration_samples = 16
[audit]
attacks = ["pgd-linf@0.3"]
samples = 8
batch_size = 8
rungs = 2
blackbox_samples = 0
"""


def test_refused_run_resume_leaves_the_run_folder_as_it_was(tmp_path):
    """The training's resume check (options changed) comes before run-config.json is rewritten."""
    folder = tmp_path / "runs" / "tiny"
    folder.mkdir(parents=True)
    train(cfg(seed=0), folder / "model.safetensors")
    (folder / "run-config.json").write_text('{"old": true}')
    before = snapshot(folder)
    (tmp_path / "run.toml").write_text(RUN.replace("epochs = 1", "epochs = 1\nlr = 0.01"))
    code, output = invoke("run", tmp_path / "run.toml", "--out", tmp_path / "runs", "--resume")
    assert code == 2
    one_error_line(output, "cannot resume", "lr")
    assert snapshot(folder) == before


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    """A complete run (summary.json written last) has nothing to resume: --resume is refused, every file (the
    signatures of a signed run included) stays as it was; before, it redid every export and audit and removed the
    signatures it was not given the key for."""
    (tmp_path / "run.toml").write_text(RUN)
    code, output = invoke("run", tmp_path / "run.toml", "--out", tmp_path / "runs")
    assert code in (0, 1), output
    folder = tmp_path / "runs" / "tiny"
    assert (folder / "summary.json").exists()
    before = snapshot(folder)
    code, output = invoke("run", tmp_path / "run.toml", "--out", tmp_path / "runs", "--resume")
    assert code == 2
    one_error_line(output, "nothing to resume", "complete")
    assert snapshot(folder) == before


def test_run_resume_with_a_changed_audit_is_refused_before_any_work(tmp_path):
    state = tmp_path / "runs" / "tiny" / "audit" / "onnx" / ".audit-state"
    state.mkdir(parents=True)
    (state / "key.json").write_text(json.dumps({"attacks": [["pgd-linf", 0.3]], "batch_size": 8, "rungs": 99,
                                                "tol": None, "seed": 0}))
    before = snapshot(tmp_path / "runs")
    (tmp_path / "run.toml").write_text(RUN)
    code, output = invoke("run", tmp_path / "run.toml", "--out", tmp_path / "runs", "--resume")
    assert code == 2
    one_error_line(output, "cannot resume the audit", "rungs")
    assert snapshot(tmp_path / "runs") == before
    assert not (tmp_path / "runs" / "tiny" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------------- 4. locks
HOLD = """
import sys
from kit.io import {fn}
with {fn}(sys.argv[1], command="otkit holder --for the test"):
    print("held", flush=True)
    sys.stdin.read()
"""


class Holder:
    """Another process holding ``path`` with ``kit.io.folder_lock`` or ``file_lock`` until closed."""

    def __init__(self, fn: str, path: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD.format(fn=fn), str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        assert self.proc.stdout.readline().strip() == "held"

    def close(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


def in_use(output: str, path: Path, holder: Holder, option: str) -> None:
    one_error_line(output, f"{path} is in use by another otkit process (pid {holder.proc.pid}, "
                           '"otkit holder --for the test", since ', f"wait for it or choose another {option}")


def test_second_audit_into_a_held_folder_exits_2_naming_the_holder(twin_and_engine, tmp_path):
    out = tmp_path / "report"
    code, _ = invoke(*audit_args(twin_and_engine), "--out", out)
    assert (out / "report.json").exists()
    before = snapshot(out)
    holder = Holder("folder_lock", out)
    try:
        for extra in ([], ["--resume"]):
            code, output = invoke(*audit_args(twin_and_engine), *extra, "--out", out)
            assert code == 2
            in_use(output, out, holder, "--out")
    finally:
        holder.close()
    after = snapshot(out)
    assert after == before  # the holder's lock and record went with it
    code, output = invoke(*audit_args(twin_and_engine), "--out", out)  # released: the folder is free again
    assert code in (0, 1), output


def test_train_and_run_are_locked_too(tmp_path):
    out = tmp_path / "m.safetensors"
    holder = Holder("file_lock", out)
    try:
        code, output = invoke("train", *TRAIN, "--out", out)
        assert code == 2
        in_use(output, out, holder, "--out")
        assert not out.exists()
    finally:
        holder.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the holder wrote nothing: its lock file went too

    folder = tmp_path / "runs" / "tiny"
    (tmp_path / "run.toml").write_text(RUN)
    holder = Holder("folder_lock", folder)
    try:
        code, output = invoke("run", tmp_path / "run.toml", "--out", tmp_path / "runs")
        assert code == 2
        in_use(output, folder, holder, "--name or --out")
    finally:
        holder.close()
    assert not (folder / "run-config.json").exists()


def test_folder_lock_in_one_process(tmp_path):
    from kit.io import folder_lock

    with folder_lock(tmp_path / "a", command="otkit x") as p:
        record = json.loads((p / ".otkit.lock.holder").read_text())
        assert record["pid"] == os.getpid() and record["command"] == "otkit x" and "started" in record
        (p / "kept.txt").write_text("x")
    assert sorted(q.name for q in (tmp_path / "a").iterdir()) == ["kept.txt"]  # lock and record gone with it
    with pytest.raises(UserError, match="boom"):
        with folder_lock(tmp_path / "b"):
            raise UserError("boom")
    assert not (tmp_path / "b").exists()  # created here, left empty: removed again
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="not a folder"):
        with folder_lock(tmp_path / "f"):
            pass


# ------------------------------------------------------------------------------- 5. an epoch's files, all or nothing
def fail_resume_state_at(monkeypatch, epoch: int) -> None:
    """The writer of the resume state (torch.save of the state dict) hits a full disk at ``epoch``."""
    real, calls = torch.save, []

    def full_disk(obj, f, *a, **k):
        if isinstance(obj, dict) and "optimizer" in obj:
            calls.append(obj["epoch"])
            if obj["epoch"] == epoch:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)


def test_full_disk_in_epoch_1_leaves_nothing(tmp_path, monkeypatch):
    fail_resume_state_at(monkeypatch, 1)
    with pytest.raises(UserError, match=r"cannot write .*m\.resume\.pt: No space left on device"):
        train(cfg(), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_in_epoch_2_leaves_epoch_1s_files(tmp_path, monkeypatch):
    from kit.checkpoint import read_checkpoint

    out = tmp_path / "m.safetensors"
    fail_resume_state_at(monkeypatch, 2)
    with pytest.raises(UserError, match="cannot write"):
        train(cfg(epochs=2), out)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["m.config.json", "m.metrics.jsonl", "m.resume.pt", "m.safetensors"]  # no temporaries
    assert read_checkpoint(out)[1].train_config["epochs_done"] == 1
    state = torch.load(sidecar(out, "resume.pt"), weights_only=True)
    assert state["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in sidecar(out, "metrics.jsonl").read_text().splitlines()] == [1]
    monkeypatch.undo()
    resumed = train(cfg(epochs=2), out, resume=True)  # the set is consistent: it resumes
    assert [r["epoch"] for r in resumed.history] == [1, 2]


def test_full_disk_from_the_cli_is_one_error_line(tmp_path, monkeypatch):
    fail_resume_state_at(monkeypatch, 1)
    out = tmp_path / "m.safetensors"
    code, output = invoke("train", *TRAIN, "--out", out)
    assert code == 2
    one_error_line(output, "cannot write", "m.resume.pt", "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_existing_checkpoint_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "m.safetensors"
    assert invoke("train", *TRAIN, "--out", out)[0] == 0
    before = snapshot(tmp_path)
    code, output = invoke("train", *TRAIN, "--seed", "5", "--out", out)
    assert code == 2
    one_error_line(output, str(out), "already exists", "--resume", "--overwrite")
    assert snapshot(tmp_path) == before
    code, output = invoke("train", *TRAIN, "--seed", "5", "--overwrite", "--out", out)
    assert code == 0, output
    after = snapshot(tmp_path)
    assert after["m.safetensors"] != before["m.safetensors"]
    assert json.loads(sidecar(out, "config.json").read_text())["seed"] == 5
    code, output = invoke("train", *TRAIN, "--resume", "--overwrite", "--out", out)
    assert code == 2 and "exclude each other" in output
    with pytest.raises(UserError, match="already exists"):  # the library says the same
        train(cfg(), out)


# ------------------------------------------------------------------------------- 9. the whole configuration first
def test_run_file_with_an_unknown_defense_param_is_refused_before_any_work(tmp_path):
    (tmp_path / "run.toml").write_text(RUN + "[train.defense_params]\nbogus = 1\n")
    code, output = invoke("run", tmp_path / "run.toml", "--out", tmp_path / "runs")
    assert code == 2
    one_error_line(output, "bogus", "standard")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("extra,message", [
    ('[train.defense_params]\neps = 0.1\n', "no parameter"),  # the default's sat params do not fit standard
    ('[audit.gates]\n"fmn-l2" = 0.2\n', "neither an audited attack"),
    ('', None),
])
def test_run_file_checks(tmp_path, extra, message):
    (tmp_path / "run.toml").write_text(RUN + extra)
    code, output = invoke("run", tmp_path / "run.toml", "--print-config")
    if message is None:
        assert code == 0 and json.loads(output)["train"]["defense_params"] == {}, output
    else:
        assert code == 2
        one_error_line(output, message)


def test_an_empty_run_file_is_the_embedded_default(tmp_path):
    (tmp_path / "empty.toml").write_text("")
    code, with_file = invoke("run", tmp_path / "empty.toml", "--print-config")
    assert code == 0, with_file
    code, without = invoke("run", "--print-config")
    assert code == 0 and json.loads(with_file) == json.loads(without)
    (tmp_path / "sat.toml").write_text("[train.defense_params]\nsteps = 3\n")  # one key changed, the rest kept
    doc = json.loads(invoke("run", tmp_path / "sat.toml", "--print-config")[1])
    assert doc["train"]["defense"] == "sat" and doc["train"]["defense_params"] == {"steps": 3}
    (tmp_path / "e.toml").write_text("[train]\nepochs = 2\n")
    doc = json.loads(invoke("run", tmp_path / "e.toml", "--print-config")[1])
    assert doc["train"]["epochs"] == 2 and doc["train"]["defense_params"] == json.loads(without)["train"][
        "defense_params"] and doc["audit"] == json.loads(without)["audit"]


def test_train_with_an_unknown_param_writes_nothing(tmp_path):
    out = tmp_path / "sub" / "m.safetensors"
    code, output = invoke("train", *TRAIN, "--param", "unknown=1", "--out", out)
    assert code == 2
    one_error_line(output, "unknown")
    (tmp_path / "c.toml").write_text(textwrap.dedent("""
        [train]
        defense = "madry"
        [train.defense_params]
        epz = 0.1
    """))
    code, output = invoke("train", *TRAIN, "--config", tmp_path / "c.toml", "--out", out)
    assert code == 2
    one_error_line(output, "epz", "madry")
    assert [p.name for p in tmp_path.iterdir()] == ["c.toml"]
