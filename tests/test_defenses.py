"""Baseline defenses: their losses against hand computations, and short digits runs that buy real robustness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kit.attacks import PGD
from kit.data import load_dataset
from kit.defenses import create_defense
from kit.defenses.atda import coral_l1, mmd_l1
from kit.defenses.trades import kl_adversary, kl_div_logits
from kit.defenses.trainer import TrainConfig, train
from kit.errors import UserError


def test_mmd_and_coral_match_numpy():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randn(16, 5, generator=gen, dtype=torch.float64)
    an, bn = a.numpy(), b.numpy()
    assert mmd_l1(a, b).item() == pytest.approx(np.abs(an.mean(0) - bn.mean(0)).sum() / 5)
    assert coral_l1(a, b).item() == pytest.approx(np.abs(np.cov(an.T) - np.cov(bn.T)).sum() / 25)
    assert coral_l1(a, a).item() == 0 and mmd_l1(a, a).item() == 0


def test_kl_from_logits_matches_the_definition_and_stays_finite():
    gen = torch.Generator().manual_seed(1)
    z, w = torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randn(4, 6, generator=gen, dtype=torch.float64)
    p, q = z.softmax(1).numpy(), w.softmax(1).numpy()
    assert kl_div_logits(z, w).item() == pytest.approx((p * np.log(p / q)).sum(1).mean())
    confident = torch.tensor([[1e4, -1e4, 0.0]], requires_grad=True)
    other = torch.tensor([[-1e4, 1e4, 0.0]])
    value = kl_div_logits(confident, other)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(confident.grad).all()


def test_trades_adversary_stays_in_the_ball_and_raises_the_kl(digits_model):
    from kit.checkpoint import load_twin

    model = load_twin(digits_model[0])[0]
    x = load_dataset("digits:16", "test").subset(64).x
    torch.manual_seed(0)
    x_adv = kl_adversary(model, x, eps=0.1, steps=10, rel_step=0.25)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean = model(x)
        noise = (x + 0.1 * torch.sign(torch.randn_like(x))).clamp(0, 1)
        assert kl_div_logits(clean, model(x_adv)) > 5 * kl_div_logits(clean, model(noise))
    assert model.training is False


@pytest.fixture(scope="module")
def test_batch():
    t = load_dataset("digits:16", "test").subset(200)
    return t.x, t.y


@pytest.fixture(scope="module")
def standard_robust_acc(digits_model, test_batch):
    from kit.checkpoint import load_twin

    model = load_twin(digits_model[0])[0]
    return PGD(model, eps=0.1, steps=20)(*test_batch).robust_accuracy


@pytest.mark.slow
@pytest.mark.parametrize("defense", ["madry", "mixed", "trades", "atda", "sat"])
def test_adversarial_training_buys_robustness(defense, tmp_path, test_batch, standard_robust_acc):
    params = {"eps": 0.1, "steps": 3}
    cfg = TrainConfig(defense=defense, arch="cnn-small", data="digits:16", epochs=4, seed=0, eval_samples=100,
                      defense_params=params)
    result = train(cfg, tmp_path / f"{defense}.safetensors")
    x, y = test_batch
    clean = (result.model(x).argmax(1) == y).float().mean().item()
    robust = PGD(result.model, eps=0.1, steps=20)(x, y).robust_accuracy
    assert clean > 0.85
    # a standard model keeps ~10-20% at eps 0.1 on digits; adversarial training keeps far more
    assert robust > standard_robust_acc + 0.25, (defense, robust, standard_robust_acc)
    parts = result.history[-1]
    assert parts["test_adv_attack"] == "PGD" and parts["test_adv_n"] == 100
    assert all(np.isfinite(v) for k, v in parts.items() if k != "test_adv_attack")


def test_mixed_with_zero_adversarial_weight_is_standard_cross_entropy(digits_model, test_batch):
    from kit.checkpoint import load_twin

    model = load_twin(digits_model[0])[0]
    x, y = test_batch[0][:32], test_batch[1][:32]
    mixed = create_defense("mixed", eps=0.1, steps=1, adv_weight=0.0)
    mixed.setup(model)
    loss, _ = mixed.loss(model, x, y)
    assert loss.item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)


def _otc(defense, tmp_path, **params):
    cfg = TrainConfig(defense=defense, arch="otc", data="digits:16", epochs=4, seed=0, optimizer="adam", lr=1e-3,
                      eval_samples=100, defense_params=params)
    return train(cfg, tmp_path / f"{defense}.safetensors")


@pytest.mark.slow
def test_otc_matches_the_latent_to_the_prior_and_keeps_the_critic_clipped(tmp_path, test_batch):
    x, y = test_batch
    plain, otc = _otc("standard", tmp_path), _otc("otc", tmp_path)
    for p in otc.model.critic.parameters():
        assert p.abs().max() <= 0.01 + 1e-7
    with torch.no_grad():
        z_plain, z_otc = plain.model.features(x), otc.model.features(x)
    # the critic pulls the codes towards N(0, I): their mean moves to the origin and their spread shrinks
    assert z_otc.mean(0).norm() < 0.5 * z_plain.mean(0).norm()
    assert (z_otc.std(0) - 1).abs().mean() < (z_plain.std(0) - 1).abs().mean()
    assert (otc.model(x).argmax(1) == y).float().mean() > 0.85
    assert "critic_gap" in otc.history[-1]


@pytest.mark.slow
def test_otc_adv_buys_robustness(tmp_path, test_batch, standard_robust_acc):
    result = _otc("otc-adv", tmp_path, eps=0.1, steps=3)
    assert PGD(result.model, eps=0.1, steps=20)(*test_batch).robust_accuracy > standard_robust_acc + 0.25


def test_otc_needs_the_otc_architecture(tmp_path):
    from kit.errors import UserError

    with pytest.raises(UserError, match="--arch otc"):
        train(TrainConfig(defense="otc", arch="cnn-small", data="digits:16", epochs=1), tmp_path / "m.safetensors")


def test_sat_divergence_matches_pot_debiased_entropic_ot():
    import ot

    gen = torch.Generator().manual_seed(3)
    clean = torch.randn(12, 10, generator=gen, dtype=torch.float64) * 3
    adv = clean + torch.randn(12, 10, generator=gen, dtype=torch.float64)
    sat = create_defense("sat", sinkhorn_iters=2000)

    def w(a, b):
        return ot.solve_sample(a, b, reg=1.0, reg_type="KL", max_iter=20000, tol=1e-12).value

    expect = w(clean, adv) - 0.5 * w(clean, clean) - 0.5 * w(adv, adv)
    div, converged = sat.divergence(clean, adv)
    assert converged and div.item() == pytest.approx(float(expect), rel=1e-6, abs=1e-8)
    assert sat.divergence(clean, clean)[0].abs().item() < 1e-8


def test_unbalanced_at_loss_is_the_seed_objective(digits_model, test_batch):
    from kit.checkpoint import load_twin

    model = load_twin(digits_model[0])[0]
    x, y = test_batch[0][:16], test_batch[1][:16]
    defense = create_defense("unbalanced-at", steps=2, max_iter=30)
    defense.setup(model)
    torch.manual_seed(5)
    loss, parts = defense.loss(model, x, y)
    # recompute independently: the same noise draw, the same (deterministic) adversary, then the seed's formula
    torch.manual_seed(5)
    x_noisy = (x + 0.01 * torch.randn_like(x)).clamp(0, 1)
    x_adv = defense.adversarial(x_noisy, y)
    assert (x_adv - x_noisy).abs().amax() > 0 and x_adv.min() >= 0 and x_adv.max() <= 1
    p, q = model(x_noisy).softmax(1), model(x_adv).softmax(1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    expect = 0.9 * F.cross_entropy(model(x_noisy), y) + 0.1 * kl
    assert loss.item() == pytest.approx(expect.item(), rel=1e-4)
    loss.backward()
    assert all(torch.isfinite(prm.grad).all() for prm in model.parameters() if prm.grad is not None)


@pytest.mark.parametrize("defense", ["madry", "mixed", "atda", "sat", "got-pgd"])
def test_attack_all_perturbs_the_examples_misclassified_clean(defense, digits_model, test_batch):
    """The PGD-trained defenses leave the examples their model misclassifies clean as they are by default, and attack
    them too with ``attack_all`` (Madry et al.'s training); a non-boolean value is refused."""
    from kit.checkpoint import load_twin

    model = load_twin(digits_model[0])[0]
    x, y = test_batch[0][:64], (test_batch[1][:64] + 1) % 10  # wrong labels: every example "misclassified"
    moved = {}
    for flag in (False, True):
        d = create_defense(defense, eps=0.1, steps=3, attack_all=flag)
        d.setup(model)
        adv = d.madry.adversarial(model, x, y) if defense == "got-pgd" else d.adversarial(model, x, y)
        moved[flag] = (adv != x).flatten(1).any(1)
        assert (adv - x).abs().max() <= 0.1 + 1e-6
    assert not moved[False].any() and moved[True].all()
    with pytest.raises(UserError, match="attack_all"):
        create_defense(defense, attack_all="yes").setup(model)
