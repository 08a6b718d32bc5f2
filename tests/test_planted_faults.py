"""Planted faults an audit must catch from the command line (issue 18), and the parts of the audit they exercise.

- An engine that is its twin plus a class flip triggered in a small region the twin ignores (its gradients do not
  see it): only the black box on the engine finds it, and the worst case then fails the verdict.
- Attack parameters given on the command line are the ones the audit runs with (and bad values are refused).
- Square judged by the engine on an int8 file: its adversarials are the engine's, so re-verification holds.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn

from kit.checkpoint import load_twin
from kit.data import load_dataset
from tests.clitools import assert_user_error, run

ROWS, COLS = slice(6, 9), slice(0, 2)  # the left edge: no ink on the digits, the twin's gradients near zero there


class Triggered(nn.Module):
    """The twin, except when every pixel of the trigger region exceeds ``tau``: then the logits roll by one class."""

    def __init__(self, twin: nn.Module, tau: float) -> None:
        super().__init__()
        self.twin, self.tau = twin, tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.twin(x)
        fire = (x[:, :, ROWS, COLS].flatten(1).amin(1) > self.tau).to(z.dtype).unsqueeze(1)
        return z + fire * (torch.roll(z, 1, dims=1) - z)


@pytest.fixture(scope="module")
def triggered(digits_model, tmp_path_factory):
    twin, _ = load_twin(digits_model[0])
    model = Triggered(twin, 0.08).eval()
    x = load_dataset("digits:16", "test").x
    assert (x[:, :, ROWS, COLS].flatten(1).amin(1) > 0.08).sum() == 0  # no clean image fires: clean agreement 1
    path = tmp_path_factory.mktemp("planted") / "triggered.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x[:2],), str(path), dynamo=False, opset_version=18, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return digits_model[0], path


def test_a_flip_the_gradients_do_not_see_fails_the_audit(triggered, tmp_path):
    twin, engine = triggered
    out = tmp_path / "a"
    res = run("-q", "audit", "--engine", engine, "--twin", twin, "--data", "digits:16", "--attack", "pgd-linf@0.3",
              "--samples", "32", "--blackbox-samples", "32", "--rungs", "4", "--allow-flag", "test-blind",
              "--json", "--out", out)
    doc = json.loads(res.stdout)
    assert doc["clean"]["top1_agreement"] == 1.0 and doc["attacks"][0]["fidelity"]["verdict"] == "match"
    worst = doc["worst_case"][0]
    assert worst["fidelity"]["verdict"] == "mismatch", worst["fidelity"]
    assert res.exit_code == 1 and doc["verdict"] == "mismatch" and doc["status"] == "fail"
    first = (out / "report.md").read_text().split("\n\n")[1]
    assert first.startswith("The audit fails: worst case linf")
    # the black box (run on both models, each side's adversarials judged by the other) fools the engine at smaller
    # radii than the twin on examples where the trigger fires
    bb = worst["blackbox"]
    below = [e for e, t in zip(bb["eps"], bb["twin_eps"]) if e is not None and (t is None or e < t - 1e-9)]
    assert len(below) >= 3
    from evaluators.recompute import recompute_report

    assert recompute_report(doc) == []


def test_attack_parameters_reach_the_audit(digits_model, tmp_path):
    twin = digits_model[0]
    from exporters.checkpoint import export_checkpoint

    engine = export_checkpoint(twin, "onnx", tmp_path / "m.onnx").path
    passes = {}
    for steps in (1, 12):
        res = run("-q", "audit", "--engine", engine, "--twin", twin, "--attack", f"pgd-linf@0.3:steps={steps}",
                  "--samples", "16", "--rungs", "3", "--blackbox-samples", "0", "--allow-flag", "test-blind",
                  "--json", "--out", tmp_path / f"s{steps}")
        doc = json.loads(res.stdout)
        assert doc["attacks"][0]["config"]["steps"] == steps
        passes[steps] = doc["attacks"][0]["passes"]["backward_per_example"]
    assert passes[12] > 3 * passes[1]  # 12 steps per rung cost more gradients than 1
    res = run("audit", "--engine", str(engine), "--twin", str(twin), "--attack", "pgd-linf@0.3:steps=0",
              "--out", str(tmp_path / "bad"))
    assert_user_error(res, "pgd-linf", "steps")


def test_square_judged_by_an_int8_engine_verifies(digits_model, tmp_path):
    from exporters.checkpoint import export_checkpoint

    twin = digits_model[0]
    engine = export_checkpoint(twin, "onnx-int8", tmp_path / "m8.onnx").path
    res = run("-q", "audit", "--engine", engine, "--twin", twin, "--attack", "square-linf@0.3:queries=50",
              "--samples", "16", "--rungs", "3", "--blackbox-samples", "0", "--no-engine-only",
              "--allow-flag", "test-blind", "--json", "--out", tmp_path / "sq")
    doc = json.loads(res.stdout)
    assert not [c for c in doc["checks"] if c["id"] == "adversarial-not-verified"], doc["checks"]
