"""GOT (seed 001): the OT term against numpy, scipy and POT; the potential's ascent; finite gradients; short digits
runs; the architecture check; exact resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.optimize import minimize
from scipy.special import log_softmax, logsumexp

from kit.attacks import PGD
from kit.data import load_dataset
from kit.defenses import create_defense, list_defenses
from kit.defenses.got import c_transform, got_cost, label_mask, semi_dual, semi_dual_plan
from kit.defenses.trainer import TrainConfig, sidecar, train
from kit.errors import UserError
from tests.test_defenses import standard_robust_acc, test_batch  # noqa: F401  (shared fixtures)

THETA = 0.1


def _pairs(n: int = 8, m: int = 8, d: int = 5, k: int = 4, seed: int = 0, scale: float = 2.0):
    """Random clean and adversarial (latent, logits) in float64."""
    gen = torch.Generator().manual_seed(seed)
    z, za = torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(m, d, generator=gen, dtype=torch.float64)
    lg = scale * torch.randn(n, k, generator=gen, dtype=torch.float64)
    la = scale * torch.randn(m, k, generator=gen, dtype=torch.float64)
    return z, lg, za, la


def _numpy_cost(z, lg, za, la, lam):
    z, lg, za, la = (t.numpy() for t in (z, lg, za, la))
    cos = np.array([[zi @ zj / (np.linalg.norm(zi) * np.linalg.norm(zj)) for zj in za] for zi in z])
    lp, lq = log_softmax(lg, axis=1), log_softmax(la, axis=1)
    kl = np.array([[np.sum(np.exp(lpi) * (lpi - lqj)) for lqj in lq] for lpi in lp])
    return lam * (1 - cos) + kl


def _maximise_free_potential(cost: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The maximiser of the semi-dual over a free vector of potentials (L-BFGS on autograd gradients, float64)."""

    def negative(v):
        phi = torch.tensor(v, dtype=torch.float64, requires_grad=True)
        value = semi_dual(phi, cost, THETA, mask)
        (grad,) = torch.autograd.grad(value, phi)
        return -value.item(), -grad.numpy()

    res = minimize(negative, np.zeros(cost.shape[0]), jac=True, method="L-BFGS-B",
                   options={"maxiter": 10_000, "ftol": 1e-16, "gtol": 1e-13})
    assert np.abs(res.jac).max() < 1e-7, res.message  # the gradient is a - P1: the marginal error
    return torch.tensor(res.x, dtype=torch.float64)


def _pot_entropic(cost: np.ndarray) -> tuple[float, np.ndarray]:
    """POT's entropic OT (KL to the product of the uniform marginals, log-domain Sinkhorn): its value and plan."""
    import ot

    n, m = cost.shape
    a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    res = ot.solve(cost, a, b, reg=THETA, reg_type="KL", method="sinkhorn_log", max_iter=20_000, tol=1e-7)
    plan = np.asarray(res.plan)
    # the definition, from POT's plan, so that the test does not rest on POT's naming of its values alone
    definition = (plan * cost).sum() + THETA * (plan * np.log(plan / np.outer(a, b))).sum()
    assert float(res.value) == pytest.approx(definition, abs=1e-10)
    return float(res.value), plan


def test_registered():
    assert {"got-pgd", "got-trades"} <= set(list_defenses())
    assert create_defense("got-trades").params["alpha"] == 6.0
    assert create_defense("got-pgd", label_matching=True).params["beta"] == 10.0


# (a) the cost matrix ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [1.0, 2.5])
def test_cost_matches_numpy(lam):
    z, lg, za, la = _pairs(n=6, m=7)
    cost = got_cost(z, lg, za, la, lam)
    assert cost.shape == (6, 7)
    np.testing.assert_allclose(cost.numpy(), _numpy_cost(z, lg, za, la, lam), rtol=1e-10, atol=1e-12)
    # a point against itself costs nothing; the KL is taken clean-first (it is not symmetric)
    assert got_cost(z, lg, z, lg).diagonal().abs().max() < 1e-12
    swapped = got_cost(za[:6], la[:6], z, lg)
    assert not torch.allclose(swapped, cost[:, :6].T)


# (b) the soft-minimum -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [0.1, 0.01])
@pytest.mark.parametrize("matching", [False, True])
def test_c_transform_and_semi_dual_match_scipy_logsumexp(theta, matching):
    z, lg, za, la = _pairs(n=9, m=9, seed=1)
    cost = got_cost(z, lg, za, la)
    phi = torch.randn(9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    mask = label_mask(y, y[torch.tensor([3, 4, 5, 6, 7, 8, 0, 1, 2])]) if matching else None
    weights = (mask.numpy() if matching else np.ones((9, 9))) / 9  # 1/n on the kept pairs, 0 on the others
    expect = -theta * logsumexp((phi.numpy()[:, None] - cost.numpy()) / theta, axis=0, b=weights)
    np.testing.assert_allclose(c_transform(phi, cost, theta, mask).numpy(), expect, rtol=1e-12, atol=1e-12)
    value = semi_dual(phi, cost, theta, mask).item()
    assert value == pytest.approx(phi.numpy().mean() + expect.mean(), rel=1e-12, abs=1e-12)
    # a constant shift of the potential changes nothing (the bias of the linear potential is immaterial)
    assert semi_dual(phi + 3.7, cost, theta, mask).item() == pytest.approx(value, rel=1e-12, abs=1e-12)


# (c) the free potential at its maximum is the entropic OT value ---------------------------------------------------


def test_free_potential_semi_dual_equals_pot_entropic_ot():
    z, lg, za, la = _pairs(n=7, m=9, seed=3)
    cost = got_cost(z, lg, za, la)
    phi = _maximise_free_potential(cost)
    value, plan = _pot_entropic(cost.numpy())
    assert semi_dual(phi, cost, THETA).item() == pytest.approx(value, abs=1e-5)
    np.testing.assert_allclose(semi_dual_plan(phi, cost, THETA).numpy(), plan, atol=1e-6)
    # any other potential is a lower bound (weak duality), strictly below away from the maximiser
    assert semi_dual(torch.zeros(7, dtype=torch.float64), cost, THETA).item() < value - 1e-3


# (c, d) label matching: the masked problem, and zero mass on masked pairs ------------------------------------------


def test_label_matching_is_entropic_ot_restricted_to_equal_labels():
    z, lg, za, la = _pairs(n=12, m=12, seed=4)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 0, 2, 0, 1])  # class sizes 5, 4, 3
    y_adv = y[torch.randperm(12, generator=torch.Generator().manual_seed(5))]
    mask = label_mask(y, y_adv)
    cost = got_cost(z, lg, za, la)
    phi = _maximise_free_potential(cost, mask)
    # independent value: the plan splits into one entropic problem per class, of mass w_c = n_c / n, so
    # W = sum_c w_c W_c + theta * H(w) (the KL to a (x) b of a block-diagonal plan)
    c_np, yn, yan = cost.numpy(), y.numpy(), y_adv.numpy()
    expect = 0.0
    for c in np.unique(yn):
        rows, cols = np.flatnonzero(yn == c), np.flatnonzero(yan == c)
        w = len(rows) / 12
        expect += w * _pot_entropic(c_np[np.ix_(rows, cols)])[0] - THETA * w * np.log(w)
    assert semi_dual(phi, cost, THETA, mask).item() == pytest.approx(float(expect), abs=1e-5)
    # (d) the plan: exactly zero on pairs of different labels, marginals uniform at the maximiser
    plan = semi_dual_plan(phi, cost, THETA, mask)
    assert plan[~mask].abs().max().item() == 0.0
    np.testing.assert_allclose(plan.sum(0).numpy(), 1 / 12, atol=1e-12)
    np.testing.assert_allclose(plan.sum(1).numpy(), 1 / 12, atol=1e-8)
    # the gradient in the cost is the plan (envelope), so masked pairs get no gradient at all
    cost_g = cost.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(semi_dual(phi, cost_g, THETA, mask), cost_g)
    np.testing.assert_allclose(grad.numpy(), plan.numpy(), atol=1e-14)
    assert grad[~mask].abs().max().item() == 0.0
    # without the mask the same potentials move mass across labels
    assert semi_dual_plan(phi, cost, THETA)[~mask].sum().item() > 1e-3


def test_semi_dual_rejects_an_adversarial_point_without_its_label():
    cost = torch.rand(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="no clean example of its label"):
        semi_dual(torch.zeros(3, dtype=torch.float64), cost, THETA, label_mask(torch.tensor([0, 0, 1]),
                                                                               torch.tensor([0, 1, 2])))


# the potential's ascent and the gradients -------------------------------------------------------------------------


def test_phi_steps_raise_the_semi_dual_towards_the_entropic_ot(digits_model):
    from kit.checkpoint import load_twin

    model = load_twin(digits_model[0])[0]
    t = load_dataset("digits:16", "test").subset(64)
    defense = create_defense("got-pgd", eps=0.1, steps=3, phi_steps=10)
    defense.setup(model)  # a probe forward gives the latent size: the potential exists before the first batch
    assert defense.phi is not None and defense.phi.in_features == model.feature_dim
    torch.manual_seed(0)
    x_adv = defense.adversarial(model, t.x, t.y)
    with torch.no_grad():
        z, z_adv = model.features(t.x), model.features(x_adv)
        cost = got_cost(z, model.logits_from_features(z), z_adv, model.logits_from_features(z_adv))
    start = semi_dual(defense.potential(z), cost, THETA).item()
    before, after = defense.phi_step(z, cost, None)
    assert before == pytest.approx(start, rel=1e-6)
    assert after == pytest.approx(semi_dual(defense.potential(z), cost, THETA).item(), rel=1e-6)
    assert after > before + 1e-4, (before, after)
    # still a lower bound (weak duality) of the primal at any coupling, e.g. each adversarial example sent to its own
    # clean example, P = I / n: <P, C> + theta KL(P || a (x) b) = mean_i C_ii + theta log n
    assert after <= cost.diagonal().mean().item() + THETA * math.log(64) + 1e-6


@pytest.mark.parametrize("matching", [False, True])
def test_gradients_are_finite_on_confident_logits(matching):
    z, lg, za, la = (t.float().requires_grad_(True) for t in _pairs(n=16, m=16, d=10, k=10, seed=6))
    y = torch.arange(16) % 4
    mask = label_mask(y, y) if matching else None
    cost = got_cost(z, 100 * lg, za, 100 * la)  # softmax saturates: probabilities of exactly 0 in float32
    phi = torch.randn(16, generator=torch.Generator().manual_seed(7), requires_grad=True)
    value = semi_dual(phi, cost, THETA, mask)
    grads = torch.autograd.grad(value, [z, lg, za, la, phi])
    assert torch.isfinite(cost).all() and torch.isfinite(value)
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads[:4])


def test_defense_loss_backpropagates_finitely_on_a_confident_model(digits_model):
    from kit.checkpoint import load_twin

    model = load_twin(digits_model[0])[0]
    with torch.no_grad():
        model.head.weight.mul_(100)
        model.head.bias.mul_(100)
    t = load_dataset("digits:16", "test").subset(32)
    defense = create_defense("got-trades", eps=0.1, steps=2, label_matching=True)
    defense.setup(model)
    phi_before = defense.phi.weight.detach().clone()
    model.train()
    loss, parts = defense.loss(model, t.x, t.y)
    loss.backward()
    assert torch.isfinite(loss) and all(np.isfinite(v) for v in parts.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert defense.phi.weight.grad is None  # the model's step does not reach the potential ...
    assert not torch.equal(defense.phi.weight, phi_before)  # ... which took its own ascent step


# short runs on digits ---------------------------------------------------------------------------------------------

VARIANTS = [("got-pgd", False), ("got-pgd", True), ("got-trades", False), ("got-trades", True)]


def _run(tmp_path, defense: str, matching: bool, epochs: int, **extra):
    # beta = 1: on digits from scratch with SGD at lr 0.05 the paper's beta = 10 collapses the latent (docs/defenses.md)
    params = {"eps": 0.1, "steps": 3, "beta": 1.0, "label_matching": matching, **extra}
    cfg = TrainConfig(defense=defense, arch="cnn-small", data="digits:16", epochs=epochs, seed=0, eval_samples=100,
                      defense_params=params)
    return train(cfg, tmp_path / f"{defense}-{matching}.safetensors")


@pytest.mark.parametrize(("defense", "matching"), VARIANTS)
def test_short_training_learns(tmp_path, defense, matching):
    result = _run(tmp_path, defense, matching, epochs=2, steps=1)
    last = result.history[-1]
    assert all(np.isfinite(last[k]) for k in ("loss", "got_w"))
    assert last["test_acc"] > 0.4, last  # chance is 0.1
    assert result.info.defense == defense


@pytest.mark.slow
@pytest.mark.parametrize(("defense", "matching"), VARIANTS)
def test_got_buys_robustness(tmp_path, defense, matching, test_batch, standard_robust_acc):  # noqa: F811
    result = _run(tmp_path, defense, matching, epochs=4)
    x, y = test_batch
    with torch.no_grad():
        clean = (result.model(x).argmax(1) == y).float().mean().item()
    robust = PGD(result.model, eps=0.1, steps=20)(x, y).robust_accuracy
    assert clean > 0.8
    assert robust > standard_robust_acc + 0.15, (defense, matching, robust, standard_robust_acc)


# architecture, parameters, resume ---------------------------------------------------------------------------------


class _NoLatent(nn.Module):
    def __init__(self, num_classes: int = 10, input_shape=(1, 16, 16)) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))

    def forward(self, x):
        return self.net(x)


class _LatentNoShape(nn.Module):
    """Has the latent split but no ``input_shape``: the potential is created at the first batch."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Flatten(), nn.Linear(256, 12), nn.ReLU()), nn.Linear(12, 10)

    def features(self, x):
        return self.body(x)

    def logits_from_features(self, z):
        return self.head(z)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("defense", ["got-pgd", "got-trades"])
def test_incompatible_architecture_is_a_user_error(tmp_path, defense):
    with pytest.raises(UserError, match=f"{defense}.*incompatible architecture _NoLatent"):
        create_defense(defense).setup(_NoLatent())
    # through the trainer, as `otkit train --arch file.py:Factory` reaches it
    arch = tmp_path / "plain.py"
    arch.write_text("import torch.nn as nn\n\n\ndef Plain(num_classes, input_shape):\n"
                    "    return nn.Sequential(nn.Flatten(), nn.Linear(256, num_classes))\n")
    with pytest.raises(UserError, match="incompatible architecture"):
        train(TrainConfig(defense=defense, arch=f"{arch}:Plain", data="digits:16", epochs=1),
              tmp_path / "m.safetensors")


def test_potential_is_created_lazily_without_an_input_shape():
    defense = create_defense("got-pgd", eps=0.1, steps=1)
    model = _LatentNoShape()
    defense.setup(model)
    assert defense.phi is None and defense.state_dict() == {}
    t = load_dataset("digits:16", "test").subset(16)
    loss, _ = defense.loss(model, t.x, t.y)
    assert torch.isfinite(loss) and defense.phi.in_features == 12
    again = create_defense("got-pgd", eps=0.1, steps=1)
    again.setup(_LatentNoShape())
    again.load_state_dict(defense.state_dict())  # resume creates it from the saved weights
    assert torch.equal(again.phi.weight, defense.phi.weight)


@pytest.mark.parametrize(("key", "value"), [("label_matching", "yes"), ("theta", 0.0), ("beta", -1.0),
                                            ("phi_steps", 0), ("phi_lr", float("nan")), ("ramp_epochs", -1),
                                            ("ramp_epochs", 1.5)])
def test_bad_parameters_are_user_errors(digits_model, key, value):
    from kit.checkpoint import load_twin

    with pytest.raises(UserError, match=f"got-trades.*{key}"):
        create_defense("got-trades", **{key: value}).setup(load_twin(digits_model[0])[0])


def test_resume_restores_the_potential_exactly(tmp_path):
    base = dict(defense="got-trades", arch="cnn-small", data="digits:16", batch_size=128, seed=1, eval_samples=50,
                defense_params={"eps": 0.1, "steps": 1, "beta": 1.0, "label_matching": True})
    straight = train(TrainConfig(epochs=2, **base), tmp_path / "straight.safetensors")
    part = tmp_path / "part.safetensors"

    def interrupt(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(epochs=2, **base), part, on_epoch=interrupt)
    resumed = train(TrainConfig(epochs=2, **base), part, resume=True)
    assert resumed.info.weights_sha256 == straight.info.weights_sha256
    a = torch.load(sidecar(straight.path, "resume.pt"), weights_only=True)["defense"]
    b = torch.load(sidecar(part, "resume.pt"), weights_only=True)["defense"]
    for k in ("weight", "bias"):
        assert torch.equal(a["phi"][k], b["phi"][k])
    sa, sb = a["phi_opt"]["state"], b["phi_opt"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][s], sb[i][s]) for i in sa for s in sa[i])
    # the potential took one Adam step per batch (phi_steps = 1), over both epochs, in the resumed run too
    batches = math.ceil(straight.info.dataset["n_train"] / 128)
    assert int(sa[0]["step"]) == 2 * batches


def test_warm_up_ramps_eps_and_beta(digits_model):
    """With ``ramp_epochs`` R, epoch e (0-based) trains as the same defense at ε and β scaled by min(1, (e+1)/R):
    the loss equals, bit for bit, that of a defense created with the scaled values and no warm-up (same potential,
    same adversarial start); the PGD adversary's radius (which the held-out evaluation copies) follows."""
    from kit.checkpoint import load_twin

    model = load_twin(digits_model[0])[0].train()
    t = load_dataset("digits:16", "test").subset(16)
    pgd = create_defense("got-pgd", eps=0.2, steps=2, ramp_epochs=4)
    pgd.setup(model)
    seen = []
    for epoch in range(6):
        pgd.start_epoch(epoch, 6)
        seen.append((pgd.ramp, pgd.madry.adversary.eps))
    assert seen == [(f, 0.2 * f) for f in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)]

    def loss(defense):
        torch.manual_seed(1)
        defense.setup(model)
        defense.start_epoch(1, 10)
        torch.manual_seed(2)
        return defense.loss(model, t.x, t.y)[0]

    for name in ("got-pgd", "got-trades"):
        ramped = loss(create_defense(name, eps=0.2, beta=10.0, steps=2, ramp_epochs=4))  # factor 0.5
        scaled = loss(create_defense(name, eps=0.2 * 0.5, beta=10.0 * 0.5, steps=2))
        full = loss(create_defense(name, eps=0.2, beta=10.0, steps=2))
        assert torch.equal(ramped, scaled) and not torch.equal(ramped, full)
