r"""Noise models for randomized smoothing and their certified radii.

A noise model draws noisy copies :math:`x + \delta` of one image and turns a lower confidence bound
:math:`\underline{p_A}` on the smoothed classifier's top-class probability into a certified radius in its threat
model's units. Two models:

**Gaussian** (:class:`GaussianNoise`, L2): :math:`\delta \sim \mathcal N(0, \sigma^2 I)`; with :math:`p_B = 1 -
\underline{p_A}` Theorem 1 of Cohen, Rosenfeld & Kolter ("Certified Adversarial Robustness via Randomized Smoothing",
ICML 2019) gives :math:`R = \sigma\,\Phi^{-1}(\underline{p_A})` in pixel units ([0, 1] scale).

**Wasserstein** (:class:`WassersteinNoise`): Levine & Feizi, "Wasserstein Smoothing: Certified Robustness against
Wasserstein Adversarial Attacks", AISTATS 2020 (arXiv 1910.10783): Laplace noise on the *flows* between neighbouring
pixels, certified through an L1 bound in flow space, mapped here onto the kit's Wasserstein threat model.

*The kit's units.* :mod:`kit.ot.projection`, :mod:`kit.attacks.wasserstein` and :mod:`kit.attacks.frank_wolfe` divide
each example by its total mass over all channels, :math:`m = \sum_{c,h,w} x` (one number per example, not one per
channel), :math:`\hat x = x / m`; transport stays within channels (each channel of an adversarial keeps the mass of
the same channel of :math:`x`) and its cost is the Euclidean pixel distance (``p=2``) inside k x k windows
(:mod:`kit.ot.local`). The kit distance is therefore

.. math::

    d_k(x, x') = \sum_c \min_{\Pi_c \in \text{local plans}(\hat x_c \to \hat x'_c)} \langle \Pi_c, C^{(2)} \rangle,
    \qquad \hat x' = x' / m .

*Flows.* On each channel take the 4-neighbour grid graph with its :math:`H(W-1)` horizontal edges (pixel
:math:`(i, j) \to (i, j+1)`) and :math:`(H-1)W` vertical edges (:math:`(i, j) \to (i+1, j)`). A flow :math:`F` is one
number per edge and channel; :func:`flow_divergence` moves :math:`F_e` of mass from the edge's source to its target
(subtract at the source, add at the target; negative flow moves mass back), so every channel's mass is unchanged.
The noisy copies are

.. math::

    \tilde x = m\,(\hat x + \operatorname{div} F) = x + m \operatorname{div} F, \qquad
    F_e \overset{\text{iid}}{\sim} \mathrm{Laplace}(0, b),\ \ b = \sigma / \sqrt 2 ,

so :math:`\sigma` is the standard deviation of every flow, in the unit-mass scale (in pixel units a flow has standard
deviation :math:`m\sigma`). Samples are not clipped to [0, 1]: clipping would break the shift structure below.

*The certificate, step by step.*

1. *Flow representation* (Levine & Feizi's flow space). If :math:`x'` has the channel masses of :math:`x`, then
   :math:`\hat x' = \hat x + \operatorname{div} G` for some flow :math:`G` (the grid is connected), and the least
   :math:`\|G\|_1` over such flows is :math:`W_{\ell_1}(\hat x, \hat x') = \sum_c W_1(\hat x_c, \hat x'_c)` with the
   graph's shortest-path metric as ground cost: an uncapacitated min-cost flow with unit edge costs is the transport
   problem for the graph metric (Beckmann's formulation), and on a full rectangular 4-grid the shortest path between
   two pixels has the Manhattan length :math:`|\Delta i| + |\Delta j|`.
2. *Shift structure.* The mass of :math:`x'` is :math:`m`, so the noise around :math:`x'` is the same law with the
   same scale: :math:`\tilde x' = m(\hat x + \operatorname{div}(G + F))`. The smoothed class probabilities at
   :math:`x'` are :math:`h_c(G) = P_F[f(m(\hat x + \operatorname{div}(G + F))) = c]`, the Laplace smoothing of a
   function of the flow :math:`G \in \mathbb R^{C|E|}`, evaluated at :math:`G` (and at 0 for :math:`x`).
3. *Laplace L1 certificate* (Teng, Lee & Yuan, "ℓ1 Adversarial Robustness Certificates: a Randomized Smoothing
   Approach", 2020, the tight bound for i.i.d. Laplace noise with :math:`p_B = 1 - p_A`): if
   :math:`h_A(0) \ge \underline{p_A} > 1/2` then :math:`h_A(G) > 1/2` whenever

   .. math::

       \|G\|_1 < \rho = -b \ln\bigl(2(1 - \underline{p_A})\bigr)

   (:meth:`WassersteinNoise.flow_radius`), so the smoothed prediction is unchanged for every :math:`x'` with
   :math:`W_{\ell_1}(\hat x, \hat x') < \rho`.
   (Teng et al.'s other bound, :math:`\tfrac b2 \ln(p_A / p_B)`, is never larger with :math:`p_B = 1 - p_A`: their
   difference is :math:`-\tfrac b2 \ln(4 p_A(1 - p_A)) \ge 0`.)
4. *Ground metric.* For a displacement :math:`u \in \mathbb Z^2`, :math:`\|u\|_1 \le \sqrt 2 \|u\|_2`
   (Cauchy–Schwarz), so every plan's Manhattan cost is at most :math:`\sqrt 2` times its Euclidean cost:
   :math:`W_{\ell_1} \le \sqrt 2\, W_{\ell_2} \le \sqrt 2\, d_k` (the window only removes plans, so
   :math:`d_k \ge W_{\ell_2}`, the unrestricted Euclidean distance).
5. Hence :math:`d_k(x, x') < \rho / \sqrt 2 \Rightarrow W_{\ell_1} < \rho \Rightarrow` the same prediction: the
   radius in the kit's units is

   .. math::

       R = \rho / \sqrt 2 = -\tfrac{\sigma}{2} \ln\bigl(2(1 - \underline{p_A})\bigr)

   (:meth:`WassersteinNoise.radius`).

*Where tightness is lost.* :math:`\|u\|_1 = \sqrt 2\|u\|_2` only for exactly diagonal displacements
(:math:`|\Delta i| = |\Delta j|`); mass moved along rows or columns costs the same in both metrics, so the
:math:`\sqrt 2` is paid in full only by diagonal transport (for an attack that moves mass along one axis the
certificate would hold up to :math:`\rho`). The k x k window adds slack in the safe direction (the certificate covers
the unrestricted ball). Step 3 is tight over all base classifiers with the given :math:`p_A` (a threshold on one flow
coordinate attains it; ``tests/test_smoothing.py`` checks this on a one-edge image), not for a particular one. An
attack run with the Manhattan cost (``p=1``) would be certified up to :math:`\rho` itself.

*Scope.* The certificate covers mass-preserving perturbations only: every channel of :math:`x'` must carry the mass of
the same channel of :math:`x` (the kit's balanced Wasserstein attacks, whose outputs do). It says nothing about the
unbalanced attack (:mod:`kit.attacks.unbalanced`), whose outputs create and destroy mass: such an :math:`x'` is not
:math:`x + m\operatorname{div} G` for any flow, and its own mass would rescale the noise.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from enum import Enum
from typing import Any

import numpy as np
import torch
from scipy import stats

from kit.errors import UserError


class Smoothing(str, Enum):
    """The noise models (closed vocabulary): ``gaussian`` (L2 certificates), ``wasserstein`` (Wasserstein ones)."""

    GAUSSIAN = "gaussian"
    WASSERSTEIN = "wasserstein"


def check_sigma(sigma: Any) -> float:
    """``sigma`` as a float if it is a finite number > 0; otherwise :class:`UserError`."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.integer, np.floating)):
        raise UserError(f"sigma must be a finite number > 0, got {sigma!r}")
    if not (math.isfinite(float(sigma)) and sigma > 0):
        raise UserError(f"sigma must be a finite number > 0, got {sigma!r}")
    return float(sigma)


def check_count(name: str, value: Any, low: int = 1) -> int:
    """``value`` as an int if it is an integer >= ``low``; otherwise :class:`UserError`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _p_lower(p_lower: Any) -> np.ndarray:
    p = np.asarray(p_lower, dtype=np.float64) if not isinstance(p_lower, torch.Tensor) else (
        p_lower.detach().double().cpu().numpy())
    if not ((p >= 0) & (p <= 1)).all():  # NaN fails too
        raise UserError("p_lower must lie in [0, 1]")
    return p


def _noise_dtype(x: torch.Tensor) -> torch.dtype:
    """Noise is drawn in x's dtype, or float32 for half-precision images (then cast)."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


class NoiseModel(ABC):
    """A smoothing distribution and its certificate.

    Attributes
    ----------
    kind : Smoothing
    sigma : float
        The noise's standard deviation (per pixel for Gaussian noise, per flow for Wasserstein noise).
    norm : str
        The threat model of :meth:`radius`: ``"l2"`` or ``"wasserstein"``.
    """

    kind: Smoothing
    norm: str

    def __init__(self, sigma: float) -> None:
        self.sigma = check_sigma(sigma)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.sigma == self.sigma  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.sigma))

    def sample(self, x: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` noisy copies of one image.

        Parameters
        ----------
        x : (C, H, W) floating tensor
            One image in [0, 1].
        count : int
            Copies, >= 1.
        generator : torch.Generator
            On ``x``'s device type; all randomness comes from it (one call advances it by an amount that depends only
            on ``count`` and ``x.shape``).

        Returns
        -------
        (count, C, H, W) tensor on ``x``'s device, in ``x``'s dtype.
        """
        check_image(x)
        count = check_count("count", count)
        if not isinstance(generator, torch.Generator):
            raise UserError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != x.device.type:
            raise UserError(f"the generator is on {generator.device} but the image on {x.device}")
        return self._sample(x, count, generator)

    @abstractmethod
    def _sample(self, x: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` noisy copies of the checked image ``x`` (each model's own distribution)."""

    def radius(self, p_lower: Any) -> np.ndarray:
        """Certified radius (float64 array, shape of ``p_lower``) from lower bounds on the top-class probability;
        0 where ``p_lower <= 1/2`` (abstain), ``inf`` at 1."""
        p = _p_lower(p_lower)
        out = np.zeros(p.shape, dtype=np.float64)
        ok = p > 0.5
        if ok.any():
            with np.errstate(divide="ignore"):
                out[ok] = self._radius(p[ok])
        return out

    @abstractmethod
    def _radius(self, p: np.ndarray) -> np.ndarray:
        """Radii for the lower bounds ``p`` (all above 1/2) in the model's units."""

    def max_radius(self, n: int, alpha: float) -> float:
        r"""The largest radius ``n`` samples can certify at confidence :math:`1 - \alpha`: every sample right gives
        :math:`\underline{p_A} = \alpha^{1/n}` (:func:`~kit.smoothing.bounds.lower_confidence_bound` with
        :math:`k = n`)."""
        n = check_count("n", n)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not 0 < alpha < 1:
            raise UserError(f"alpha must lie in (0, 1), got {alpha!r}")
        return float(self.radius(float(alpha) ** (1.0 / n)))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (``kind``, ``sigma``, ``norm``)."""
        return {"kind": self.kind.value, "sigma": self.sigma, "norm": self.norm}


def check_image(x: Any) -> torch.Tensor:
    """``x`` if it is one (C, H, W) floating-point image; otherwise :class:`UserError`."""
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise UserError(f"x must be one (C, H, W) floating-point image, got {shape}")
    if x.numel() == 0:
        raise UserError(f"x must be a non-empty image, got shape {tuple(x.shape)}")
    return x


class GaussianNoise(NoiseModel):
    r"""Isotropic Gaussian noise, :math:`\delta \sim \mathcal N(0, \sigma^2 I)`, and its L2 certificate.

    Cohen, Rosenfeld & Kolter (ICML 2019), Theorem 1 with :math:`\overline{p_B} = 1 - \underline{p_A}`:
    :math:`R = \tfrac{\sigma}{2}(\Phi^{-1}(\underline{p_A}) - \Phi^{-1}(\overline{p_B})) = \sigma\,\Phi^{-1}(
    \underline{p_A})`, in pixel units ([0, 1] scale, the kit's L2 epsilons).
    """

    kind = Smoothing.GAUSSIAN
    norm = "l2"

    def _sample(self, x: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn((count, *x.shape), generator=generator, device=x.device, dtype=_noise_dtype(x))
        return (x.to(noise.dtype) + self.sigma * noise).to(x.dtype)

    def _radius(self, p: np.ndarray) -> np.ndarray:
        return self.sigma * stats.norm.ppf(p)


def flow_divergence(fh: torch.Tensor, fv: torch.Tensor) -> torch.Tensor:
    r"""Net mass received by each pixel from horizontal and vertical flows on the 4-neighbour grid.

    ``fh[..., i, j]`` moves mass from pixel (i, j) to (i, j + 1) and ``fv[..., i, j]`` from (i, j) to (i + 1, j)
    (negative values move it back):

    .. math::

        (\operatorname{div} F)_{i,j} = F^h_{i,j-1} - F^h_{i,j} + F^v_{i-1,j} - F^v_{i,j}

    (terms outside the grid are 0), so ``div.sum((-2, -1)) == 0``: mass is conserved.

    Parameters
    ----------
    fh : (..., H, W - 1) tensor
    fv : (..., H - 1, W) tensor

    Returns
    -------
    (..., H, W) tensor
    """
    h, w = fh.shape[-2], fh.shape[-1] + 1
    if fv.shape[:-2] != fh.shape[:-2] or fv.shape[-2:] != (h - 1, w):
        raise UserError(f"flows of shapes {tuple(fh.shape)} (horizontal) and {tuple(fv.shape)} (vertical) do not "
                        f"fit one grid")
    pad = torch.nn.functional.pad
    return pad(fh, (1, 0)) - pad(fh, (0, 1)) + pad(fv, (0, 0, 1, 0)) - pad(fv, (0, 0, 0, 1))


def edge_differences(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The adjoint of :func:`flow_divergence`: ``v`` at each edge's target minus ``v`` at its source.

    :math:`\langle v, \operatorname{div} F\rangle = \langle D^h v, F^h\rangle + \langle D^v v, F^v\rangle` with
    ``D^h v = v[..., :, 1:] - v[..., :, :-1]`` ((..., H, W - 1)) and ``D^v v = v[..., 1:, :] - v[..., :-1, :]``
    ((..., H - 1, W)). For a linear function :math:`w \cdot x` the least flow-L1 norm that changes it by :math:`t` is
    :math:`|t| / \max(\|D^h w\|_\infty, \|D^v w\|_\infty)` (the dual norm of L1).
    """
    return v[..., :, 1:] - v[..., :, :-1], v[..., 1:, :] - v[..., :-1, :]


class WassersteinNoise(NoiseModel):
    r"""Laplace noise on the flows between 4-neighbouring pixels, in the kit's unit-mass scale (Levine & Feizi 2020).

    Each call draws, per copy and channel, i.i.d. :math:`\mathrm{Laplace}(0, b)` flows with :math:`b = \sigma/\sqrt 2`
    (standard deviation :math:`\sigma`) on the :math:`H(W-1)` horizontal and :math:`(H-1)W` vertical edges and returns
    :math:`x + m \operatorname{div} F`, :math:`m = \sum_{c,h,w} x` the example's mass (the module docstring derives the
    certificate and its units). Every channel of every copy keeps the mass of the same channel of ``x``. An image
    without mass (all zero) comes back unchanged: no mass-preserving perturbation of it exists.

    ``radius`` is in the kit's Wasserstein units (unit mass per example, Euclidean pixel distance):
    :math:`R = \rho/\sqrt 2 = -\tfrac{\sigma}{2}\ln(2(1 - \underline{p_A}))`; ``flow_radius`` is :math:`\rho`, the
    certified flow-L1 (Manhattan-ground-cost Wasserstein) radius.
    """

    kind = Smoothing.WASSERSTEIN
    norm = "wasserstein"

    @property
    def laplace_scale(self) -> float:
        r"""Scale :math:`b = \sigma / \sqrt 2` of each flow's Laplace law."""
        return self.sigma / math.sqrt(2.0)

    def _sample(self, x: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
        c, h, w = x.shape
        dt = _noise_dtype(x)
        xd = x.to(dt)
        if bool((xd < 0).any()):
            raise UserError(f"x must be non-negative for Wasserstein smoothing (mass), got min {float(xd.min()):.4g}")
        mass = xd.sum(dtype=torch.float64).to(dt)

        def laplace(shape: tuple[int, ...]) -> torch.Tensor:
            # Laplace(0, b) as b (E1 - E2), E1, E2 ~ Exp(1): finite for every draw
            e = torch.empty((2, *shape), device=x.device, dtype=dt).exponential_(generator=generator)
            return self.laplace_scale * (e[0] - e[1])

        fh = laplace((count, c, h, w - 1))
        fv = laplace((count, c, h - 1, w))
        return (xd + mass * flow_divergence(fh, fv)).to(x.dtype)

    def flow_radius(self, p_lower: Any) -> np.ndarray:
        r"""Certified flow-L1 radius :math:`\rho = -b\ln(2(1 - \underline{p_A}))` (Teng et al. 2020), unit-mass scale:
        the Wasserstein radius for the Manhattan ground cost. 0 where ``p_lower <= 1/2``."""
        p = _p_lower(p_lower)
        out = np.zeros(p.shape, dtype=np.float64)
        ok = p > 0.5
        with np.errstate(divide="ignore"):
            out[ok] = -self.laplace_scale * np.log(2.0 * (1.0 - p[ok]))
        return out

    def _radius(self, p: np.ndarray) -> np.ndarray:
        return self.flow_radius(p) / math.sqrt(2.0)

    def to_dict(self) -> dict[str, Any]:
        """``kind``, ``sigma``, ``norm`` and the flows' ``laplace_scale``."""
        return {**super().to_dict(), "laplace_scale": self.laplace_scale}


_MODELS: dict[Smoothing, type[NoiseModel]] = {Smoothing.GAUSSIAN: GaussianNoise,
                                              Smoothing.WASSERSTEIN: WassersteinNoise}


def make_noise(kind: Smoothing | str, sigma: float) -> NoiseModel:
    """The noise model named ``kind`` (``"gaussian"`` or ``"wasserstein"``) with standard deviation ``sigma`` > 0."""
    try:
        parsed = Smoothing(kind)
    except ValueError:
        raise UserError(f"unknown smoothing {kind!r}; known: {', '.join(s.value for s in Smoothing)}") from None
    return _MODELS[parsed](sigma)
