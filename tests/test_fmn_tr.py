"""FMN and Trust-Region minimum-norm attacks: closed forms on linear classifiers, and a trained digits model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from kit.attacks import PGD, lp_norm
from kit.attacks.fmn import FMN
from kit.attacks.trust_region import TrustRegion
from kit.data import load_dataset
from kit.errors import UserError

ATTACKS = {"fmn": FMN, "tr": TrustRegion}


class Linear2(nn.Module):
    """Two-class linear model: logits (0, w.x + b). The smallest perturbation flipping class 1 has a closed form."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w = nn.Parameter(w.flatten().clone())
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], 1)


class Linear3(nn.Module):
    """Three-class linear model: logits W x + b."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(b.clone())

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b


def _linear_case():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 4, 4, generator=g)
    x = 0.4 + 0.2 * torch.rand(6, 1, 4, 4, generator=g)  # interior: the [0, 1] box does not bind
    model = Linear2(w, 0.0)
    with torch.no_grad():
        model.b.copy_(-(x.flatten(1) @ model.w).min() + 0.05)  # every example has margin > 0: class 1
        margin = x.flatten(1) @ model.w + model.b
    y = torch.ones(6, dtype=torch.long)
    return model, x, y, margin, w.flatten()


def _dual(v: torch.Tensor, norm: str) -> torch.Tensor:
    return v.abs().sum(-1) if norm == "linf" else v.norm(dim=-1)


def _min_norm_linear2(norm):
    model, x, y, margin, w = _linear_case()
    eps_star = margin / _dual(w, norm)  # exact smallest flipping perturbation: margin / ||w||_dual
    assert (eps_star < 0.35).all()  # x in [0.4, 0.6]: the box does not bind
    return model, x, y, eps_star


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", ["fmn", "tr"])
def test_closed_form_minimum_on_a_linear_model(name, norm):
    model, x, y, eps_star = _min_norm_linear2(norm)
    res = ATTACKS[name](model, norm=norm)(x, y)
    assert res.success.all()
    assert (model(res.x_adv).argmax(1) != y).all()
    assert torch.allclose(res.norm, lp_norm(res.x_adv - x, norm))
    assert (res.norm >= eps_star - 1e-6).all()  # below the exact minimum would be a bookkeeping bug
    assert (res.norm <= eps_star * 1.02).all()


def _three_class_case(norm):
    """y = 0; class 1 scores higher than class 2 at x, but the boundary with class 2 is 2.5 times closer."""
    g = torch.Generator().manual_seed(1)
    x = 0.4 + 0.2 * torch.rand(1, 1, 4, 4, generator=g)
    u, v = torch.randn(16, generator=g), torch.randn(16, generator=g)
    u, v = u / _dual(u, norm) * 8, v / _dual(v, norm) * 40
    w = torch.stack([torch.zeros(16), u, v])
    xf = x.flatten()
    model = Linear3(w, torch.stack([torch.tensor(0.0), -0.8 - u @ xf, -1.6 - v @ xf]))
    logits = model(x)[0].detach()
    assert logits.argsort(descending=True).tolist() == [0, 1, 2]
    # misclassified iff z_j > z_0 for some j: the union of two half-spaces, at distances (z_0 - z_j) / ||w_0 - w_j||_*
    dists = torch.stack([(logits[0] - logits[j]) / _dual(w[0] - w[j], norm) for j in (1, 2)])
    assert dists[1] < dists[0] / 2 and dists.max() < 0.35
    return model, x, torch.zeros(1, dtype=torch.long), dists.min().item()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_trust_region_picks_the_closest_boundary_among_top_classes(norm):
    model, x, y, eps_star = _three_class_case(norm)
    res = TrustRegion(model, norm=norm, n_classes_considered=2)(x, y)
    assert res.success.item() and model(res.x_adv).argmax(1).item() == 2
    assert eps_star - 1e-6 <= res.norm.item() <= eps_star * 1.02
    # one backward per considered class and iteration
    assert res.backwards.item() == 2 * (res.forwards.item() - 1)
    # following only the highest-scoring other class walks to the farther boundary: the choice matters
    greedy = TrustRegion(model, norm=norm, n_classes_considered=1)(x, y)
    assert greedy.success.item() and greedy.norm.item() > 2 * eps_star
    assert greedy.backwards.item() == greedy.forwards.item() - 1


@pytest.mark.parametrize("name", ["fmn", "tr"])
def test_cap_below_the_minimum_is_a_failure(name):
    model, x, y, eps_star = _min_norm_linear2("linf")
    res = ATTACKS[name](model, eps=float(eps_star.min()) * 0.9)(x, y)
    assert not res.success.any()
    assert torch.equal(res.x_adv, x) and (res.norm == 0).all()
    # per-example caps in one batch: above / below the minimum alternately
    for norm in ("linf", "l2"):
        _, _, _, eps_star = _min_norm_linear2(norm)
        cap = eps_star * torch.tensor([1.05, 0.9] * 3)
        res = ATTACKS[name](model, norm=norm)(x, y, eps=cap)
        assert res.success.tolist() == [True, False] * 3
        assert (res.norm <= cap).all()
        assert torch.equal(res.x_adv[1::2], x[1::2])
        assert (model(res.x_adv[0::2]).argmax(1) == 0).all()


def test_pass_accounting_on_a_linear_model():
    model, x, y, eps_star = _min_norm_linear2("l2")
    y = y.clone()
    y[0] = 0  # misclassified clean: one forward, no backward, norm 0
    res = FMN(model, norm="l2", steps=30)(x, y)
    assert res.success.all() and res.norm[0] == 0 and torch.equal(res.x_adv[0], x[0])
    assert res.forwards.tolist() == [1] + [30] * 5 and res.backwards.tolist() == [0] + [30] * 5
    res = TrustRegion(model, norm="l2", steps=30)(x, y)
    assert res.success.all() and res.norm[0] == 0
    assert res.forwards[0] == 1 and res.backwards[0] == 0
    assert (res.backwards[1:] == res.forwards[1:] - 1).all()  # two classes: k = 1 backward per iteration
    # a zero cap cannot be met: the clean check only
    res = TrustRegion(model, norm="l2", steps=30)(x, y, eps=torch.zeros(6))
    assert res.success.tolist() == [True] + [False] * 5 and (res.forwards == 1).all() and (res.backwards == 0).all()
    res = FMN(model, norm="l2", steps=30)(x, y, eps=torch.zeros(6))
    assert res.success.tolist() == [True] + [False] * 5 and (res.forwards == 1).all() and (res.backwards == 0).all()


def test_fmn_warm_start():
    model, x, y, eps_star = _min_norm_linear2("linf")
    w = model.w.detach().view(1, 1, 4, 4)
    far = (x - 0.3 * w.sign()).clamp(0, 1)  # adversarial, far from the boundary
    res = FMN(model, steps=20, binary_search_steps=8)(x, y, init=far)
    assert res.success.all() and (res.norm <= eps_star * 1.02).all() and (res.norm >= eps_star - 1e-6).all()
    assert (res.forwards == 1 + 1 + 8 + 20).all() and (res.backwards == 20).all()
    # a warm start that is not adversarial is checked and dropped
    res = FMN(model, steps=50, binary_search_steps=8)(x, y, init=x)
    assert res.success.all() and (res.norm <= eps_star * 1.02).all()
    assert (res.forwards == 1 + 1 + 50).all()


@pytest.fixture(scope="module")
def digits_attacks(digits_model):
    _, result = digits_model
    model = result.model.eval()
    test = load_dataset("digits:16", "test").subset(200)
    x, y = test.x, test.y
    fmn = FMN(model, norm="linf", steps=50)(x, y, eps=0.3)
    tr = TrustRegion(model, norm="linf")(x, y, eps=0.3)
    return model, x, y, fmn, tr


def test_on_trained_digits_model(digits_attacks):
    model, x, y, fmn, tr = digits_attacks
    clean = model(x).argmax(1) == y
    for res, name in ((fmn, "fmn"), (tr, "tr")):
        assert res.success.float().mean() >= 0.95, name
        ok = res.success
        assert (model(res.x_adv[ok]).argmax(1) != y[ok]).all()
        assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
        assert (res.norm <= 0.3).all() and torch.allclose(res.norm, lp_norm(res.x_adv - x, "linf"))
        assert torch.equal(res.x_adv[~ok], x[~ok])
        assert (res.forwards[~clean] == 1).all() and (res.backwards[~clean] == 0).all()
        attacked = ok & clean
        med = res.norm[attacked].median().item()
        assert math.isfinite(med) and 0 < med < 0.3, (name, med)
    assert (fmn.forwards[clean] == 50).all() and (fmn.backwards[clean] == 50).all()
    assert (tr.forwards[clean] <= 101).all() and (tr.backwards[clean] == 3 * (tr.forwards[clean] - 1)).all()
    # the two attacks agree to within 10 % on the median
    a = fmn.norm[fmn.success & clean].median().item()
    b = tr.norm[tr.success & clean].median().item()
    assert a <= 1.1 * b and b <= 1.1 * a, (a, b)


def test_pgd_confirms_fmn_norms(digits_attacks):
    model, x, y, fmn, _ = digits_attacks
    hit = fmn.success & (fmn.norm > 0)
    # at 5 % above the norm FMN found, PGD finds an adversarial too (mostly) ...
    above = PGD(model, norm="linf", steps=50)(x[hit], y[hit], eps=fmn.norm[hit] * 1.05)
    assert above.success.float().mean() >= 0.9
    # ... and well below it, it rarely does: FMN's norms are near-minimal, not just valid
    below = PGD(model, norm="linf", steps=50)(x[hit], y[hit], eps=fmn.norm[hit] * 0.8)
    assert below.success.float().mean() <= 0.2


@pytest.mark.parametrize("name", ["fmn", "tr"])
def test_deterministic_restores_mode_and_repr(digits_model, name):
    _, result = digits_model
    model = result.model.train()
    test = load_dataset("digits:16", "test").subset(32)
    a = ATTACKS[name](model, norm="l2", steps=10, seed=3)(test.x, test.y)
    b = ATTACKS[name](model, norm="l2", steps=10, seed=3)(test.x, test.y)
    assert model.training
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success) and torch.equal(a.norm, b.norm)
    assert torch.equal(a.forwards, b.forwards) and torch.equal(a.backwards, b.backwards)
    r = repr(ATTACKS[name](model, eps=0.5, norm="l2", steps=7))
    assert r.startswith(type(ATTACKS[name](model)).__name__ + "(") and "eps=0.5" in r and "steps=7" in r
    assert "norm='l2'" in r
    assert "eps=inf" in repr(ATTACKS[name](model))


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (FMN, {"steps": 0}, "steps"),
        (FMN, {"alpha_init": 0.0}, "alpha_init"),
        (FMN, {"alpha_final": -1.0}, "alpha_final"),
        (FMN, {"gamma_init": 1.0}, "gamma_init"),
        (FMN, {"gamma_final": 0.0}, "gamma_final"),
        (FMN, {"binary_search_steps": -1}, "binary_search_steps"),
        (FMN, {"norm": "l1"}, "norm"),
        (FMN, {"eps": -1.0}, "epsilon"),
        (TrustRegion, {"steps": 0}, "steps"),
        (TrustRegion, {"n_classes_considered": 0}, "n_classes_considered"),
        (TrustRegion, {"radius_init": 0.0}, "radius_init"),
        (TrustRegion, {"radius_init": 0.5, "radius_max": 0.1}, "radius_max"),
        (TrustRegion, {"eta": 1.5}, "eta"),
        (TrustRegion, {"eta": 0.5, "eta_shrink": 0.9}, "eta"),
        (TrustRegion, {"factor": 1.0}, "factor"),
        (TrustRegion, {"overshoot": -0.1}, "overshoot"),
        (TrustRegion, {"norm": "l3"}, "norm"),
        (TrustRegion, {"eps": float("nan")}, "epsilon"),
    ],
)
def test_bad_parameters_are_user_errors(cls, kwargs, match):
    with pytest.raises(UserError, match=match):
        cls(Linear2(torch.ones(16), 0.0), **kwargs)


@pytest.mark.parametrize("cls", [FMN, TrustRegion])
def test_bad_call_arguments_are_user_errors(cls):
    model, x, y, _ = _min_norm_linear2("linf")
    with pytest.raises(UserError, match="shape"):
        cls(model)(x, y, eps=torch.ones(3))
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        cls(model)(x + 1.0, y)
