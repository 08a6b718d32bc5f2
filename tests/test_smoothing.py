"""Randomized-smoothing certificates (kit.smoothing), each against an independent reference: scipy's exact binomial
intervals and a root-find of the binomial tail, closed-form radii of linear classifiers, scipy's LP solver and POT's
exact transport for the flow representation of the Wasserstein noise."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from kit.errors import UserError
from kit.ot.local import exact_local_wasserstein
from kit.smoothing import (
    GaussianNoise,
    Smoothing,
    WassersteinNoise,
    binomial_test_p,
    certified_accuracy,
    certified_auac,
    certify,
    clopper_pearson,
    edge_differences,
    example_generator,
    flow_divergence,
    lower_confidence_bound,
    make_noise,
    noise_block,
    predict,
    sample_counts,
)

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = [(k, n, a) for n in (1, 2, 10, 100, 1000) for k in sorted({0, 1, n // 3, n // 2, n - 1, n}) if 0 <= k <= n
        for a in (0.001, 0.05, 0.5)]


def _linear(w: torch.Tensor, b: float):
    """The two-class linear classifier f(x) = [w . x + b > 0] on (B, C, H, W) batches."""
    return lambda xb: ((xb * w).sum((1, 2, 3)) + b > 0).long()


# -- bounds -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,n,alpha", GRID)
def test_two_sided_clopper_pearson_matches_scipy(k, n, alpha):
    lo, hi = clopper_pearson(k, n, alpha)
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="exact")
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)


@pytest.mark.parametrize("k,n,alpha", GRID)
def test_one_sided_lower_bound_is_the_root_of_the_binomial_tail(k, n, alpha):
    got = lower_confidence_bound(k, n, alpha)
    if k == 0:
        assert got == 0.0
        return
    # the largest p with P(Bin(n, p) >= k) <= alpha: the root of binom.sf(k - 1, n, p) = alpha
    ref = optimize.brentq(lambda p: stats.binom.sf(k - 1, n, p) - alpha, 0.0, 1.0, xtol=1e-15, rtol=1e-13)
    assert got == pytest.approx(ref, abs=1e-10)
    if k == n:
        assert got == pytest.approx(alpha ** (1 / n), rel=1e-12)


def test_bounds_vectorise_over_arrays():
    k, n = np.array([[0, 3], [7, 10]]), np.array([10, 10])
    lo, hi = clopper_pearson(k, n, 0.05)
    low = lower_confidence_bound(k, n, 0.05)
    assert lo.shape == hi.shape == low.shape == (2, 2)
    for i, j in np.ndindex(2, 2):
        assert (lo[i, j], hi[i, j]) == clopper_pearson(int(k[i, j]), 10, 0.05)
        assert low[i, j] == lower_confidence_bound(int(k[i, j]), 10, 0.05)
    assert lower_confidence_bound(np.array([], dtype=np.int64), 10, 0.05).shape == (0,)


def test_binomial_test_is_scipys_two_sided_test():
    for k, n in [(0, 1), (5, 10), (9, 10), (60, 100), (510, 1000)]:
        assert binomial_test_p(k, n) == pytest.approx(stats.binomtest(k, n, 0.5).pvalue, rel=1e-12)
        assert binomial_test_p(k, n, alternative="greater") == pytest.approx(stats.binom.sf(k - 1, n, 0.5), rel=1e-9)
    assert binomial_test_p(5, 10) == 1.0  # a tie cannot reject
    assert list(binomial_test_p(np.array([5, 9]), 10)) == [binomial_test_p(5, 10), binomial_test_p(9, 10)]


# -- Gaussian noise: the closed form of a linear classifier --------------------------------------------------------


def _gaussian_case():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(1, 4, 4, generator=gen, dtype=torch.float64)
    x = torch.rand(1, 4, 4, generator=gen, dtype=torch.float64)
    sigma = 0.25
    # choose b so that the exact radius |w.x + b| / ||w|| is one sigma: p_A = Phi(1), far from the ceiling
    b = -float((w * x).sum()) + sigma * float(w.norm())
    exact = abs(float((w * x).sum()) + b) / float(w.norm())
    return w, x, b, sigma, exact


def test_gaussian_radius_of_a_linear_classifier_fails_at_most_at_rate_alpha():
    """The smoothed linear classifier is the classifier itself (the noise is symmetric) and its exact L2 radius is
    |w.x + b| / ||w||; Cohen's bound is tight for it, so certificates exceed it at rate <= alpha and no more."""
    w, x, b, sigma, exact = _gaussian_case()
    noise, f = GaussianNoise(sigma), _linear(w, b)
    trials, alpha = 300, 0.1
    over = naive_over = 0
    for i in range(trials):
        c = certify(f, x, noise, 16, 200, alpha, 256, example_generator(7, i), 2)
        assert c.prediction in (-1, 1)
        over += c.radius > exact
        naive_over += sigma * stats.norm.ppf(min(c.count / 200, 1 - 1e-12)) > exact  # the point estimate instead
    limit = stats.binom.ppf(0.999, trials, alpha)
    assert over <= limit
    assert naive_over > 2 * limit  # the check has power: without the confidence bound it fails about half the time


def test_gaussian_radius_approaches_the_exact_radius_as_n_grows():
    w, x, b, sigma, exact = _gaussian_case()
    noise, f = GaussianNoise(sigma), _linear(w, b)
    gaps = {}
    for n in (1_000, 100_000):
        radii = [certify(f, x, noise, 100, n, 0.001, 10_000, example_generator(3, i), 2).radius for i in range(3)]
        assert all(r <= exact for r in radii)
        gaps[n] = exact - float(np.mean(radii))
    assert gaps[100_000] < 0.03 * exact < gaps[1_000]


@pytest.mark.parametrize("kind", list(Smoothing))
def test_an_always_right_classifier_reaches_the_ceiling(kind):
    noise = make_noise(kind, 0.5)
    n, alpha = 500, 0.001
    c = certify(lambda xb: torch.full((len(xb),), 2), torch.rand(2, 3, 3), noise, 10, n, alpha, 128,
                example_generator(0, 0), 4)
    assert (c.prediction, c.count) == (2, n) and c.counts0.tolist() == [0, 0, 10, 0]
    assert c.p_lower == pytest.approx(alpha ** (1 / n), rel=1e-12)
    ceiling = (0.5 * stats.norm.ppf(alpha ** (1 / n)) if kind is Smoothing.GAUSSIAN
               else -(0.5 / math.sqrt(2)) * math.log(2 * (1 - alpha ** (1 / n))) / math.sqrt(2))
    assert c.radius == pytest.approx(ceiling, rel=1e-10)
    assert noise.max_radius(n, alpha) == pytest.approx(ceiling, rel=1e-10)


def test_radius_is_zero_at_or_below_one_half():
    for noise in (GaussianNoise(1.0), WassersteinNoise(1.0)):
        r = noise.radius(np.array([0.0, 0.3, 0.5, 0.5 + 1e-9, 0.9, 1.0]))
        assert list(r[:3]) == [0.0, 0.0, 0.0] and (r[3:5] > 0).all() and r[5] == math.inf
        assert np.all(np.diff(r) >= 0)


# -- Wasserstein noise: flows, mass, the Laplace law -----------------------------------------------------------------


def test_divergence_of_a_hand_computed_3x3_flow():
    fh = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # (0,0)->(0,1): 1; (1,1)->(1,2): 2
    fv = torch.tensor([[0.0, 0.5, 0.0], [-3.0, 0.0, 0.0]])  # (0,1)->(1,1): 0.5; (2,0)->(1,0): 3 (negative flow)
    expected = torch.tensor([[-1.0, 1.0 - 0.5, 0.0],
                             [3.0, 0.5 - 2.0, 2.0],
                             [-3.0, 0.0, 0.0]])
    div = flow_divergence(fh, fv)
    assert torch.equal(div, expected) and div.sum() == 0


def test_edge_differences_is_the_adjoint_of_the_divergence():
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    fh, fv = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64), torch.randn(2, 3, 3, 5, generator=gen,
                                                                                      dtype=torch.float64)
    dh, dv = edge_differences(v)
    assert (v * flow_divergence(fh, fv)).sum().item() == pytest.approx(((dh * fh).sum() + (dv * fv).sum()).item())


def test_wasserstein_noise_preserves_every_channels_mass():
    x = torch.rand(3, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = WassersteinNoise(0.05).sample(x, 64, torch.Generator().manual_seed(1))
    assert y.shape == (64, 3, 5, 6) and y.dtype == torch.float64
    assert (y - x).abs().amax() > 0.1  # the noise is not nothing
    assert torch.allclose(y.sum((2, 3)), x.sum((1, 2)).expand(64, 3), rtol=1e-13, atol=0)
    assert WassersteinNoise(0.05).sample(x.float(), 2, torch.Generator()).dtype == torch.float32
    zero = torch.zeros(1, 3, 3)
    assert torch.equal(WassersteinNoise(1.0).sample(zero, 4, torch.Generator()), zero.expand(4, 1, 3, 3))


def test_wasserstein_flows_are_laplace_with_standard_deviation_sigma():
    # one edge (a 1 x 2 image): the noisy copy is x + m (-F, +F), so F can be read back
    x = torch.tensor([[[0.2, 0.6]]], dtype=torch.float64)
    sigma = 0.3
    y = WassersteinNoise(sigma).sample(x, 4000, torch.Generator().manual_seed(5))
    flows = ((y[:, 0, 0, 1] - x[0, 0, 1]) / x.sum()).numpy()
    assert np.allclose(flows, -((y[:, 0, 0, 0] - x[0, 0, 0]) / x.sum()).numpy())
    assert stats.kstest(flows, stats.laplace(scale=sigma / math.sqrt(2)).cdf).pvalue > 1e-3
    assert flows.std() == pytest.approx(sigma, rel=0.05)


def _min_flow_lp(a: np.ndarray, t: float) -> float:
    """min ||F||_1 subject to a . F = t, by scipy's LP solver (F = F+ - F-)."""
    res = optimize.linprog(np.ones(2 * a.size), A_eq=np.concatenate([a, -a])[None], b_eq=[t], bounds=(0, None))
    assert res.status == 0
    return float(res.fun)


def _grid_incidence(h: int, w: int) -> np.ndarray:
    """(H*W, E) incidence of the 4-grid, written out edge by edge (horizontal edges first, row-major)."""
    cols = []
    for kind in ("h", "v"):
        for i in range(h):
            for j in range(w):
                if (kind == "h" and j + 1 < w) or (kind == "v" and i + 1 < h):
                    col = np.zeros(h * w)
                    col[i * w + j] -= 1
                    col[(i * w + j + 1) if kind == "h" else ((i + 1) * w + j)] += 1
                    cols.append(col)
    return np.stack(cols, 1)


def test_least_flow_to_a_linear_boundary_is_the_margin_over_the_largest_edge_difference():
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        w = torch.randn(1, 3, 3, generator=gen, dtype=torch.float64)
        t = float(torch.randn(1, generator=gen, dtype=torch.float64))
        dh, dv = edge_differences(w)
        a = torch.cat([dh.reshape(-1), dv.reshape(-1)]).numpy()
        # the same a from the written-out incidence: w . div F = (B^T w) . F
        assert np.allclose(_grid_incidence(3, 3).T @ w.reshape(-1).numpy(), a)
        assert abs(t) / np.abs(a).max() == pytest.approx(_min_flow_lp(a, t), rel=1e-7)


def _flow_case(shape, seed):
    """A linear classifier on the flow-noised image and its exact flow-L1 radius |w.x + b| / (m max|D w|)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen, dtype=torch.float64)
    x = torch.rand(*shape, generator=gen, dtype=torch.float64)
    m = float(x.sum())
    dh, dv = edge_differences(w)
    lip = float(torch.cat([dh.reshape(-1), dv.reshape(-1)]).abs().max())
    return w, x, m, lip


def test_wasserstein_flow_radius_is_tight_on_a_one_edge_image():
    """On a 1 x 2 image the margin moves with one Laplace flow: Teng et al.'s bound is exact, certificates exceed
    the true flow radius at rate <= alpha, and they approach it as n grows."""
    w, x, m, lip = _flow_case((1, 1, 2), 4)
    sigma = 0.2
    b_lap = sigma / math.sqrt(2)
    b = -float((w * x).sum()) + 1.5 * b_lap * m * lip  # exact flow radius 1.5 b: p_A = 1 - exp(-1.5) / 2
    exact = abs(float((w * x).sum()) + b) / (m * lip)
    noise, f = WassersteinNoise(sigma), _linear(w, b)
    trials, alpha = 300, 0.1
    over = 0
    for i in range(trials):
        c = certify(f, x, noise, 16, 200, alpha, 256, example_generator(11, i), 2)
        flow = float(noise.flow_radius(c.p_lower)) if c.prediction >= 0 else 0.0
        assert c.radius == pytest.approx(flow / math.sqrt(2), rel=1e-12)
        over += flow > exact
    assert over <= stats.binom.ppf(0.999, trials, alpha)
    big = [float(noise.flow_radius(certify(f, x, noise, 100, 100_000, 0.001, 20_000, example_generator(1, i),
                                           2).p_lower)) for i in range(2)]
    assert all(r <= exact for r in big) and exact - np.mean(big) < 0.04 * exact


def test_wasserstein_flow_radius_never_exceeds_the_exact_one_on_a_3x3_image():
    w, x, m, lip = _flow_case((1, 3, 3), 6)
    sigma = 0.05
    b = -float((w * x).sum()) + 0.1 * m * lip
    exact = abs(float((w * x).sum()) + b) / (m * lip)
    noise, f = WassersteinNoise(sigma), _linear(w, b)
    trials, alpha = 150, 0.05
    radii = [float(noise.flow_radius(certify(f, x, noise, 16, 500, alpha, 512, example_generator(2, i), 2).p_lower))
             for i in range(trials)]
    assert sum(r > exact for r in radii) <= stats.binom.ppf(0.999, trials, alpha)
    assert np.mean(radii) > 0.2 * exact  # not vacuous


def test_flow_l1_is_manhattan_wasserstein_and_within_sqrt2_of_the_kits_distance():
    """The mapping of the module docstring, step by step, on random 1 x 4 x 4 pairs: least flow L1 (LP over the
    written-out grid) = exact OT with the Manhattan ground cost (POT) <= sqrt(2) * the kit's distance (POT, 5 x 5
    windows, Euclidean cost), all in the unit-mass scale."""
    gen = torch.Generator().manual_seed(9)
    inc = _grid_incidence(4, 4)
    for _ in range(4):
        x = 0.3 + 0.7 * torch.rand(1, 1, 4, 4, generator=gen, dtype=torch.float64)
        m = float(x.sum())
        fh = 0.01 * torch.randn(1, 1, 4, 3, generator=gen, dtype=torch.float64)
        fv = 0.01 * torch.randn(1, 1, 3, 4, generator=gen, dtype=torch.float64)
        x2 = x + m * flow_divergence(fh, fv)
        assert x2.min() >= 0
        d = ((x2 - x) / m).reshape(-1).numpy()
        e = inc.shape[1]
        res = optimize.linprog(np.ones(2 * e), A_eq=np.concatenate([inc, -inc], 1), b_eq=d, bounds=(0, None))
        flow_l1 = float(res.fun)
        w_manhattan = float(exact_local_wasserstein(x, x2, kernel_size=7, p=1)) / m
        kit = float(exact_local_wasserstein(x, x2, kernel_size=5, p=2)) / m
        assert flow_l1 == pytest.approx(w_manhattan, rel=1e-6)
        assert flow_l1 <= float((fh.abs().sum() + fv.abs().sum())) + 1e-12  # the drawn flow is one candidate
        assert kit <= w_manhattan + 1e-12 and w_manhattan <= math.sqrt(2) * kit + 1e-12
    # the sqrt(2) is attained by a diagonal move and not paid by an axis move
    a = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    diag = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]]], dtype=torch.float64)
    side = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]], dtype=torch.float64)
    assert float(exact_local_wasserstein(a, diag, 3, p=1)) == pytest.approx(
        math.sqrt(2) * float(exact_local_wasserstein(a, diag, 3, p=2)))
    assert float(exact_local_wasserstein(a, side, 3, p=1)) == pytest.approx(
        float(exact_local_wasserstein(a, side, 3, p=2)))


# -- sampling, reproducibility, PREDICT ------------------------------------------------------------------------------


class _Recorder:
    def __init__(self, num_classes: int = 3, logits: bool = False):
        self.batches: list[torch.Tensor] = []
        self.num_classes, self.logits = num_classes, logits

    def __call__(self, xb):
        self.batches.append(xb.clone())
        score = xb.reshape(len(xb), -1).sum(1)
        label = (score * 7).floor().long() % self.num_classes
        return torch.nn.functional.one_hot(label, self.num_classes).double() if self.logits else label


@pytest.mark.parametrize("kind", list(Smoothing))
def test_noise_and_counts_do_not_depend_on_the_batch_size(kind):
    x = torch.rand(1, 3, 3, generator=torch.Generator().manual_seed(0))
    noise = make_noise(kind, 0.3)
    num = 2 * noise_block(x) + 37
    seen, counts = {}, {}
    for batch in (1, 7, 256, 1000):
        rec = _Recorder()
        counts[batch] = sample_counts(rec, x, noise, num, batch, example_generator(5, 3), 3)
        assert all(len(b) <= batch for b in rec.batches) and len(rec.batches) == math.ceil(num / batch)
        seen[batch] = torch.cat(rec.batches)
    for batch in (7, 256, 1000):
        assert torch.equal(seen[batch], seen[1]) and torch.equal(counts[batch], counts[1])
    assert int(counts[1].sum()) == num
    c1 = certify(_Recorder(), x, noise, 50, 300, 0.01, 8, example_generator(5, 3), 3)
    c2 = certify(_Recorder(), x, noise, 50, 300, 0.01, 300, example_generator(5, 3), 3)
    assert c1 == c2 and c1.to_dict() == c2.to_dict()


def test_example_generator_depends_on_seed_and_index_only():
    def draw(seed, index):
        return torch.randn(8, generator=example_generator(seed, index, "cpu"))

    assert torch.equal(draw(0, 5), draw(0, 5))
    assert not torch.equal(draw(0, 1), draw(1, 0)) and not torch.equal(draw(0, 5), draw(0, 6))
    # pinned derivation (SHA-256 of the pair): changing it changes every stored certificate
    digest = hashlib.sha256(b"otkit.smoothing:3:17").digest()
    assert example_generator(3, 17).initial_seed() == int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def test_sample_counts_accepts_labels_or_logits_and_reports_progress():
    x = torch.rand(1, 3, 3)
    noise = GaussianNoise(0.2)
    done = []
    a = sample_counts(_Recorder(), x, noise, 50, 16, example_generator(0, 0), 3, on_batch=done.append)
    b = sample_counts(_Recorder(logits=True), x, noise, 50, 16, example_generator(0, 0), 3)
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (3,)
    assert done == [16, 32, 48, 50]
    progress = []
    certify(_Recorder(), x, noise, 10, 30, 0.05, 16, example_generator(0, 0), 3, on_batch=progress.append)
    assert progress == [10, 26, 40]


@pytest.mark.parametrize("bad, match", [
    (lambda xb: torch.zeros(len(xb) + 1, dtype=torch.long), "shape"),
    (lambda xb: torch.full((len(xb),), 3), "outside"),
    (lambda xb: torch.full((len(xb),), -1), "outside"),
    (lambda xb: torch.zeros(len(xb)), "labels"),
    (lambda xb: torch.zeros(len(xb), 5), "logits"),
])
def test_bad_classifier_outputs_are_user_errors(bad, match):
    with pytest.raises(UserError, match=match):
        sample_counts(bad, torch.rand(1, 2, 2), GaussianNoise(0.1), 4, 4, torch.Generator(), 3)


def test_predict_abstains_on_the_boundary_and_answers_away_from_it():
    w = torch.ones(1, 2, 2)
    x = torch.full((1, 2, 2), 0.5)
    on_boundary = _linear(w, -2.0)  # w.x + b = 0: the smoothed classifier is a fair coin
    answered = sum(predict(on_boundary, x, GaussianNoise(0.5), 100, 0.05, 128, example_generator(4, i), 2)[0] >= 0
                   for i in range(200))
    assert answered <= stats.binom.ppf(0.999, 200, 0.05)
    label, p = predict(_linear(w, 10.0), x, GaussianNoise(0.5), 100, 0.05, 128, example_generator(4, 0), 2)
    assert label == 1 and p == pytest.approx(stats.binomtest(100, 100, 0.5).pvalue)


def test_certified_accuracy_and_auac_against_a_brute_force_curve():
    rng = np.random.default_rng(0)
    radii = np.where(rng.random(40) < 0.2, 0.0, rng.exponential(0.5, 40))
    correct = rng.random(40) < 0.7
    grid = np.linspace(0, 2, 20001)
    brute = np.array([np.mean([c and r >= g for r, c in zip(radii, correct)]) for g in grid[::500]])
    acc = certified_accuracy(radii, correct, grid)
    assert np.allclose(acc[::500], brute)
    trapezoid = float(np.sum((acc[1:] + acc[:-1]) * np.diff(grid)) / 2)
    assert certified_auac(radii, correct, 2.0) == pytest.approx(trapezoid / 2.0, abs=1e-3)
    assert certified_auac(torch.tensor(radii), torch.tensor(correct), 2.0) == certified_auac(radii, correct, 2.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("kind", list(Smoothing))
def test_samples_follow_the_images_dtype_and_device(kind, dtype):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        x = torch.rand(2, 4, 4, device=device).to(dtype)
        y = make_noise(kind, 0.1).sample(x, 5, example_generator(0, 0, device))
        assert y.shape == (5, 2, 4, 4) and y.dtype == dtype and y.device == x.device
        c = certify(lambda xb: torch.zeros(len(xb), dtype=torch.long, device=xb.device), x, make_noise(kind, 0.1),
                    4, 20, 0.05, 8, example_generator(0, 0, device), 2)
        assert c.prediction == 0 and c.counts0.device.type == "cpu"


# -- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0, -1.0, float("nan"), float("inf"), "1", True, None])
@pytest.mark.parametrize("kind", ["gaussian", "wasserstein"])
def test_bad_sigma_is_a_user_error(kind, sigma):
    with pytest.raises(UserError, match="sigma"):
        make_noise(kind, sigma)


def test_unknown_smoothing_is_a_user_error():
    with pytest.raises(UserError, match="unknown smoothing"):
        make_noise("laplace", 1.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"n0": 0}, "n0"), ({"n": 0}, "n must"), ({"n": 2.5}, "n must"), ({"batch": 0}, "batch"),
    ({"alpha": 0.0}, "alpha"), ({"alpha": 1.0}, "alpha"), ({"alpha": float("nan")}, "alpha"),
    ({"alpha": -0.1}, "alpha"),
    ({"num_classes": 1}, "num_classes"),
])
def test_bad_certify_arguments_are_user_errors(kwargs, match):
    args = {"n0": 4, "n": 8, "alpha": 0.05, "batch": 4, "num_classes": 2, **kwargs}
    with pytest.raises(UserError, match=match):
        certify(lambda xb: torch.zeros(len(xb), dtype=torch.long), torch.rand(1, 2, 2), GaussianNoise(0.1),
                args["n0"], args["n"], args["alpha"], args["batch"], torch.Generator(), args["num_classes"])
    if "n0" not in kwargs and "num_classes" not in kwargs and "batch" not in kwargs:
        with pytest.raises(UserError, match=match):
            predict(lambda xb: torch.zeros(len(xb), dtype=torch.long), torch.rand(1, 2, 2), GaussianNoise(0.1),
                    args["n"], args["alpha"], args["batch"], torch.Generator(), args["num_classes"])


@pytest.mark.parametrize("call", [
    lambda: clopper_pearson(1, 0, 0.05), lambda: clopper_pearson(5, 4, 0.05), lambda: clopper_pearson(-1, 4, 0.05),
    lambda: lower_confidence_bound(1, 4, 0.0), lambda: lower_confidence_bound(1, 4, 1.0),
    lambda: lower_confidence_bound(1.5, 4, 0.05), lambda: binomial_test_p(1, 4, p=1.5),
    lambda: sample_counts(lambda xb: xb, torch.rand(1, 1, 2, 2), GaussianNoise(0.1), 4, 4, torch.Generator(), 2),
    lambda: WassersteinNoise(0.1).sample(torch.full((1, 2, 2), -0.5), 2, torch.Generator()),
    lambda: GaussianNoise(0.1).radius(1.5), lambda: certified_auac([0.1], [True], 0.0),
    lambda: certified_accuracy([0.1, -1.0], [True, True], [0.0]), lambda: example_generator(0, -1),
])
def test_other_bad_inputs_are_user_errors(call):
    with pytest.raises(UserError):
        call()
