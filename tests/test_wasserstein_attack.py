"""The projected-Sinkhorn PGD attack on the digits model: success, true radii (POT's exact OT), protocol, accounting."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from kit.attacks.base import Norm
from kit.attacks.wasserstein import WassersteinPGD, WassersteinResult
from kit.checkpoint import load_twin
from kit.data import load_dataset
from kit.errors import UserError
from kit.ot.local import exact_local_wasserstein

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def model_and_data(digits_model):
    model = load_twin(digits_model[0])[0]
    ds = load_dataset("digits:16", "test")
    return model, ds.x[:32], ds.y[:32]


def _check_true_radii(x, r, eps, k=5, max_check=8):
    """Every returned point: in [0, 1], channel masses kept, norm <= eps (1 + 1e-3), exact distance <= norm."""
    assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    torch.testing.assert_close(r.x_adv.sum((2, 3)), x.sum((2, 3)), rtol=1e-5, atol=0)
    assert (r.norm <= eps * (1 + 1e-3)).all()
    moved = (r.x_adv != x).flatten(1).any(1).nonzero().squeeze(1)[:max_check]
    assert moved.numel() > 0
    m = x[moved].sum((1, 2, 3)).double().view(-1, 1, 1, 1)
    exact = exact_local_wasserstein(x[moved].double() / m, r.x_adv[moved].double() / m, k)
    assert (exact <= r.norm[moved].double() * (1 + 1e-5) + 1e-7).all(), (exact, r.norm[moved])
    assert (exact > 0).all()


def test_attack_fools_the_standard_model_at_moderate_eps_with_true_radii(model_and_data):
    model, x, y = model_and_data
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    assert clean > 0.8
    attack = WassersteinPGD(model, eps=0.5, steps=20)
    assert attack.norm is Norm.WASSERSTEIN
    r = attack(x, y)
    assert isinstance(r, WassersteinResult)
    assert r.robust_accuracy <= 0.1, r.robust_accuracy
    with torch.no_grad():
        pred = model(r.x_adv).argmax(1)
    assert ((pred != y) == r.success).all()
    _check_true_radii(x, r, 0.5)
    # accounting: one clean forward each; a fooled-in-the-loop example has one more forward than backward per step
    clean_wrong = r.eps_success == 0
    assert (r.forwards[clean_wrong] == 1).all() and (r.backwards[clean_wrong] == 0).all()
    attacked = ~clean_wrong & r.success
    assert (r.forwards[attacked] == r.backwards[attacked] + 2).all()
    assert (r.projection_iters[attacked] > 0).all()
    assert (r.norm[clean_wrong] == 0).all()


def test_growing_radius_protocol_records_eps_at_success(model_and_data):
    model, x, y = model_and_data
    x, y = x[:12], y[:12]
    attack = WassersteinPGD(model, eps=2.0, eps0=0.05, eps_factor=2.0, eps_every=2, steps=12, proj_iter=30)
    r = attack(x, y)
    assert r.robust_accuracy <= 0.1
    found = r.success & (r.eps_success > 0)
    assert found.any()
    # radii on the schedule eps0 * 2^j, capped at 2, and each returned point within its own radius
    j = torch.log2(r.eps_success[found] / 0.05)
    assert torch.allclose(j, j.round(), atol=1e-4)
    assert (r.norm[found] <= r.eps_success[found] * (1 + 1e-3)).all()
    assert (r.eps_success[found] <= 2.0).all()
    assert r.eps_success[found].max() > 0.05  # some example needed the radius to grow
    _check_true_radii(x, r, 2.0)
    # a fixed small radius fools fewer
    fixed = WassersteinPGD(model, eps=0.05, steps=12, proj_iter=30)(x, y)
    assert fixed.success.sum() < r.success.sum()


def test_per_example_eps_l2_steps_and_no_early_stop(model_and_data):
    model, x, y = model_and_data
    x, y = x[:6], y[:6]
    eps = torch.tensor([0.0, 0.3, 0.3, 1.0, 1.0, 0.1])
    r = WassersteinPGD(model, steps=5, step=1.0, step_norm="l2", early_stop=False)(x, y, eps=eps)
    assert torch.equal(r.x_adv[0], x[0]) and r.norm[0] == 0
    assert (r.norm <= eps * (1 + 1e-3)).all()
    assert r.x_last is not None and r.x_last.shape == x.shape
    torch.testing.assert_close(r.x_last.sum((2, 3)), x.sum((2, 3)), rtol=1e-5, atol=0)
    assert ((r.forwards[1:] == 7) | (r.eps_success[1:] == 0)).all()  # clean + 5 steps + final, on every example


def test_warm_start_init_inside_the_ball_is_kept(model_and_data):
    model, x, y = model_and_data
    x, y = x[:6], y[:6]
    first = WassersteinPGD(model, eps=0.2, steps=10)(x, y)
    hit = first.success & (first.eps_success > 0)
    assert hit.any()
    # an init inside the (larger) ball is used as is: fooled at the first evaluation, without a gradient step
    again = WassersteinPGD(model, eps=0.4, steps=3)(x, y, init=first.x_adv)
    assert again.success[hit].all()
    assert (again.backwards[hit] == 0).all() and (again.forwards[hit] == 2).all()
    assert (again.x_adv[hit] - first.x_adv[hit]).abs().max() <= 1e-3
    assert (again.norm[hit] <= 0.4 * (1 + 1e-3)).all()


class _NaNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16 * 16, 10)

    def forward(self, x):
        return self.lin(x.flatten(1)) * torch.sqrt(x.flatten(1).sum(1, keepdim=True) - 1e9)


@pytest.mark.parametrize("kwargs", [dict(norm="linf"), dict(steps=0.5), dict(step=0.0), dict(step_norm="wasserstein"),
                                    dict(eps=-1.0), dict(eps0=-0.1), dict(eps_factor=1.0), dict(kernel_size=4),
                                    dict(loss="hinge"), dict(proj_iter=0)])
def test_bad_parameters_are_user_errors(model_and_data, kwargs):
    model = model_and_data[0]
    with pytest.raises(UserError):
        WassersteinPGD(model, **kwargs)


def test_bad_inputs_and_non_finite_gradients_are_user_errors(model_and_data):
    model, x, y = model_and_data
    attack = WassersteinPGD(model, eps=0.3, steps=2)
    with pytest.raises(UserError):
        attack(x[:2] * 2, y[:2])  # not in [0, 1]
    with pytest.raises(UserError):
        attack(x[:2], y[:2], eps=torch.tensor([0.1, -0.1]))
    nan_model = _NaNModel()
    with pytest.raises(UserError, match="gradients"):
        WassersteinPGD(nan_model, eps=0.3, steps=2)(x[:2], torch.tensor([0, 1]))
