"""Randomized-smoothing certificates as pure math over a classifier callable (no engines, no reports).

- :mod:`kit.smoothing.bounds`: Clopper–Pearson bounds and the binomial test (scipy).
- :mod:`kit.smoothing.noise`: noise models (Gaussian for L2, Laplace flows for Wasserstein) and their radii.
- :mod:`kit.smoothing.certify`: Cohen et al.'s CERTIFY and PREDICT, per-example generators, certified accuracy.
"""

from kit.smoothing.bounds import binomial_test_p, clopper_pearson, lower_confidence_bound
from kit.smoothing.certify import (
    Certificate,
    certified_accuracy,
    certified_auac,
    certify,
    example_generator,
    noise_block,
    noise_stream,
    predict,
    sample_counts,
)
from kit.smoothing.noise import (
    GaussianNoise,
    NoiseModel,
    Smoothing,
    WassersteinNoise,
    edge_differences,
    flow_divergence,
    make_noise,
)

__all__ = ["Certificate", "GaussianNoise", "NoiseModel", "Smoothing", "WassersteinNoise", "binomial_test_p",
           "certified_accuracy", "certified_auac", "certify", "clopper_pearson", "edge_differences",
           "example_generator", "flow_divergence", "lower_confidence_bound", "make_noise", "noise_block", "noise_stream",
           "predict", "sample_counts"]
