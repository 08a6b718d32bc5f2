"""PGD and FGSM against closed forms on a linear classifier, and on a trained digits model."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from kit.attacks import FGSM, PGD, lp_norm
from kit.attacks.base import Norm
from kit.attacks.pgd import random_in_ball
from kit.data import load_dataset
from kit.errors import UserError


class Linear2(nn.Module):
    """Two-class linear model: logits (0, w.x + b). The smallest perturbation flipping class 1 has a closed form."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w = nn.Parameter(w.flatten().clone())
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], 1)


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


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_brackets_the_closed_form_minimum(norm):
    model, x, y, margin, w = _linear_case()
    # the exact smallest flipping perturbation: margin / ||w||_1 (L-inf), margin / ||w||_2 (L2)
    eps_star = margin / (w.abs().sum() if norm == "linf" else w.norm())
    assert (eps_star < 0.35).all()  # the box [0, 1] does not bind: x is in [0.4, 0.6]
    for i in range(len(x)):
        xi, yi = x[i : i + 1], y[i : i + 1]
        above = PGD(model, eps=float(eps_star[i]) * 1.02, norm=norm, steps=50)(xi, yi)
        below = PGD(model, eps=float(eps_star[i]) * 0.98, norm=norm, steps=50)(xi, yi)
        assert above.success.item() and not below.success.item()
        assert above.norm.item() <= eps_star[i].item() * 1.02 + 1e-6
        assert model(above.x_adv).argmax(1).item() == 0


def test_fgsm_is_optimal_on_a_linear_model():
    model, x, y, margin, w = _linear_case()
    eps_star = margin / w.abs().sum()
    res = FGSM(model, eps=float(eps_star.max()) * 1.01)(x, y)
    assert res.success.all()
    assert torch.allclose(res.x_adv, x - float(eps_star.max()) * 1.01 * w.sign().view(1, 1, 4, 4), atol=1e-6)


def test_pgd_on_trained_digits_model(digits_model):
    path, result = digits_model
    model = result.model.eval()
    test = load_dataset("digits:16", "test").subset(200)
    x, y = test.x, test.y
    clean = (model(x).argmax(1) == y)
    strong = PGD(model, eps=0.3, steps=20)(x, y)
    assert strong.robust_accuracy < 0.05  # standard training: no robustness at eps 0.3
    # re-verify: inside the ball, inside [0, 1], misclassified
    assert (lp_norm(strong.x_adv - x, "linf") <= 0.3 + 1e-6).all()
    assert strong.x_adv.min() >= 0 and strong.x_adv.max() <= 1
    assert (model(strong.x_adv[strong.success]).argmax(1) != y[strong.success]).all()
    # examples misclassified clean cost one forward and no backward; nothing costs more than the budget
    assert (strong.forwards[~clean] == 1).all() and (strong.backwards[~clean] == 0).all()
    assert strong.forwards.max() <= 1 + 21 and strong.backwards.max() <= 20
    # fooled points stop costing work: the mean cost is far below the budget
    assert strong.backwards.float().mean() < 10
    weak = PGD(model, eps=0.01, steps=20)(x, y)
    assert weak.robust_accuracy > strong.robust_accuracy


def test_pgd_is_deterministic_and_restores_mode(digits_model):
    _, result = digits_model
    model = result.model.train()
    x, y = load_dataset("digits:16", "test").subset(64).x, load_dataset("digits:16", "test").subset(64).y
    a = PGD(model, eps=0.1, norm="l2", steps=5, seed=7)(x, y)
    b = PGD(model, eps=0.1, norm="l2", steps=5, seed=7)(x, y)
    assert model.training
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
    assert "eps=0.1" in repr(PGD(model, eps=0.1))


@pytest.mark.parametrize(
    ("kwargs", "x", "match"),
    [
        ({"eps": -0.1}, torch.rand(2, 1, 4, 4), "epsilon"),
        ({"eps": float("nan")}, torch.rand(2, 1, 4, 4), "epsilon"),
        ({"eps": 0.1}, torch.rand(2, 1, 4, 4) + 1.0, r"\[0, 1\]"),
        ({"eps": 0.1}, torch.rand(2, 1, 4, 4) - 1.0, r"\[0, 1\], got \[-"),
        ({"eps": 0.1}, torch.full((2, 1, 4, 4), 0.5).index_fill_(3, torch.tensor([1]), float("nan")), "NaN"),
        ({"eps": 0.1}, torch.full((2, 1, 4, 4), 0.5).index_fill_(0, torch.tensor([1]), float("inf")), "infinite"),
        ({"eps": 0.1}, torch.full((2, 1, 4, 4), 0.5).index_fill_(2, torch.tensor([3]), -float("inf")), "infinite"),
        ({"eps": 0.1}, torch.rand(2, 16), r"\(N, C, H, W\)"),
        ({"eps": 0.1}, torch.ones(2, 1, 4, 4, dtype=torch.long), "float"),
        ({"eps": 0.1}, torch.full((2, 1, 4, 4), float("nan")).to(torch.float8_e5m2), "float8_e5m2"),
        ({"eps": 0.1, "norm": "l3"}, torch.rand(2, 1, 4, 4), "norm"),
    ],
)
def test_bad_input_is_a_user_error(kwargs, x, match):
    model = Linear2(torch.ones(16), 0.0)
    with pytest.raises(UserError, match=match):
        PGD(model, **kwargs)(x, torch.zeros(len(x), dtype=torch.long))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_per_example_epsilon_in_one_batch(norm):
    model, x, y, margin, w = _linear_case()
    eps_star = margin / (w.abs().sum() if norm == "linf" else w.norm())
    factor = torch.tensor([1.02, 0.98] * 3)
    res = PGD(model, norm=norm, steps=50)(x, y, eps=eps_star * factor)
    assert res.success.tolist() == [True, False] * 3
    assert (res.norm <= eps_star * factor + 1e-6).all()


def test_warm_start_is_projected_and_used():
    model, x, y, margin, w = _linear_case()
    eps_star = margin / w.abs().sum()
    corner = x - 0.5 * w.sign().view(1, 1, 4, 4)  # far outside the ball: must be projected to the optimal corner
    res = PGD(model, steps=1, random_start=False)(x, y, eps=eps_star * 1.01, init=corner.clamp(0, 1))
    assert res.success.all()
    assert (res.forwards == 2).all() and (res.backwards == 0).all()  # clean check + the projected start: no gradient


def test_targeted_pgd_reaches_the_target(digits_model):
    _, result = digits_model
    test = load_dataset("digits:16", "test").subset(32)
    target = (test.y + 1) % 10
    res = PGD(result.model, eps=0.3, steps=40, targeted=True)(test.x, target)
    assert res.success.float().mean() > 0.9
    assert (result.model(res.x_adv[res.success]).argmax(1) == target[res.success]).all()


def _random_linear(n: int, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Generator]:
    """A linear 5-class model with Gaussian weights, ``n`` uniform 1x6x6 inputs, and the generator for more draws."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model, torch.rand(n, 1, 6, 6, generator=g), g


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shared_radius", [True, False])
def test_without_early_stopping_the_first_adversarial_is_kept(norm, shared_radius):
    """Without early stopping every example takes every step, yet ``x_adv`` is still the first adversarial iterate:
    the one an early-stopping run (which drops an example when it is fooled, the path of the others unchanged)
    returns. The final iterates are where the steps go on from it, so they differ from it for fooled examples."""
    model, x, g = _random_linear(40, seed=3)
    with torch.no_grad():
        y = model(x).argmax(1)
    base = 0.08 if norm == "linf" else 0.5
    eps = torch.full((40,), base) if shared_radius else base * (0.5 + torch.rand(40, generator=g))
    early = PGD(model, norm=norm, steps=10, seed=2)(x, y, eps=eps)
    full = PGD(model, norm=norm, steps=10, seed=2, early_stop=False)(x, y, eps=eps)
    assert 0 < early.success.sum() < 40
    assert torch.equal(early.success, full.success)
    assert torch.equal(early.x_adv, full.x_adv)
    assert (early.forwards[early.success] < 12).any()  # some are fooled before the last step (clean check + 11) ...
    moved_on = (full.x_last != full.x_adv).flatten(1).any(1)
    assert moved_on[full.success].any()  # ... and the full run's last iterate went on from there
    assert (full.forwards == 12).all() and (full.backwards == 10).all()


def test_attack_all_attacks_every_example_as_madry():
    """With ``attack_all`` and no early stopping, PGD ascends the loss from every example, those the model already
    misclassifies included (Madry et al. attack the whole batch): ``x_last`` equals a hand-written PGD loop from the
    same random start, while ``x_adv`` of an example fooled clean stays the clean input. Without ``attack_all`` those
    examples are left as they are."""
    model, x, g = _random_linear(30, seed=4)
    y = torch.randint(0, 5, (30,), generator=g)  # random labels: many misclassified clean
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    assert 5 < wrong.sum() < 30
    eps, steps, seed = 0.05, 7, 11
    res = PGD(model, eps=eps, steps=steps, seed=seed, early_stop=False, attack_all=True)(x, y)
    skipped = PGD(model, eps=eps, steps=steps, seed=seed, early_stop=False)(x, y)  # the default leaves them out
    assert torch.equal(skipped.x_last[wrong], x[wrong]) and (skipped.forwards[wrong] == 1).all()

    gen = torch.Generator().manual_seed(seed)  # the reference: Madry's loop, no bookkeeping, out of place
    e32 = torch.tensor(eps)  # the radius and the step length in float32, as the attack holds them
    alpha = float(2.5 / steps * e32)
    delta = (2 * torch.rand(x.shape, generator=gen) - 1) * e32
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        xa = (x + delta).requires_grad_(True)
        grad = torch.autograd.grad(nn.functional.cross_entropy(model(xa), y), xa)[0]
        delta = (delta + alpha * grad.sign()).clamp(-float(e32), float(e32))
        delta = (x + delta).clamp(0, 1) - x
    assert torch.equal(res.x_last, x + delta)  # bit for bit: the fused and in-place operations round as these do
    assert (res.x_last[wrong] != x[wrong]).flatten(1).any(1).all()  # the misclassified moved too
    assert torch.equal(res.x_adv[wrong], x[wrong]) and res.success[wrong].all()
    assert (res.forwards == steps + 2).all()  # the clean check, the steps, the final verdict


def test_inputs_that_require_grad_raise_no_warning():
    """The input check reads values back from the batch; a batch that requires grad must not make torch warn."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(4, 1, 4, 4, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = PGD(model, eps=0.1, steps=2)(x, torch.zeros(4, dtype=torch.long))
    assert res.x_adv.isfinite().all()


def test_random_start_is_finite_at_any_finite_radius():
    """The L-inf start is (2u - 1) eps: finite wherever eps is, even a radius whose double overflows float16."""
    eps = torch.full((64,), 40000.0, dtype=torch.float16)
    start = random_in_ball(torch.zeros(64, 1, 4, 4, dtype=torch.float16), eps, Norm.LINF, torch.Generator())
    assert start.isfinite().all() and (start.abs() <= 40000.0).all()
