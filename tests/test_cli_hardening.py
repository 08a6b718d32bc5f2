"""Issue 15, items 6-8 and 11-13: every failure is one line with its documented exit status, Ctrl-C is 130 with how
to resume, nonsense values are refused or stated, one name and one place per option, progress inside long work."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kit.runtime as runtime
from tests.clitools import assert_user_error
from tests.clitools import run as invoke

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def onnx_engine(digits_model, tmp_path_factory):
    """(twin checkpoint, its fp32 ONNX export)."""
    from exporters.onnx import torch_to_onnx, write_onnx_export
    from kit.checkpoint import load_twin
    from kit.data import load_dataset

    path, _ = digits_model
    model, info = load_twin(path)
    test = load_dataset("digits:16", "test").subset(16, seed=0)
    out = tmp_path_factory.mktemp("engine") / "m.onnx"
    graph = torch_to_onnx(model, info.input_shape, dynamo=False)
    return path, write_onnx_export(graph, out, model, test.x, info=info, parity_y=test.y).path


# ----------------------------------------------------------------------------------------------- 8. usage: one line
@pytest.mark.parametrize("args, needle", [
    (["audit", "--bogus"], "No such option '--bogus'"),
    (["audit"], "Missing option '--engine'"),
    (["nosuchcommand"], "No such command"),
    (["train", "--epochs", "0", "--out", "x.safetensors"], "--epochs"),
    (["data", "inspect"], "Missing argument"),
])
def test_usage_errors_are_one_line_exit_2(args, needle):
    line = assert_user_error(invoke(*args))
    assert needle in line and "--help" in line  # where to look next, in the same line
    assert not line.startswith("Usage")


@pytest.mark.parametrize("device", ["gpu", "cuda:1x", "mps", ""])
def test_a_misspelt_device_is_refused_by_every_command(device):
    """Checked where the option is read, so that a command that runs no model (info) refuses it too."""
    line = assert_user_error(invoke("--device", device, "info"))
    assert line == f"Error: unknown device {device!r}: use auto, cpu, cuda or cuda:N"


def test_refused_pickle_does_not_quote_torchs_unsafe_advice(tmp_path):
    evil = tmp_path / "evil.pt"
    import torch

    torch.save({"state_dict": {"w": torch.zeros(1)}, "otkit": {"x": print}}, evil)  # a pickle naming a callable
    line = assert_user_error(invoke("models", "show", evil))
    assert "refusing to load" in line
    for advice in ("weights_only=False", "weights_only` to `False", "trusted source", "unsafe"):
        assert advice not in line


# ------------------------------------------------------------------------------------- 6. write failures: one line
def test_write_failure_is_one_line_exit_2(digits_model, tmp_path, monkeypatch):
    import evaluators.evaluate as E

    def full_disk(doc, out, title=""):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(out) / "curves.json"))

    monkeypatch.setattr(E, "write_outputs", full_disk)
    path, _ = digits_model
    line = assert_user_error(invoke("-q", "evaluate", "--twin", path, "--attack", "pgd-linf@0.1", "--samples", "8",
                                 "--out", tmp_path / "ev"))
    assert line == f"Error: cannot write {tmp_path / 'ev' / 'curves.json'}: No space left on device"


def test_unreadable_output_folder_is_one_line(digits_model, tmp_path):
    path, _ = digits_model
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a folder is needed: a real OSError from the system, not a simulation
    line = assert_user_error(invoke("-q", "evaluate", "--twin", path, "--attack", "pgd-linf@0.1", "--samples", "8",
                                 "--out", blocker / "sub"))
    assert str(blocker) in line


# ------------------------------------------------------------------------------------------------ 7. Ctrl-C: 130
def test_interrupted_audit_exits_130_with_how_to_resume(onnx_engine, tmp_path, monkeypatch):
    import evaluators.audit as A

    path, onnx = onnx_engine

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "twin_guided_search", ctrl_c)
    out = tmp_path / "audit"
    r = invoke("-q", "audit", "--engine", onnx, "--twin", path, "--attack", "pgd-linf@0.1", "--samples", "8",
               "--blackbox-samples", "0", "--out", out)
    assert r.exit_code == 130, r.output
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("Interrupted") and "--resume" in last and str(out) in last
    assert "Aborted" not in r.output and "Traceback" not in r.output


def test_sigint_during_training_exits_130(tmp_path):
    """A real Ctrl-C (SIGINT) to a real process: exit status 130, one line saying how to resume, and the finished
    epoch's checkpoint resumable."""
    out = tmp_path / "m.safetensors"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kit", "train", "--data", "digits:8", "--epochs", "200",
                             "--batch-size", "16", "--eval-adv-samples", "0", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            # a suite started in the background (``cmd &`` in a script) inherits SIGINT ignored, and
                            # Python then never raises KeyboardInterrupt: give the child the default disposition
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if line.startswith("epoch"):
                break
        else:
            pytest.fail("training printed no epoch line")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    tail = err.strip().splitlines()[-1]
    assert tail.startswith("Interrupted") and "--resume" in tail
    assert "Traceback" not in err and "Aborted" not in err
    assert out.exists()


# ------------------------------------------------------------------------------------------ 11. nonsense refused
@pytest.mark.parametrize("attack, needle", [
    ("pgd-linf@1e9", "beyond 1"),
    ("pgd-linf@1.5", "beyond 1"),
    ("pgd-l2@100", "beyond 16"),  # sqrt(1*16*16) = 16 for digits:16
    ("wasserstein-pgd@50", "beyond 21.21"),  # the 16x16 image's diagonal
])
def test_radius_beyond_the_image_box_is_refused(digits_model, tmp_path, attack, needle):
    path, _ = digits_model
    line = assert_user_error(invoke("-q", "evaluate", "--twin", path, "--attack", attack, "--samples", "4",
                                 "--out", tmp_path / "ev"))
    assert needle in line
    assert not (tmp_path / "ev").exists()


def test_largest_radius_closed_forms():
    import math

    from evaluators.evaluate import largest_radius
    from kit.attacks.base import Norm

    assert largest_radius(Norm.LINF, (3, 32, 32)) == 1.0
    assert largest_radius(Norm.L2, (3, 32, 32)) == pytest.approx(math.sqrt(3 * 32 * 32))
    assert largest_radius(Norm.WASSERSTEIN, (1, 28, 28)) == pytest.approx(27 * math.sqrt(2))


def test_more_samples_than_data_is_stated(digits_model, tmp_path, caplog):
    path, _ = digits_model
    r = invoke("evaluate", "--twin", path, "--attack", "pgd-linf@0.1", "--samples", "100000", "--rungs", "1",
               "--no-checks", "--batch-size", "512", "--json", "--out", tmp_path / "ev")
    assert r.exit_code == 0, r.output
    n = json.loads(r.stdout)["data"]["n"]
    assert n < 100000
    said = r.stderr + caplog.text  # the CLI logs to stderr; under pytest the log capture takes it first
    assert "100000 examples requested" in said and f"using all {n}" in said
    # with --json the status line is still on stderr (the JSON alone on stdout), as for every command
    assert f"wrote {tmp_path / 'ev' / 'curves.json'} and {tmp_path / 'ev' / 'curves.png'}" in r.stderr


# --------------------------------------------------------------------------------- 12. one name, one place
def test_seed_after_the_command_equals_the_old_global_seed(digits_model, tmp_path):
    path, _ = digits_model
    common = ["--twin", path, "--attack", "pgd-linf@0.2", "--samples", "12", "--rungs", "2", "--no-checks", "--json"]
    a = invoke("-q", "evaluate", *common, "--seed", "7", "--out", tmp_path / "a")
    b = invoke("-q", "--seed", "7", "evaluate", *common, "--out", tmp_path / "b")
    c = invoke("-q", "evaluate", *common, "--out", tmp_path / "c")
    assert a.exit_code == b.exit_code == c.exit_code == 0, (a.output, b.output, c.output)
    ea, eb, ec = (json.loads(r.stdout)["attacks"][0]["eps_star"] for r in (a, b, c))
    assert ea == eb and ea != ec  # the subset of 12 differs with the seed


def test_seed_is_an_option_of_every_seeded_command():
    for cmd in (["audit"], ["evaluate"], ["train"], ["export"], ["run"], ["engine", "run"], ["data", "inspect"]):
        assert "--seed" in invoke(*cmd, "--help").output, cmd
    assert "--seed" not in invoke("--help").output  # the global spelling still works, hidden


def test_evaluate_takes_twin_like_audit_and_defaults_to_the_checkpoints_data(digits_model, tmp_path):
    path, _ = digits_model
    help_text = invoke("evaluate", "--help").output
    assert "--twin" in help_text and "--model" not in help_text
    fast = ["--attack", "pgd-linf@0.1", "--samples", "8", "--rungs", "2", "--no-checks", "--json"]
    r = invoke("-q", "evaluate", "--twin", path, *fast, "--out", tmp_path / "a")
    old = invoke("-q", "evaluate", "--model", path, *fast, "--out", tmp_path / "b")
    assert r.exit_code == old.exit_code == 0, (r.output, old.output)
    da, db = json.loads(r.stdout), json.loads(old.stdout)
    assert da["data"]["spec"] == "digits:16"  # the checkpoint's dataset, not 8x8 digits
    assert da["attacks"][0]["eps_star"] == db["attacks"][0]["eps_star"]


def test_train_prints_text_and_json_on_request(tmp_path):
    args = ["-q", "train", "--data", "digits:8", "--epochs", "1", "--eval-adv-samples", "0"]
    text = invoke(*args, "--out", tmp_path / "a.safetensors")
    as_json = invoke(*args, "--json", "--out", tmp_path / "b.safetensors")
    assert text.exit_code == as_json.exit_code == 0, (text.output, as_json.output)
    assert "held-out accuracy" in text.stdout and not text.stdout.lstrip().startswith("{")
    doc = json.loads(as_json.stdout)
    assert doc["epochs"] == 1 and doc["weights_sha256"].startswith("sha256:")


# ------------------------------------------------------------------------------------------------ 13. progress
class _Recorder:
    """Stands in for kit.runtime.open_bar: records every bar and every position it was moved to."""

    def __init__(self):
        self.bars: dict[str, list[float]] = {}

    def __call__(self, desc, total, unit="it"):
        return _RecordingBar(self.bars.setdefault(desc, []))


class _RecordingBar(runtime.ProgressBar):
    def __init__(self, positions: list):
        super().__init__()
        self.positions, self.n = positions, 0.0

    def set(self, value):
        self.n = value
        self.positions.append(value)

    def advance(self, k=1):
        self.set(self.n + k)

    def close(self):
        self.positions.append("closed")


def test_audit_progress_moves_inside_a_batch_and_in_every_phase(onnx_engine, tmp_path, monkeypatch):
    import evaluators.audit as A

    path, onnx = onnx_engine
    rec = _Recorder()
    monkeypatch.setattr(A, "open_bar", rec)
    monkeypatch.setattr(runtime, "open_bar", rec)  # progress_bar() resolves it here
    r = invoke("-q", "audit", "--engine", onnx, "--twin", path, "--attack", "pgd-linf@0.2", "--samples", "16",
               "--batch-size", "16", "--rungs", "4", "--blackbox-samples", "8", "--out", tmp_path / "audit")
    assert r.exit_code in (0, 1), r.output
    sweep = [v for v in rec.bars["pgd-linf"] if v != "closed"]
    # one batch of 16 examples: the bar still moves many times, through fractional positions, inside it
    inside = [v for v in sweep if 0 < v < 16]
    assert len(inside) >= 4 and any(v != int(v) for v in inside)
    assert sweep == sorted(sweep)  # never moves backwards
    assert {"clean: twin", "clean: engine"} <= rec.bars.keys()
    bb = [v for v in rec.bars["black box: square-linf, engine and twin"] if v != "closed"]
    assert len(bb) > 10  # a tick per Square run: on each side, the run at eps_max and every bisection step


def test_progress_is_off_without_a_terminal(capsys):
    runtime.set_quiet(False)
    bar = runtime.open_bar("x", 10)
    bar.set(5)
    bar.close()
    assert capsys.readouterr().err == ""  # pytest's captured stderr is no terminal


# ------------------------------------------------------------------------------- 9. parameter kinds before work
@pytest.mark.parametrize("param, needle", [("eps=x", "must be a number"), ("steps=2.5", "must be an integer"),
                                           ("attack_eval_mode=3", "true or false")])
def test_defense_parameter_of_the_wrong_kind_is_refused_before_any_work(tmp_path, param, needle):
    out = tmp_path / "sub" / "m.safetensors"
    line = assert_user_error(invoke("train", "--defense", "madry", "--param", param, "--data", "digits:8",
                                 "--epochs", "1", "--out", out))
    assert needle in line and not (tmp_path / "sub").exists()


def test_ctrl_c_before_the_first_epoch_gives_no_resume_hint(tmp_path, monkeypatch):
    import kit.defenses.trainer as T

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "build_model", ctrl_c)  # interrupted while setting up: nothing saved yet
    out = tmp_path / "m.safetensors"
    r = invoke("-q", "train", "--data", "digits:8", "--epochs", "1", "--out", out)
    assert r.exit_code == 130, r.output
    assert r.stderr.strip().splitlines()[-1] == "Interrupted"  # no advice to --resume what does not exist
    assert not out.exists()


@pytest.mark.parametrize("table, needle", [("bogus = 1", "has no option(s) bogus"),
                                           ('mean = "x"', "mean must be a number or a list of numbers"),
                                           ("std = [0.0]", "std must be positive")])
def test_run_file_arch_options_are_checked_before_any_work(tmp_path, monkeypatch, table, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.toml").write_text(f'[train]\ndata = "digits:8"\nepochs = 1\n[train.arch_kwargs]\n{table}\n')
    assert needle in assert_user_error(invoke("run", "run.toml", "--print-config"))
    assert needle in assert_user_error(invoke("-q", "run", "run.toml"))
    assert list(tmp_path.iterdir()) == [tmp_path / "run.toml"]  # no runs/ folder left behind


@pytest.mark.parametrize("name, needle", [("m.onnx", "otkit engine info"), ("m.engine", "TensorRT engine"),
                                          ("m.plan", "TensorRT engine"), ("m.bin", "")])
def test_a_file_of_another_format_given_as_a_checkpoint_says_what_takes_it(tmp_path, name, needle):
    """`models show` of an ONNX file (a new user's mistake) is refused in one line that names the command for it;
    a suffix that names no format gets the plain refusal."""
    path = tmp_path / name
    path.write_bytes(b"\x08\x07\x12\x07pytorch" + bytes(64))  # not a safetensors header
    message = assert_user_error(invoke("models", "show", path))
    assert "is not a readable safetensors file" in message and needle in message
    assert ("it looks like" in message) == bool(needle)
