"""The command line, through click's test runner: help, versions, info, data, models, train, and user errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import models as zoo
from kit.checkpoint import read_checkpoint
from tests.clitools import assert_user_error, run


def test_help_documents_exit_statuses_and_commands():
    r = run("--help")
    assert r.exit_code == 0
    for word in ("Exit statuses", "usage or input error", "train", "info", "data", "models", "audit", "run"):
        assert word in r.output


def test_version_lists_dependencies():
    import onnx
    import onnxruntime

    r = run("--version")
    assert r.exit_code == 0
    assert r.output.startswith("otkit 0.")
    assert torch.__version__ in r.output and onnx.__version__ in r.output and onnxruntime.__version__ in r.output
    assert "pot" in r.output and "tensorrt" in r.output and "CPUExecutionProvider" in r.output


def test_python_dash_m_kit_works():
    out = subprocess.run([sys.executable, "-m", "kit", "--help"], capture_output=True, text=True, check=True)
    assert "otkit" in out.stdout


def test_cli_import_and_top_level_help_do_not_import_torch():
    """Importing every command and printing the top-level help (or a command's that lists no attack) loads neither
    torch nor the attack registry; the commands whose help lists attacks load the registry only to print it."""
    for args in (["--help"], ["models", "import", "--help"], ["verify", "--help"], ["engine", "run", "--help"]):
        probe = ("import sys\nfrom click.testing import CliRunner\nfrom kit.cli import cli\n"
                 f"r = CliRunner().invoke(cli, {args!r})\nassert r.exit_code == 0, r.output\n"
                 "print(sorted(m for m in ('torch', 'kit.attacks.registry') if m in sys.modules))")
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]", (args, out.stdout + out.stderr)
    from kit.attacks.registry import list_attacks

    for command in ("audit", "evaluate"):
        r = run(command, "--help")
        assert r.exit_code == 0
        listed = " ".join(r.output.split())  # click wraps the list, splitting names at hyphens
        assert "One of: pgd-linf," in listed and listed.count("One of: pgd-linf,") == 1
        joined = re.sub(r"-\s+", "-", listed)  # undo click's wrapping after a hyphen
        assert all(name in joined for name in list_attacks())


def test_info_table_and_json():
    import onnxruntime

    r = run("info", "--json")
    assert r.exit_code == 0
    report = json.loads(r.stdout)
    assert report["onnxruntime_providers"] == onnxruntime.get_available_providers()
    assert report["devices"][0]["device"] == "cpu"
    assert len(report["devices"]) == 1 + (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert report["tensorrt"]["available"] == (report["tensorrt"]["version"] is not None)
    t = run("info")
    assert t.exit_code == 0 and "CPUExecutionProvider" in t.stdout and "TensorRT" in t.stdout


def test_data_inspect_digits():
    from kit.data import load_dataset

    r = run("data", "inspect", "digits", "--json")
    assert r.exit_code == 0
    out = json.loads(r.stdout)
    train, test = out["splits"]
    assert train["n"] + test["n"] == 1797 and train["shape"] == "1x8x8" and train["classes"] == 10
    assert train["fingerprint"] == load_dataset("digits", "train").fingerprint
    t = run("data", "inspect", "digits:16")
    assert t.exit_code == 0 and "1x16x16" in t.stdout and "sha256:" in t.stdout


def test_models_list_matches_registry():
    r = run("models", "list", "--json")
    assert r.exit_code == 0
    assert [row["name"] for row in json.loads(r.stdout)] == zoo.list_models()
    t = run("models", "list")
    for name in zoo.list_models():
        assert name in t.stdout


def test_models_show(digits_model):
    path, _ = digits_model
    _, info = read_checkpoint(path)
    r = run("models", "show", str(path), "--json")
    assert r.exit_code == 0
    shown = json.loads(r.stdout)
    assert shown["weights_sha256"] == info.weights_sha256 and shown["arch"] == info.arch
    assert shown["input_shape"] == [1, 16, 16] and shown["dataset"]["fingerprint"] == info.dataset["fingerprint"]
    t = run("models", "show", str(path))
    assert t.exit_code == 0
    for needle in ("cnn-small", "1x16x16", "standard", info.weights_sha256, info.dataset["fingerprint"]):
        assert needle in t.stdout


def test_train_command_writes_a_checkpoint(tmp_path):
    out = tmp_path / "m.safetensors"
    r = run("--quiet", "train", "--arch", "cnn-small", "--data", "digits", "--epochs", "2", "--json",
            "--out", str(out))
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["weights_sha256"] == read_checkpoint(out)[1].weights_sha256 and summary["epochs"] == 2
    resumed = run("--quiet", "train", "--arch", "cnn-small", "--data", "digits", "--epochs", "3", "--resume",
                  "--json", "--out", str(out))
    assert resumed.exit_code == 0 and json.loads(resumed.stdout)["epochs"] == 3


# ------------------------------------------------------------------------------------------------------ user errors
def test_missing_checkpoint(tmp_path):
    assert_user_error(run("models", "show", str(tmp_path / "nope.safetensors")), "not found", "nope.safetensors")


def test_malformed_dataset_file(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file")
    assert_user_error(run("data", "inspect", f"npz:{bad}"), "bad.npz")
    idx = tmp_path / "mnist"
    idx.mkdir()
    (idx / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x07" + b"\x00" * 12)  # wrong rank (7)
    (idx / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (1).to_bytes(4, "big") + b"\x00")
    assert_user_error(run("data", "inspect", f"mnist:{idx}"), "train-images-idx3-ubyte")


def test_labels_out_of_range(tmp_path):
    f = tmp_path / "neg.npz"
    np.savez(f, x=np.zeros((4, 1, 4, 4), np.uint8), y=np.array([0, 1, -1, 2]))
    assert_user_error(run("data", "inspect", f"npz:{f}"), "neg.npz")


def test_unknown_model_name(tmp_path):
    r = run("train", "--arch", "resnet-9000", "--data", "digits", "--epochs", "1", "--out", str(tmp_path / "m.safetensors"))
    assert_user_error(r, "resnet-9000", "cnn-small")


def test_unknown_defense_is_a_usage_error(tmp_path):
    r = run("train", "--defense", "nope", "--out", str(tmp_path / "m.safetensors"))
    assert r.exit_code == 2 and "nope" in r.stderr


def test_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "x": Evil()}, evil)
    assert_user_error(run("models", "show", str(evil)), "refusing to load", "evil.pt")
    assert not marker.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_cuda(tmp_path):
    r = run("--device", "cuda", "train", "--data", "digits", "--epochs", "1", "--out", str(tmp_path / "m.safetensors"))
    assert_user_error(r, "CUDA is not available")


def test_engine_run_notes_a_shortfall_only_of_what_was_asked(digits_model, caplog):
    """digits:16's test split has fewer examples than engine run's default of 1000: that default is no request, so no
    note; an explicit --samples 1000 gets one."""
    path, _ = digits_model
    for extra, noted in (([], False), (["--samples", "1000"], True)):
        caplog.clear()
        r = run("engine", "run", str(path), "--data", "digits:16", *extra)
        assert r.exit_code == 0, r.output
        assert any("examples requested" in rec.getMessage() for rec in caplog.records) is noted, extra
