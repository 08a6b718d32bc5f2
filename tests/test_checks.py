"""Validity checks fire on purpose-built bad models and stay quiet on a normal one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from evaluators import checks as C
from evaluators.evaluate import AttackRequest, evaluate
from kit.attacks.registry import get_attack
from kit.data import load_dataset

DOCS = Path(__file__).resolve().parents[1] / "docs" / "checks.md"


class Quantised(nn.Module):
    """Input quantiser with zero gradient everywhere (torch.round), then a real model: masks every gradient."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


class Softmaxed(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).softmax(1)


class Noisy(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner((x + 0.05 * torch.randn_like(x)).clamp(0, 1))


@pytest.fixture(scope="module")
def data():
    test = load_dataset("digits:16", "test").subset(100)
    return test.x, test.y


def _ids(flags):
    return {f.id for f in flags}


def test_every_check_has_a_doc_section_and_its_severity_in_the_table():
    text = DOCS.read_text()
    sections = set(re.findall(r"^## ([a-z0-9-]+)$", text, re.M))
    assert sections == set(C.CHECKS)
    table = dict(re.findall(r"^\| `([a-z0-9-]+)` \| (info|warning|error) \|$", text, re.M))
    assert table == {k: v[0].value for k, v in C.CHECKS.items()}


def test_normal_model_raises_no_model_level_flags(digits_model, data):
    model = digits_model[1].model
    x, y = data
    assert C.check_outputs(model, x) == [] and C.check_gradients(model, x, y) == []
    from kit.attacks.base import Norm

    assert C.check_unbounded(model, x, y, Norm.LINF) is None


def test_quantised_model_is_flagged(digits_model, data):
    model = Quantised(digits_model[1].model)
    x, y = data
    assert "zero-gradients" in _ids(C.check_gradients(model, x, y))
    from kit.attacks.base import Norm

    f = C.check_unbounded(model, x, y, Norm.LINF)
    assert f is not None and f.id == "not-zero-at-unbounded-eps" and f.severity == "error"


def test_softmax_and_random_models_are_flagged(digits_model, data):
    x, _ = data
    assert "outputs-look-like-probabilities" in _ids(C.check_outputs(Softmaxed(digits_model[1].model), x))
    assert "randomised-outputs" in _ids(C.check_outputs(Noisy(digits_model[1].model), x))


class NanOnBright(nn.Module):
    """NaN logits wherever the image is bright somewhere (deterministic): a model that overflows on some inputs."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        bright = (x.flatten(1).amax(1) > 0.9)[:, None]
        return torch.where(bright, torch.full_like(out, float("nan")), out)


def test_nan_outputs_are_named_as_such_and_not_as_randomness(digits_model, data):
    x, _ = data
    model = NanOnBright(digits_model[1].model)
    rows = int((x.flatten(1).amax(1) > 0.9).sum())
    assert 0 < rows < len(x)
    flags = {f.id: f for f in C.check_outputs(model, x)}
    assert set(flags) == {"non-finite-outputs"}, flags
    assert flags["non-finite-outputs"].message.startswith(f"{rows} of {len(x)} clean inputs get NaN")
    assert flags["non-finite-outputs"].severity == "error"
    # NaN in one pass only is randomness
    calls = []

    def flaky(inp):
        calls.append(1)
        out = digits_model[1].model(inp)
        return out if len(calls) % 2 else torch.where(torch.arange(len(out))[:, None] == 0, float("nan"), out)

    got = {f.id: f for f in C.check_outputs(flaky, x)}
    assert "randomised-outputs" in got and "NaN or infinite" in got["randomised-outputs"].message


def test_monotone_and_fixed_eps_checks_on_hand_made_data():
    assert C.check_monotone("a", [0, 0.1, 0.2], [0.9, 0.5, 0.4]) is None
    f = C.check_monotone("a", [0, 0.1, 0.2], [0.9, 0.4, 0.5])
    assert f is not None and "0.4000 to 0.5000" in f.message
    eps_star = torch.tensor([0.05, 0.3, float("inf"), 0.0], dtype=torch.float64)
    fooled = torch.tensor([True, True, False, True])
    f = C.check_fixed_eps("fixed-eps-contradiction", "PGD-20", 0.1, fooled, eps_star)
    assert f is not None and "fools 1 example" in f.message  # only the one with eps* = 0.3 > 0.1
    assert C.check_fixed_eps("fixed-eps-contradiction", "PGD-20", 0.1, fooled & (eps_star <= 0.1), eps_star) is None


def test_reverify_catches_a_lying_result(digits_model, data):
    from kit.attacks.base import Norm

    model = digits_model[1].model
    x, y = data
    eps_star = torch.full((len(x),), 0.1, dtype=torch.float64)
    f = C.check_reverify(model, x, y, x.clone(), eps_star, Norm.LINF, "liar")  # "adversarials" that are the clean x
    assert f is not None and f.severity == "error" and "classified correctly" in f.message


def test_evaluate_on_quantised_model_flags_black_box_and_masking(digits_model, data):
    x, y = data
    doc = evaluate(Quantised(digits_model[1].model), x[:60], y[:60],
                   [AttackRequest(get_attack("pgd-linf"), 0.3)], seed=0)
    ids = {f["id"] for f in doc["checks"]}
    assert {"zero-gradients", "not-zero-at-unbounded-eps", "black-box-beats-white-box"} <= ids


def test_evaluate_on_normal_model_is_quiet(digits_model, data):
    x, y = data
    doc = evaluate(digits_model[1].model, x[:60], y[:60], [AttackRequest(get_attack("pgd-linf"), 0.3)], seed=0)
    serious = [f for f in doc["checks"] if f["severity"] == "error" or f["id"] in
               ("zero-gradients", "black-box-beats-white-box", "single-step-beats-multi-step")]
    assert serious == []
