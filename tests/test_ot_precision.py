"""The OT solvers under automatic mixed precision: autocast off inside, half-precision points solved in float32.

CPU autocast (bfloat16) stands in for CUDA's: it casts the same matrix products (the cost's ``baddbmm``, ``bmm``,
``matmul``), which is what broke SAT's divergence under ``otkit train --amp``.
"""

from __future__ import annotations

import torch

from kit.ot.projection import project_wasserstein
from kit.ot.sinkhorn import sinkhorn, sinkhorn_divergence


def _logits(seed: int, n: int = 32, k: int = 10, scale: float = 8.0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale


def test_sinkhorn_divergence_ignores_autocast():
    clean, adv = _logits(0), _logits(0) + 0.05 * _logits(1) / 8
    ref = sinkhorn_divergence(clean, adv, reg=1.0).divergence
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sinkhorn_divergence(clean, adv, reg=1.0).divergence
        # what autocast does to the cost's matrix product without the guard: bfloat16 (8-bit mantissa)
        cross = torch.matmul(clean, adv.T)
    assert cross.dtype == torch.bfloat16  # autocast is active here
    assert got.dtype == torch.float32 and torch.allclose(got, ref, rtol=1e-5, atol=1e-6), (float(got), float(ref))


def test_half_points_are_solved_in_float32():
    x, y = _logits(2), _logits(3)
    xh, yh = x.half(), y.half()
    ref = sinkhorn(xh.float(), yh.float(), reg=2.0)
    got = sinkhorn(xh, yh, reg=2.0)
    assert got.value.dtype == torch.float32 and torch.allclose(got.value, ref.value, rtol=1e-6)
    # and the divergence's gradient reaches half-precision logits (as SAT's under --amp)
    xg = xh.clone().requires_grad_(True)
    sinkhorn_divergence(xg, yh, reg=2.0).divergence.backward()
    assert xg.grad is not None and xg.grad.dtype == torch.float16 and torch.isfinite(xg.grad).all()


def test_projection_ignores_autocast():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 1, 12, 12, generator=g)
    w = (x + 0.1 * torch.sign(torch.randn(x.shape, generator=g))).clamp(0, 1)
    ref = project_wasserstein(w, x, 0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = project_wasserstein(w, x, 0.05)
    assert torch.equal(got.z, ref.z) and torch.equal(got.iterations, ref.iterations)
