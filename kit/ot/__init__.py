"""Optimal transport on the GPU, in the log domain.

- :mod:`kit.ot.sinkhorn`: batched entropic OT between point clouds and the debiased Sinkhorn divergence (SAT).
- :mod:`kit.ot.local`: local k x k transport plans on images (costs, plan marginals, plan cost, exact reference).
- :mod:`kit.ot.projection`: projected Sinkhorn onto a Wasserstein ball (Wong et al. 2019).
- :mod:`kit.ot.unbalanced`: the KL-relaxed (unbalanced) Sinkhorn projection (seed paper 004).

Import the submodules directly; this package imports nothing heavy on its own.
"""
