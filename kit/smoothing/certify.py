r"""CERTIFY and PREDICT of Cohen, Rosenfeld & Kolter ("Certified Adversarial Robustness via Randomized Smoothing",
ICML 2019, §3.2) over a classifier callable, and certified-accuracy curves.

The smoothed classifier is :math:`g(x) = \arg\max_c P_\delta(f(x + \delta) = c)` with :math:`\delta` drawn by a
:class:`~kit.smoothing.noise.NoiseModel`; ``classify`` is the base classifier :math:`f`, any callable mapping a
(B, C, H, W) batch to (B,) integer labels or (B, K) logits (an engine, a twin, a lambda).

- :func:`certify`: draw ``n0`` samples and take the most frequent class :math:`\hat c_A` (selection), draw ``n`` fresh
  samples and count :math:`k = \#\{f = \hat c_A\}` (estimation), :math:`\underline{p_A} =` the one-sided
  Clopper–Pearson lower bound at confidence :math:`1 - \alpha`; abstain if :math:`\underline{p_A} \le 1/2`, else
  return :math:`\hat c_A` and the noise model's radius. With probability at least :math:`1 - \alpha` over the
  samples, a non-abstaining answer is :math:`g`'s prediction and :math:`g` is constant on the certified ball.
- :func:`predict`: ``n`` samples, the top two counts :math:`n_A \ge n_B`; return the top class if the two-sided
  binomial test of :math:`n_A` in :math:`n_A + n_B` at :math:`1/2` has p-value :math:`\le \alpha`, else abstain.
  The answer differs from :math:`g(x)` with probability at most :math:`\alpha`.

**Reproducibility.** Each example's noise comes from its own generator, :func:`example_generator` ``(seed, index)``, so
a certificate does not depend on where the example sits in a batch, on the process rank or on the world size.
:func:`sample_counts` draws noise in blocks of :func:`noise_block` copies, a size fixed by the image's shape alone,
and feeds ``classify`` batches of ``batch`` copies cut from that stream, so the noisy copies (and the counts, for a
classifier that treats each copy independently) are the same whatever ``batch`` is. The reproducibility key is
(seed, index, noise model, n0, n, image shape, torch's generator for the device); ``batch`` is not part of it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kit.errors import UserError
from kit.smoothing.bounds import binomial_test_p, lower_confidence_bound
from kit.smoothing.noise import NoiseModel, check_count, check_image

Classify = Callable[[torch.Tensor], Any]
"""A base classifier: (B, C, H, W) -> (B,) integer labels or (B, K) logits."""

#: Noise is drawn in blocks of at most this many elements (and at most ``NOISE_BLOCK_MAX`` copies). Part of the
#: reproducibility key: changing either changes every certificate.
NOISE_BLOCK_ELEMENTS = 1 << 20
NOISE_BLOCK_MAX = 256


def noise_block(x: torch.Tensor) -> int:
    """Copies per noise draw for image ``x``: ``clamp(NOISE_BLOCK_ELEMENTS // x.numel(), 1, NOISE_BLOCK_MAX)``."""
    return max(1, min(NOISE_BLOCK_MAX, NOISE_BLOCK_ELEMENTS // max(1, x.numel())))


def noise_stream(device: torch.device | str) -> str:
    """What decides the noise a seed gives on ``device``, beyond the seed: the device type, and on CUDA the GPU's
    multiprocessor and thread counts.

    The CPU (Mersenne Twister) and CUDA (Philox) draw unrelated streams from one seed. On CUDA, torch caps the grid
    of a large draw at multiprocessors x (threads per multiprocessor / 256) blocks, and which random value lands in
    which element depends on that grid, so a 3x32x32 noise block (786,432 values) differs between GPU models (an
    H100 and an A100, or a MIG slice). Two devices with the same stream draw the same noise; a certificate records
    its own (``provenance.noise_stream``) so that ``otkit verify`` knows whether its replay can be exact.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev.type
    props = torch.cuda.get_device_properties(dev)
    threads = getattr(props, "max_threads_per_multi_processor", 0)  # torch >= 2.2
    return f"cuda ({props.multi_processor_count} multiprocessors x {threads} threads)"


def example_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from ``(seed, index)`` alone.

    The seed is the first 63 bits of the SHA-256 of ``"otkit.smoothing:<seed>:<index>"`` (stable across processes
    and Python versions, unlike ``hash()``), so example ``index`` gets the same noise whatever its batch, rank or the
    world size.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise UserError(f"seed must be an integer, got {seed!r}")
    index = check_count("index", index, low=0)
    digest = hashlib.sha256(f"otkit.smoothing:{int(seed)}:{index}".encode()).digest()
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def _check_classes(num_classes: Any) -> int:
    return check_count("num_classes", num_classes, low=2)


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not 0 < alpha < 1:
        raise UserError(f"alpha must lie in (0, 1), got {alpha!r}")
    return float(alpha)


def _labels(out: Any, size: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """The classifier's output for ``size`` copies as (size,) int64 labels in [0, num_classes) on ``device``."""
    out = out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))
    if out.ndim == 2 and out.shape[0] == size:
        if out.shape[1] != num_classes:
            raise UserError(f"classify returned {out.shape[1]} logits per copy, expected num_classes = {num_classes}")
        labels = out.argmax(1)
    elif out.ndim == 1 and out.shape[0] == size:
        if out.is_floating_point() or out.is_complex():
            raise UserError(f"classify returned {out.dtype} labels; return integer labels or (B, K) logits")
        labels = out
    else:
        raise UserError(f"classify returned shape {tuple(out.shape)} for {size} copies; expected ({size},) labels or "
                        f"({size}, {num_classes}) logits")
    labels = labels.to(device=device, dtype=torch.long)
    lo, hi = torch.aminmax(labels)
    if int(lo) < 0 or int(hi) >= num_classes:
        raise UserError(f"classify returned label {int(lo) if int(lo) < 0 else int(hi)} outside [0, {num_classes})")
    return labels


def sample_counts(
    classify: Classify,
    x: torch.Tensor,
    noise: NoiseModel,
    num: int,
    batch: int,
    generator: torch.Generator,
    num_classes: int,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """How often ``classify`` predicts each class on ``num`` noisy copies of ``x``.

    Noise is drawn from ``generator`` in blocks of :func:`noise_block` copies (the last block's unused copies are
    discarded) and classified in batches of at most ``batch`` copies, under ``torch.no_grad``; memory holds at most
    ``batch + noise_block(x)`` copies whatever ``num`` is. The copies, in order, do not depend on ``batch``.

    Parameters
    ----------
    classify : callable
        (B, C, H, W) -> (B,) integer labels (bool accepted for two classes) or (B, num_classes) logits (argmax).
    x : (C, H, W) floating tensor
        One image; the copies are on its device, in its dtype.
    noise : NoiseModel
    num, batch : int
        Copies in all (>= 1) and per ``classify`` call (>= 1).
    generator : torch.Generator
        On ``x``'s device type (:func:`example_generator`); advanced by ``ceil(num / noise_block(x))`` draws.
    num_classes : int
        >= 2.
    on_batch : callable, optional
        Called after each batch with the number of copies classified so far.

    Returns
    -------
    (num_classes,) int64 tensor on ``x``'s device, summing to ``num``.
    """
    check_image(x)
    if not isinstance(noise, NoiseModel):
        raise UserError(f"noise must be a NoiseModel, got {type(noise).__name__}")
    num, batch = check_count("num", num), check_count("batch", batch)
    num_classes = _check_classes(num_classes)
    block = noise_block(x)
    blocks = -(-num // block)  # exactly the draws ``num`` copies need: the generator ends where it would serially
    counts = torch.zeros(num_classes, dtype=torch.long, device=x.device)
    pending: list[torch.Tensor] = []  # drawn, not yet classified
    have = done = 0

    def draw() -> torch.Tensor:
        with torch.no_grad():
            return noise.sample(x, block, generator)

    # the next block is drawn in a second thread while ``classify`` runs (torch and ONNX Runtime release the GIL):
    # one thread, one generator, blocks in order, so the copies are those of a serial loop
    with ThreadPoolExecutor(max_workers=1) as pool, torch.no_grad():
        ahead: Future[torch.Tensor] | None = pool.submit(draw)
        issued = 1
        while done < num:
            size = min(batch, num - done)
            while have < size:
                assert ahead is not None  # ``blocks`` blocks cover ``num`` copies
                pending.append(ahead.result())
                have += block
                ahead = pool.submit(draw) if issued < blocks else None
                issued += ahead is not None
            chunk = pending[0] if len(pending) == 1 else torch.cat(pending)
            take, rest = chunk[:size], chunk[size:]
            pending, have = ([rest] if rest.shape[0] else []), rest.shape[0]
            counts += torch.bincount(_labels(classify(take), size, num_classes, x.device), minlength=num_classes)
            done += size
            if on_batch is not None:
                on_batch(done)
    return counts


@dataclass(frozen=True, eq=False)
class Certificate:
    """The result of :func:`certify` for one example.

    Attributes
    ----------
    prediction : int
        The smoothed classifier's certified class, -1 for abstain.
    p_lower : float
        One-sided Clopper–Pearson lower bound on the selected class's probability (confidence 1 - alpha).
    radius : float
        Certified radius in the noise model's units (``noise.norm``); 0.0 when abstaining.
    counts0 : (num_classes,) int64 tensor (CPU)
        Selection counts among ``n0`` copies.
    count : int
        Copies among ``n`` (estimation) classified as the selected class.
    n0, n : int
    alpha : float
    counts : (num_classes,) int64 tensor (CPU) or None
        Estimation counts of every class among the ``n`` copies (``count`` is the selected class's); what
        ``otkit verify`` compares a certificate's claimed class with when its noise cannot be drawn again.
    """

    prediction: int
    p_lower: float
    radius: float
    counts0: torch.Tensor = field(repr=False)
    count: int
    n0: int
    n: int
    alpha: float
    counts: torch.Tensor | None = field(default=None, repr=False)

    @property
    def abstained(self) -> bool:
        return self.prediction < 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Certificate) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``counts0`` as a list)."""
        return {"prediction": self.prediction, "p_lower": self.p_lower, "radius": self.radius,
                "counts0": self.counts0.tolist(), "count": self.count, "n0": self.n0, "n": self.n,
                "alpha": self.alpha}


def certify(
    classify: Classify,
    x: torch.Tensor,
    noise: NoiseModel,
    n0: int,
    n: int,
    alpha: float,
    batch: int,
    generator: torch.Generator,
    num_classes: int,
    on_batch: Callable[[int], None] | None = None,
) -> Certificate:
    r"""Cohen et al.'s CERTIFY: selection on ``n0`` copies, estimation on ``n`` fresh ones, then the radius.

    .. math::

        \hat c_A = \arg\max_c \mathrm{counts0}_c, \quad
        \underline{p_A} = B(\alpha;\ k,\ n - k + 1), \quad
        R = \begin{cases} \mathrm{noise.radius}(\underline{p_A}) & \underline{p_A} > 1/2 \\
        0 \text{ (abstain)} & \text{otherwise} \end{cases}

    with :math:`k` the estimation count of :math:`\hat c_A` (ties in the selection go to the lowest class index).
    The two phases draw from ``generator`` one after the other. ``on_batch`` (optional) receives the copies
    classified so far over both phases (out of ``n0 + n``). Arguments as :func:`sample_counts`; ``alpha`` in (0, 1).
    """
    n0, n = check_count("n0", n0), check_count("n", n)
    alpha = _check_alpha(alpha)
    check_count("batch", batch)
    _check_classes(num_classes)
    counts0 = sample_counts(classify, x, noise, n0, batch, generator, num_classes, on_batch)
    top = int(torch.argmax(counts0))
    shifted = None if on_batch is None else (lambda done: on_batch(n0 + done))
    counts = sample_counts(classify, x, noise, n, batch, generator, num_classes, shifted)
    count = int(counts[top])
    p_lower = float(lower_confidence_bound(count, n, alpha))
    if p_lower <= 0.5:
        prediction, radius = -1, 0.0
    else:
        prediction, radius = top, float(noise.radius(p_lower))
    return Certificate(prediction, p_lower, radius, counts0.cpu(), count, n0, n, alpha, counts.cpu())


def predict(
    classify: Classify,
    x: torch.Tensor,
    noise: NoiseModel,
    n: int,
    alpha: float,
    batch: int,
    generator: torch.Generator,
    num_classes: int,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[int, float]:
    """Cohen et al.'s PREDICT: ``(label, p_value)``, label -1 (abstain) unless the p-value is at most ``alpha``.

    The p-value is the two-sided exact binomial test of the top count :math:`n_A` in :math:`n_A + n_B` trials at
    1/2, :math:`n_B` the runner-up count (:func:`~kit.smoothing.bounds.binomial_test_p`). Ties between the top two
    give p = 1. Arguments as :func:`sample_counts`.
    """
    n = check_count("n", n)
    alpha = _check_alpha(alpha)
    counts = sample_counts(classify, x, noise, n, batch, generator, num_classes, on_batch).cpu()
    order = torch.sort(counts, descending=True, stable=True)
    top, n_a, n_b = int(order.indices[0]), int(order.values[0]), int(order.values[1])
    p_value = float(binomial_test_p(n_a, n_a + n_b, 0.5))
    return (top if p_value <= alpha else -1), p_value


def _radii_correct(radii: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    r = radii.detach().double().cpu().numpy() if isinstance(radii, torch.Tensor) else np.asarray(radii, np.float64)
    c = correct.detach().cpu().numpy() if isinstance(correct, torch.Tensor) else np.asarray(correct)
    if r.ndim != 1 or r.size == 0 or c.shape != r.shape:
        raise UserError(f"radii and correct must be 1-D arrays of one length, got shapes {r.shape} and {c.shape}")
    if np.isnan(r).any() or (r < 0).any():
        raise UserError("radii must be >= 0 (0 for abstain)")
    if c.dtype != bool and not np.isin(c, (0, 1)).all():
        raise UserError("correct must be booleans")
    return r, c.astype(bool)


def certified_accuracy(radii: Any, correct: Any, grid: Any) -> np.ndarray:
    r"""Certified accuracy at each radius of ``grid``: the fraction of examples predicted right with radius
    :math:`\ge r` (Cohen et al. 2019, §4), :math:`\frac1N\sum_i \mathbf 1[\mathrm{correct}_i \wedge R_i \ge r]`.

    ``radii`` (N,) >= 0, ``correct`` (N,) bool (an abstention is not correct), ``grid`` any shape of radii.
    Returns float64 of ``grid``'s shape.
    """
    r, c = _radii_correct(radii, correct)
    g = np.asarray(grid, np.float64)
    if np.isnan(g).any():
        raise UserError("grid must not contain NaN")
    eff = np.sort(np.where(c, r, -np.inf))
    return 1.0 - np.searchsorted(eff, g, side="left") / r.size


def certified_auac(radii: Any, correct: Any, r_max: float) -> float:
    r"""Area under the certified-accuracy curve on [0, r_max], normalised:

    .. math::

        \frac{1}{r_{max}}\int_0^{r_{max}} \mathrm{acc}(r)\,dr = \frac1N\sum_i \frac{\min(R_i, r_{max})}{r_{max}},

    with :math:`R_i = 0` for an abstention or a wrong class (the AUAC of :mod:`evaluators.curves` with the certified
    radius in place of eps*).
    """
    r, c = _radii_correct(radii, correct)
    if isinstance(r_max, bool) or not isinstance(r_max, (int, float, np.floating)) or not (0 < r_max < np.inf):
        raise UserError(f"r_max must be a finite number > 0, got {r_max!r}")
    # each term at most 1 before the mean, so rounding cannot take the area above 1 (evaluators.curves.auac)
    return float(np.minimum(np.where(c, r, 0.0) / r_max, 1.0).mean())
