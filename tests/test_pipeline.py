"""`otkit run`: the run file, its documentation, and a small end-to-end run (train -> export -> audit -> reports)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tomllib
from click.testing import CliRunner

from evaluators.pipeline import default_run_text, load_run_config, parse_run_config
from kit.cli import cli

DOCS = Path(__file__).resolve().parents[1] / "docs" / "run.md"

TINY = """
name = "tiny"
[train]
defense = "standard"
data = "digits:16"
epochs = 2
eval_samples = 100
[export]
formats = ["onnx", "onnx-int8", "tensorrt"]
samples = 64
calibration_samples = 64
[audit]
attacks = ["pgd-linf@0.3"]
samples = 30
batch_size = 30
rungs = 4
blackbox_samples = 10
[audit.gates]
"pgd-linf" = 0.01
[certify]
formats = ["onnx-int8"]
n = 300
samples = 6
attack_n = 100
"""


def run(*args: str):
    return CliRunner().invoke(cli, ["-q", *map(str, args)])


def test_docs_show_the_embedded_default_verbatim():
    block = re.search(r"is:\n\n```toml\n(.*?)```", DOCS.read_text(), re.S).group(1)
    body = "\n".join(line for line in default_run_text().splitlines() if not line.startswith("#")).strip()
    assert block.strip() == body
    cfg = load_run_config(None)
    assert cfg.train["defense"] == "sat" and cfg.audit.gates == {"linf": 0.1}


def test_tiny_run_end_to_end(tmp_path):
    (tmp_path / "run.toml").write_text(TINY)
    assert run("keygen", "--out", tmp_path / "k").exit_code == 0
    res = run("run", tmp_path / "run.toml", "--out", tmp_path / "runs", "--sign-key", tmp_path / "k.key")
    folder = tmp_path / "runs" / "tiny"
    summary = json.loads((folder / "summary.json").read_text())
    assert res.exit_code == (0 if summary["status"] == "pass" else 1), res.output
    fmts = {r["format"]: r for r in summary["artifacts"]}
    assert fmts["tensorrt"]["status"] == "skipped"  # no TensorRT on the CPU machines the suite runs on
    for fmt in ("onnx", "onnx-int8"):
        doc = json.loads((folder / "audit" / fmt / "report.json").read_text())
        assert doc["engine"]["path"].endswith(".onnx") and fmts[fmt]["verdict"] == doc["verdict"]
        assert fmts[fmt]["engine_auac"]["pgd-linf"] == doc["attacks"][0]["engine"]["auac"]
    fp32 = json.loads((folder / "audit" / "onnx" / "report.json").read_text())
    assert fp32["verdict"] == "match" and fp32["status"] == "pass"  # an FP32 export is its twin
    resolved = json.loads((folder / "run-config.json").read_text())
    assert resolved["train"]["epochs"] == 2 and resolved["train"]["batch_size"] == 64  # defaults filled in
    assert "report.md" in res.output and "skipped" in res.output
    # the certificate [certify] asks for: of the int8 file, beside its audit, in the summary and on screen
    cert = json.loads((folder / "certify" / "onnx-int8" / "certificate.json").read_text())
    assert cert["engine"]["precision"] == "int8" and cert["data"]["n"] == 6 and cert["attack"] is not None
    assert fmts["onnx-int8"]["certified_auac"] == cert["certified"]["auac"] and "certified_auac" not in fmts["onnx"]
    assert "certified AUAC" in res.output and "certificate.md" in res.output
    # --sign-key signed every report and the certificate: otkit verify --public-key accepts each
    from kit.signing import load_public_key, open_bundle

    pub = load_public_key(tmp_path / "k.pub")
    for sub, bundle in (("audit/onnx", "report.sigstore.json"), ("audit/onnx-int8", "report.sigstore.json"),
                        ("certify/onnx-int8", "certificate.sigstore.json")):
        statement, problems = open_bundle(folder / sub / bundle, pub)
        assert not problems and statement["predicate"]["engine"]["sha256"] == fmts[sub.split("/")[1]]["sha256"]
    engine = fmts["onnx"]["artifact"]
    res = run("verify", folder / "audit" / "onnx", "--engine", engine, "--twin", folder / "model.safetensors",
              "--public-key", tmp_path / "k.pub", "--waive", "data")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("text,message", [
    ("bogus = 1", "unknown key"),
    ("[train]\nepochs = 0", "epochs must be at least 1"),
    ("[train]\nwhat = 1", "unknown training option"),
    ("[export]\nformats = [\"onnx\", \"zip\"]", "unknown export format"),
    ("[audit]\nsamples = \"many\"", "samples must be int"),
    ("[audit]\nattacks = [\"nope@0.1\"]", "unknown attack"),
    ("[audit]\nattacks = [\"pgd-linf@0.3\"]\n[audit.gates]\n\"fmn-l2\" = 0.2", "neither an audited attack"),
    ("name = \"a/b\"", "plain folder name"),
    ("[export]\nformats = [\"onnx\"]\n[certify]\nformats = [\"onnx-int8\"]", "does not build"),
    ("[certify]\nsigma = 0", "sigma"),
    ("[certify]\nsmoothing = \"uniform\"", "smoothing must be"),
    ("[certify]\nalpha = 2.0", "alpha"),
    ("[train\n", "not valid TOML"),
])
def test_bad_run_files_exit_2(tmp_path, text, message):
    (tmp_path / "r.toml").write_text(text)
    res = run("run", tmp_path / "r.toml", "--out", tmp_path / "runs")
    assert res.exit_code == 2 and message in res.output and res.output.count("\n") == 1, res.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("summary.json"))


def test_missing_run_file_and_print_config(tmp_path):
    res = run("run", tmp_path / "nope.toml")
    assert res.exit_code == 2 and "not found" in res.output
    res = run("run", "--print-config", "--epochs", "3", "--name", "x")
    doc = json.loads(res.output)
    assert doc["train"]["epochs"] == 3 and doc["name"] == "x" and doc["train"]["defense"] == "sat"
    parsed = parse_run_config(tomllib.loads(default_run_text()))
    assert parsed.export.formats == doc["export"]["formats"]
    assert parsed.audit.spot_check == 1000 and parsed.audit_config(0).spot_check == 1000


@pytest.mark.parametrize("value, ok", [(0, True), (250, True), (-1, False), (1.5, False), ("abc", False)])
def test_the_spot_check_of_a_run_file(value, ok):
    """``[audit] spot_check``: 0 turns the spot check off, as --spot-check 0 does; negatives and non-integers are
    refused before any work."""
    from kit.errors import UserError

    doc = {"audit": {"spot_check": value}}
    if ok:
        assert parse_run_config(doc).audit_config(0).spot_check == value
    else:
        with pytest.raises(UserError, match="spot_check"):
            parse_run_config(doc)
