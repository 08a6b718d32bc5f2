"""Square Attack: query accounting, gradient-free operation, the paper's search structure, and strength on digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from kit.attacks.base import lp_norm
from kit.attacks.pgd import PGD
from kit.attacks.square import Square, meta_pyramid, p_selection
from kit.data import load_dataset
from kit.errors import UserError


def _digits(n: int):
    test = load_dataset("digits:16", "test").subset(n)
    return test.x, test.y


def _reverify(model, x, y, res, eps, norm):
    """Independent re-check of every claimed adversarial: inside the ball, inside [0, 1], misclassified."""
    d = (res.x_adv - x).flatten(1)
    if norm == "linf":
        assert (d.abs().amax(1) <= eps + 1e-6).all()
    else:
        assert (d.norm(dim=1) <= eps * (1 + 1e-5)).all()
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    with torch.no_grad():
        pred = model(res.x_adv).argmax(1)
    assert torch.equal(pred != y, res.success)  # success is exactly "misclassified", for fooled and unfooled alike
    assert torch.equal(res.x_adv[~res.success], x[~res.success])  # nothing found: the clean input comes back


class Recorder(nn.Module):
    """Wraps a model; checks each query runs without autograd and records the batches it sees."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows, self.batches = model, 0, []

    def forward(self, x):
        assert not torch.is_grad_enabled() and not x.requires_grad
        self.rows += x.shape[0]
        self.batches.append(x.clone())
        return self.model(x)


class Constant(nn.Module):
    """Logits that ignore the input: class ``c`` always wins, so nothing is ever fooled and no query improves."""

    def __init__(self, c: int = 0):
        super().__init__()
        self.c = c

    def forward(self, x):
        z = torch.zeros(x.shape[0], 3)
        z[:, self.c] = 1.0
        return z


class Quantised(nn.Module):
    """Gradient masking: the input is rounded to multiples of 1/4 (zero gradient everywhere) before the model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 4) / 4)


# --- the paper's building blocks -----------------------------------------------------------------------------------


def test_p_schedule_matches_the_reference_table():
    # reference p_selection: p_init halves after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of 10 000
    table = {0: 1, 10: 1, 11: 2, 50: 2, 51: 4, 200: 4, 201: 8, 501: 16, 1001: 32, 2001: 64, 4001: 128, 6001: 256,
             8000: 256, 8001: 512, 9999: 512}
    for it, div in table.items():
        assert p_selection(0.8, it, 10000) == pytest.approx(0.8 / div)
    # scaled to the budget: at 1000 queries the first halving comes after iteration 1
    assert p_selection(0.8, 1, 1000) == pytest.approx(0.8) and p_selection(0.8, 2, 1000) == pytest.approx(0.4)


def test_l2_update_shape():
    for s in (3, 5, 7, 15):
        d = meta_pyramid(s)
        assert d.norm().item() == pytest.approx(1.0)
        assert (d[: s // 2] > 0).all() and (d[s // 2 :] < 0).all()  # positive bump over a negative one
        assert torch.allclose(d[: s // 2], d[: s // 2].flip(1))  # centred: symmetric left-right
        top = d[: s // 2]
        assert top[top.shape[0] // 2, s // 2] == top.max()  # peaks in the middle


def test_linf_search_structure():
    """Stripes init of +-eps per column; then each query changes the best point only inside one s x s square."""
    x = torch.full((4, 1, 16, 16), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    rec = Recorder(Constant())
    q, eps = 30, 0.1
    res = Square(rec, eps=eps, queries=q, p_init=0.8, seed=3)(x, y)
    assert not res.success.any() and (res.forwards == 1 + q).all() and rec.rows == 4 * (1 + q)
    clean, init, *cands = rec.batches
    d0 = init - x
    assert torch.allclose(d0.abs(), torch.full_like(d0, eps))
    assert (d0 == d0[:, :, :1, :]).all()  # vertical stripes: constant along each column
    for it, cand in enumerate(cands):  # a constant model never accepts: every candidate is the init plus a square
        changed = (cand - init).abs().flatten(0, 1) > 1e-7  # (4, 16, 16)
        assert torch.allclose((cand - x).abs(), torch.full_like(cand, eps))
        s = min(max(round(math.sqrt(p_selection(0.8, it, q) * 256)), 1), 15)
        for m in changed:
            assert m.any()  # the reference resamples a square that would not change the image
            r, c = m.any(1).nonzero().squeeze(1), m.any(0).nonzero().squeeze(1)
            assert r.max() - r.min() < s and c.max() - c.min() < s


def test_l2_search_structure():
    """Every L2 query has norm exactly eps (no clipping can occur here) and starts from the 5 x 5 grid of bumps."""
    x = torch.full((3, 1, 16, 16), 0.5)
    y = torch.zeros(3, dtype=torch.long)
    rec = Recorder(Constant())
    res = Square(rec, eps=0.5, norm="l2", queries=25, seed=1)(x, y)  # |delta_i| <= ||delta||_2 = 0.5: never clipped
    assert (res.forwards == 26).all()
    norms = torch.stack([lp_norm(b - x, "l2") for b in rec.batches[1:]])
    assert torch.allclose(norms, torch.full_like(norms, 0.5), atol=1e-5)
    d0 = (rec.batches[1] - x)[:, 0]
    # bumps of side 16 // 5 = 3 tile rows/columns 0..14; each has unit-norm pyramid shape up to sign and transposition
    assert (d0[:, 15, :] == 0).all() and (d0[:, :, 15] == 0).all()
    tile = meta_pyramid(3) * 0.5 / 5
    for i in range(5):
        for j in range(5):
            b = d0[:, 3 * i : 3 * i + 3, 3 * j : 3 * j + 3]
            ok = [torch.allclose(b[k], sg * t, atol=1e-6) for k in range(3) for t in (tile, tile.T) for sg in (1, -1)]
            assert sum(ok) == 3
    # later queries (squares of side 3 from iteration 3 on) move the mass of a second window into the first: the
    # second window is emptied where the first does not cover it, and nothing else changes but for the rescaling (the
    # first window may be emptied too, when the new bump exactly cancels an init bump it lands on)
    zeroed = []
    for it, cand in enumerate(rec.batches[2:]):
        if it < 3:
            continue
        assert p_selection(0.8, it, 25) * 256 < 3.5**2  # s = 3
        d = (cand - x)[:, 0]
        z = ((d == 0) & (d0 != 0)).flatten(1).sum(1)
        assert (z <= 18).all()
        zeroed += z.tolist()
        ratio = (d / d0.masked_fill(d0 == 0, 1.0)).flatten(1)
        k = ratio.median(1, keepdim=True).values  # the rescaling factor
        off = ((ratio - k).abs() > 1e-4 * k.abs()) & (d0 != 0).flatten(1)
        assert (off.sum(1) <= 18).all()  # only two 3 x 3 windows differ
    assert sum(z > 0 for z in zeroed) > len(zeroed) / 2


# --- accounting and gradient-free operation ------------------------------------------------------------------------


def test_forward_only_accounting_with_restarts_and_warm_start(digits_model):
    _, result = digits_model
    x = torch.full((5, 1, 4, 4), 0.5)
    y = torch.zeros(5, dtype=torch.long)
    res = Square(Constant(), eps=0.2, queries=7, restarts=3)(x, y)
    assert (res.forwards == 1 + 7 * 3).all() and (res.backwards == 0).all()  # the whole budget, exactly
    y1 = torch.ones(5, dtype=torch.long)  # misclassified clean: one forward, returned unchanged
    res = Square(Constant(), eps=0.2, queries=7, restarts=3)(x, y1)
    assert res.success.all() and (res.forwards == 1).all() and torch.equal(res.x_adv, x)
    # a warm start that is already adversarial costs the clean check plus one query
    model = result.model.eval()
    xd, yd = _digits(32)
    pgd = PGD(model, eps=0.3, steps=20)(xd, yd)
    assert pgd.success.all()
    rec = Recorder(model)
    res = Square(rec, eps=0.3, queries=50)(xd, yd, init=pgd.x_adv)
    assert res.success.all() and (res.forwards <= 2).all() and rec.rows == res.forwards.sum().item()


def test_works_on_plain_callables(digits_model):
    _, result = digits_model
    model = result.model.eval()
    x, y = _digits(48)
    ref = Square(model, eps=0.15, queries=60, seed=2)(x, y)
    lam = Square(lambda t: model(t), eps=0.15, queries=60, seed=2)(x, y)  # no parameters(), no eval()
    assert torch.equal(ref.x_adv, lam.x_adv) and torch.equal(ref.forwards, lam.forwards)
    assert ref.success.any() and (ref.backwards == 0).all()

    # a numpy engine: t.numpy() raises on a tensor that requires grad, so this also proves no autograd is involved
    train = load_dataset("digits:16", "train")
    a = np.c_[train.x.flatten(1).numpy(), np.ones(len(train.x))]
    w = np.linalg.lstsq(a, np.eye(10)[train.y.numpy()], rcond=None)[0].astype(np.float32)

    def engine(t):
        arr = t.numpy().reshape(len(t), -1)
        return torch.from_numpy(arr @ w[:-1] + w[-1])

    clean = engine(x).argmax(1) == y
    assert clean.float().mean() > 0.8
    res = Square(engine, eps=0.2, queries=200)(x, y)
    assert (res.forwards[~clean] == 1).all() and res.forwards.max() <= 201 and (res.backwards == 0).all()
    assert res.robust_accuracy < 0.2
    _reverify(engine, x, y, res, 0.2, "linf")
    with pytest.raises(UserError, match="callable"):
        Square(42, eps=0.1)


# --- strength on the trained digits model ---------------------------------------------------------------------------


def test_linf_on_digits_against_pgd(digits_model):
    _, result = digits_model
    model = result.model.eval()
    x, y = _digits(120)
    clean = model(x).argmax(1) == y
    strong = Square(model, eps=0.3, queries=1000)(x, y)
    assert strong.robust_accuracy < 0.1
    _reverify(model, x, y, strong, 0.3, "linf")
    assert (strong.backwards == 0).all() and strong.forwards.max() <= 1 + 1000
    assert (strong.forwards[~clean] == 1).all()
    assert strong.forwards.float().mean() < 50  # fooled examples leave at once: far below the budget

    sq = Square(model, eps=0.1, queries=1000)(x, y)
    pgd = PGD(model, eps=0.1, steps=40)(x, y)
    _reverify(model, x, y, sq, 0.1, "linf")
    assert sq.robust_accuracy >= pgd.robust_accuracy - 0.05  # black-box does not beat white-box on a plain model
    assert sq.robust_accuracy < clean.float().mean().item() - 0.4  # yet it is a real attack


def test_l2_on_digits(digits_model):
    _, result = digits_model
    model = result.model.eval()
    x, y = _digits(120)
    res = Square(model, eps=3.0, norm="l2", queries=300)(x, y)
    assert res.success.float().mean() >= 0.9
    assert (res.backwards == 0).all() and res.forwards.max() <= 301
    _reverify(model, x, y, res, 3.0, "l2")
    weak = Square(model, eps=0.3, norm="l2", queries=100)(x, y)
    _reverify(model, x, y, weak, 0.3, "l2")
    assert weak.robust_accuracy > res.robust_accuracy + 0.5


def test_square_sees_through_gradient_masking(digits_model):
    _, result = digits_model
    masked = Quantised(result.model.eval())
    x, y = _digits(100)
    xr = x.clone().requires_grad_(True)
    assert torch.autograd.grad(masked(xr).sum(), xr)[0].abs().max() == 0  # the gradient really is masked
    pgd = PGD(masked, eps=0.3, steps=20)(x, y)
    sq = Square(masked, eps=0.3, queries=300)(x, y)
    _reverify(masked, x, y, sq, 0.3, "linf")
    assert sq.robust_accuracy < pgd.robust_accuracy - 0.3


# --- determinism, per-example epsilon, parameters -------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_deterministic_and_per_example_eps(digits_model, norm):
    _, result = digits_model
    model = result.model.train()
    x, y = _digits(40)
    big = 0.3 if norm == "linf" else 3.0
    a = Square(model, eps=big / 3, norm=norm, queries=40, seed=5)(x, y)
    b = Square(model, eps=big / 3, norm=norm, queries=40, seed=5)(x, y)
    c = Square(model, eps=big / 3, norm=norm, queries=40, seed=6)(x, y)
    assert model.training  # mode restored
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.forwards, b.forwards)
    assert not torch.equal(a.x_adv, c.x_adv)

    model.eval()
    clean = model(x).argmax(1) == y
    eps = torch.tensor([0.0, big] * 20)
    res = Square(model, norm=norm, queries=300)(x, y, eps=eps)
    zero = eps == 0
    assert torch.equal(res.x_adv[zero], x[zero]) and (res.forwards[zero] == 1).all()
    assert torch.equal(res.success[zero], ~clean[zero])
    assert res.success[~zero].float().mean() >= 0.9
    tol = 1e-6 if norm == "linf" else big * 1e-5
    assert (res.norm <= eps + tol).all()


@pytest.mark.parametrize(
    "kwargs",
    [{"queries": 0}, {"restarts": 0}, {"p_init": 0.0}, {"p_init": 1.5}, {"p_init": -0.1}, {"loss": "dlr"},
     {"norm": "l1"}, {"eps": -1.0}, {"queries": 2.5}],
)
def test_bad_parameters_are_user_errors(kwargs):
    with pytest.raises(UserError):
        Square(Constant(), **{"eps": 0.1, **kwargs})


def test_repr_and_ce_loss():
    r = repr(Square(Constant(), eps=0.1, queries=50, p_init=0.3))
    assert "Square(" in r and "queries=50" in r and "p_init=0.3" in r
    x = torch.full((2, 1, 4, 4), 0.5)
    res = Square(Constant(), eps=0.1, queries=5, loss="ce")(x, torch.zeros(2, dtype=torch.long))
    assert (res.forwards == 6).all() and not res.success.any()
