"""Error-level validity flags fail an audit unless waived by id (docs/checks.md, "What a flag does")."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn

from evaluators.audit import decide, failing_flags
from tests.clitools import assert_user_error, run


class _Noisy(nn.Module):
    """A randomised engine: the twin's logits plus a little noise (its predictions barely change)."""

    def __init__(self, twin: nn.Module) -> None:
        super().__init__()
        self.twin = twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.twin(x)
        return z + 2e-5 * torch.randn_like(z)  # within the fp32 logit tolerance, far above run-to-run noise


@pytest.fixture(scope="module")
def noisy_engine(digits_model, tmp_path_factory):
    from kit.checkpoint import load_twin

    twin, info = load_twin(digits_model[0])
    path = tmp_path_factory.mktemp("noisy") / "noisy.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Noisy(twin).eval(), (torch.rand(2, *info.input_shape),), str(path), dynamo=False,
                          opset_version=18, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return digits_model[0], path


ARGS = ["--attack", "pgd-linf@0.3", "--samples", "24", "--batch-size", "24", "--rungs", "3", "--blackbox-samples", "0",
        "--json"]
BLIND = ["--allow-flag", "test-blind"]  # 24 examples cannot see the tolerated curve gap: waived where a pass is due


def test_a_randomised_engine_fails_the_audit_and_can_be_waived_by_id(noisy_engine, tmp_path):
    twin, engine = noisy_engine
    res = run("-q", "audit", "--engine", engine, "--twin", twin, *ARGS, "--out", tmp_path / "a")
    assert res.exit_code == 1, res.output
    doc = json.loads(res.stdout)
    ids = {c["id"]: c["severity"] for c in doc["checks"]}
    assert ids.get("randomised-outputs") == "error" and doc["status"] == "fail" and doc["allowed_flags"] == []
    assert "(fails the audit)" in (tmp_path / "a" / "report.md").read_text()
    # waived by id, one at a time: each waiver is recorded, and every other error still fails the audit (the noise
    # also makes stored adversarials fail re-verification)
    res = run("-q", "audit", "--engine", engine, "--twin", twin, *ARGS, "--allow-flag", "randomised-outputs",
              "--out", tmp_path / "c")
    doc = json.loads(res.stdout)
    errors = {c["id"] for c in doc["checks"] if c["severity"] == "error"}
    assert doc["allowed_flags"] == ["randomised-outputs"]
    assert res.exit_code == (1 if errors - {"randomised-outputs"} else 0)
    res = run("-q", "audit", "--engine", engine, "--twin", twin, *ARGS, *[f"--allow-flag={e}" for e in errors],
              "--out", tmp_path / "b")
    doc = json.loads(res.stdout)
    assert doc["allowed_flags"] == sorted(errors) and doc["verdict"] == "match"
    assert res.exit_code == 0, res.output
    assert "(allowed by --allow-flag)" in (tmp_path / "b" / "report.md").read_text()
    # verify re-derives the status from the flags and the waiver: the report agrees with itself, and a waiver
    # removed by hand turns the recomputed status to fail
    from evaluators.recompute import recompute_report

    assert recompute_report(doc) == []
    assert any("status" in d for d in recompute_report({**doc, "allowed_flags": []}))


def test_unknown_flag_id_is_a_usage_error(noisy_engine, tmp_path):
    twin, engine = noisy_engine
    assert_user_error(run("audit", "--engine", engine, "--twin", twin, *ARGS, "--allow-flag", "nope",
                          "--out", tmp_path / "a"), "unknown flag id", "randomised-outputs")
    assert not (tmp_path / "a").exists()


def test_decide_fails_on_error_flags_only():
    clean = {"verdict": "match"}
    rec = [{"name": "pgd-linf", "engine": {"auac": 0.5}, "fidelity": {"verdict": "match"}}]
    warn = {"id": "zero-gradients", "severity": "warning", "attack": None, "message": ""}
    err = {"id": "randomised-outputs", "severity": "error", "attack": None, "message": ""}
    assert decide(clean, rec, [], [warn])[2] == "pass"
    assert decide(clean, rec, [], [warn, err])[2] == "fail"
    assert decide(clean, rec, [], [err], ["randomised-outputs"])[2] == "pass"
    assert failing_flags([warn, err], ["zero-gradients"]) == [err]


def test_a_file_claiming_int8_that_computes_in_fp32_fails_the_audit(digits_model, tmp_path):
    """A planted fault: an fp32 export whose metadata says int8. The audit finds the graph's weights in fp32 and
    fails with the error flag (the curves themselves match: the twin and the fp32 graph are the same)."""
    import onnx

    from exporters.checkpoint import export_checkpoint

    path = export_checkpoint(digits_model[0], "onnx", tmp_path / "m.onnx").path
    model = onnx.load(path)
    for p in model.metadata_props:
        if p.key == "otkit.precision":
            p.value = "int8"
    liar = tmp_path / "liar-int8.onnx"
    onnx.save(model, liar)
    res = run("-q", "audit", "--engine", liar, "--twin", digits_model[0], *ARGS, *BLIND, "--out", tmp_path / "a")
    assert res.exit_code == 1, res.output
    doc = json.loads(res.stdout)
    assert doc["engine"]["precision"] == "int8"
    assert [c["id"] for c in doc["checks"] if c["severity"] == "error" and c["id"] not in doc["allowed_flags"]] == [
        "precision-not-deployed"]
    assert "The audit fails: error flag precision-not-deployed" in (tmp_path / "a" / "report.md").read_text()
    # the honest file passes
    res = run("-q", "audit", "--engine", path, "--twin", digits_model[0], *ARGS, *BLIND, "--out", tmp_path / "b")
    assert res.exit_code == 0, res.output
