"""Wasserstein adversarial training (``wat``): the paper's radius schedule by hand, the adversary's outputs inside the
Wasserstein ball (POT's exact OT), the first-adversarial rule, a short run on digits and an exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kit.checkpoint import load_twin
from kit.data import load_dataset
from kit.defenses import create_defense
from kit.defenses.trainer import TrainConfig, sidecar, train
from kit.defenses.wat import radius_schedule, schedule_cap
from kit.errors import UserError
from kit.ot.local import exact_local_wasserstein
from models import create

# The paper's training adversaries (Appendix B, as in the authors' released scripts): 50 steps, radius x growth every
# 5 steps. Written out by hand, not computed with the same formula.
MNIST_LEVELS = [0.1, 0.14, 0.196, 0.2744, 0.38416, 0.537824, 0.7529536, 1.05413504, 1.475789056, 2.0661046784]
CIFAR_LEVELS = [0.01, 0.015, 0.0225, 0.03375, 0.050625, 0.0759375, 0.11390625, 0.170859375, 0.2562890625,
                0.384433593750]


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(params: dict, channels: int = 1):
    model = create("cnn-small", num_classes=10, input_shape=(channels, 16, 16))
    wat = create_defense("wat", **params)
    wat.setup(model)
    return wat


def test_radius_schedule_is_the_papers():
    mnist = radius_schedule(50, 0.1, 1.4, 5)
    assert mnist == pytest.approx([v for v in MNIST_LEVELS for _ in range(5)], rel=1e-12)
    cifar = radius_schedule(50, 0.01, 1.5, 5)
    assert cifar == pytest.approx([v for v in CIFAR_LEVELS for _ in range(5)], rel=1e-12)
    assert schedule_cap(50, 0.1, 1.4, 5) == pytest.approx(2.0661046784)
    # a cap binds from the first level above it on
    assert radius_schedule(12, 0.1, 1.4, 4, cap=0.15) == pytest.approx([0.1] * 4 + [0.14] * 4 + [0.15] * 4)


def test_presets_resolve_by_channels_and_the_ramp_follows_the_epoch():
    grey = _setup({})
    assert (grey.params["preset"], grey.params["eps0"], grey.params["eps_factor"]) == ("mnist", 0.1, 1.4)
    assert grey.cap() == pytest.approx(2.0661046784)
    assert grey.radii() == pytest.approx([v for v in MNIST_LEVELS for _ in range(5)])
    colour = _setup({}, channels=3)
    assert (colour.params["preset"], colour.params["eps0"], colour.params["eps_factor"]) == ("cifar", 0.01, 1.5)
    assert colour.cap() == pytest.approx(0.38443359375)
    assert _setup({"eps0": 0.2}, channels=3).params["eps0"] == 0.2  # explicit values beat the preset

    ramped = _setup({"ramp_epochs": 4, "eps": 1.0})
    caps = []
    for epoch in (3, 0, 1, 2, 9):  # any order: a pure function of the epoch
        ramped.start_epoch(epoch, 10)
        caps.append(ramped.cap())
        assert ramped.adversary.eps == pytest.approx(ramped.cap())
    assert caps == pytest.approx([1.0, 0.25, 0.5, 0.75, 1.0])
    ramped.start_epoch(0, 10)
    assert ramped.radii()[:6] == pytest.approx([0.1] * 5 + [0.14])
    ramped.start_epoch(1, 10)  # cap 0.5: levels 0.1 .. 0.38416, then 0.5
    assert ramped.radii()[20:31] == pytest.approx([0.38416] * 5 + [0.5] * 6)


@pytest.mark.parametrize(("params", "match"), [
    ({"preset": "svhn"}, "preset"), ({"fallback": "random"}, "fallback"), ({"ramp_epochs": -1}, "ramp_epochs"),
    ({"eps": -0.5}, "eps"), ({"eps_factor": 0.9}, "eps_factor"), ({"steps": 0}, "steps"), ({"radius": 1}, "radius"),
])
def test_bad_parameters_are_user_errors(params, match):
    with pytest.raises(UserError, match=match):
        _setup(params)


@pytest.mark.parametrize("fallback", ["last", "clean"])
def test_adversary_stays_in_the_ball_and_trains_on_the_first_adversarial(digits_model, fallback):
    model = load_twin(digits_model[0])[0]
    ds = load_dataset("digits:16", "test")
    x, y = ds.x[:16], ds.y[:16]
    wat = create_defense("wat", eps0=0.05, eps_factor=2.0, eps_every=2, steps=6, proj_iter=20, fallback=fallback)
    wat.setup(model)
    levels = [0.05, 0.1, 0.2]
    assert wat.radii() == pytest.approx([0.05, 0.05, 0.1, 0.1, 0.2, 0.2])
    x_train, res = wat.adversarial(model, x, y)
    assert model.training is False  # the attack restores the model's mode

    assert x_train.min() >= 0 and x_train.max() <= 1
    torch.testing.assert_close(x_train.sum((2, 3)), x.sum((2, 3)), rtol=1e-5, atol=0)  # transport keeps the mass
    with torch.no_grad():
        clean_pred, pred = model(x).argmax(1), model(x_train).argmax(1)
    fooled = res.success & (clean_pred == y)  # fooled by the attack (not already wrong)
    never = ~res.success
    assert fooled.any() and never.any(), (fooled, never)
    # the radius at success is one of the schedule's levels, and the example trained on is adversarial
    for e in res.eps_success[fooled].tolist():
        assert min(abs(e - lv) for lv in levels) < 1e-6, e
    assert (pred[fooled] != y[fooled]).all()
    torch.testing.assert_close(x_train[fooled], res.x_adv[fooled])
    if fallback == "clean":
        assert torch.equal(x_train[never], x[never])
    else:
        torch.testing.assert_close(x_train[never], res.x_last[never])
        assert (x_train[never] != x[never]).flatten(1).any(1).all()
    assert torch.equal(x_train[clean_pred != y], x[clean_pred != y])

    # inside the ball: the exact OT distance (POT, unit-mass scale) is at most the radius that produced the point
    bound = torch.where(fooled, res.eps_success, torch.full_like(res.eps_success, wat.cap())).double()
    moved = (x_train != x).flatten(1).any(1)
    m = x[moved].sum((1, 2, 3)).double().view(-1, 1, 1, 1)
    exact = exact_local_wasserstein(x[moved].double() / m, x_train[moved].double() / m, 5)
    assert (exact > 0).all()
    assert (exact <= bound[moved] * (1 + 1e-4) + 1e-7).all(), (exact, bound[moved])
    assert (res.norm[fooled].double() <= res.eps_success[fooled].double() * (1 + 1e-3)).all()


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory):
    """digits:16 cut to 320 train / 128 test images, as an npz (so a WAT epoch takes seconds)."""
    train_set, test_set = load_dataset("digits:16", "train"), load_dataset("digits:16", "test")
    path = tmp_path_factory.mktemp("wat") / "digits16.npz"
    np.savez(path, x_train=train_set.x[:320].numpy(), y_train=train_set.y[:320].numpy(),
             x_test=test_set.x[:128].numpy(), y_test=test_set.y[:128].numpy())
    return f"npz:{path}"


def test_short_run_is_finite_above_chance_and_resumes_exactly(small_digits, tmp_path):
    # ramp over 3 epochs: the caps of epochs 0 and 1 differ, so a resume that forgot start_epoch would diverge
    params = {"steps": 2, "eps_every": 1, "proj_iter": 10, "ramp_epochs": 3}
    base = dict(defense="wat", data=small_digits, batch_size=32, lr=0.1, seed=1, eval_samples=128,
                eval_adv_samples=32, defense_params=params)
    straight = train(TrainConfig(epochs=2, **base), tmp_path / "straight.safetensors")
    part = tmp_path / "part.safetensors"
    train(TrainConfig(epochs=1, **base), part)
    resumed = train(TrainConfig(epochs=2, **base), part, resume=True)
    assert resumed.info.weights_sha256 == straight.info.weights_sha256
    untimed = lambda hist: [{k: v for k, v in rec.items() if k != "seconds"} for rec in hist]  # noqa: E731
    assert untimed(resumed.history) == untimed(straight.history)

    first, last = straight.history
    full_cap = 0.14  # 0.1 * 1.4 after one growth (2 steps, growth every step)
    assert first["eps_cap"] == pytest.approx(full_cap / 3) and last["eps_cap"] == pytest.approx(2 * full_cap / 3)
    assert 0 < first["adv_found"] <= 1
    for rec in straight.history:
        assert all(np.isfinite(v) for k, v in rec.items() if isinstance(v, float))
        assert 0 <= rec["test_adv_acc"] <= 1 and rec["test_adv_attack"] == "WassersteinPGD"
    assert last["test_acc"] > 0.3, last  # chance is 0.1
    cfg = json.loads(sidecar(part, "config.json").read_text())
    assert cfg["defense_params"]["eps0"] == 0.1 and cfg["defense_params"]["preset"] == "mnist"
    assert cfg["augment"] == "none"
