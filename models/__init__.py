"""The otkit model zoo: image classifiers that normalise their own inputs, behind a timm-style registry.

Every model is a :class:`Classifier` taking pixels in ``[0, 1]`` of shape ``(N, C, H, W)``; normalisation statistics
are buffers of ``model.normalize`` (saved in ``state_dict``, baked into ONNX exports). ``model.features(x)`` is the
penultimate layer used by feature-space losses, and ``model.config`` rebuilds the architecture via :func:`from_config`.

Examples
--------
>>> import models
>>> model = models.create("cnn-small", num_classes=10, input_shape=(1, 28, 28), mean=[0.1307], std=[0.3081])
>>> twin = models.from_config(model.config)
>>> _ = twin.load_state_dict(model.state_dict())

Registered names (see :func:`list_models` and :func:`describe`): ``cnn-small``, ``cnn-cw``, ``otc``, ``resnet20``,
``resnet18`` and the pattern ``wrn-D-W`` (``wrn-28-10``, ``wrn-34-10``, ``wrn-16-2``, ...).

This package imports only torch and the standard library. Invalid names, shapes or options raise :class:`ValueError`
with a one-line message naming the model and the problem.
"""

from __future__ import annotations

# Registration order is listing order: the small MNIST networks first, then the residual networks.
# isort: off
from models import small as _small  # noqa: F401  (registers cnn-small, cnn-cw, otc)
from models import resnet as _resnet  # noqa: F401  (registers resnet20, resnet18, wrn-D-W)
# isort: on
from models.base import Classifier, Normalize
from models.registry import check_options, create, describe, from_config, list_models, register, register_pattern
from models.resnet import CifarResNet, WideResNet
from models.small import CNNCarliniWagner, CNNSmall, OTClassifier

__all__ = [
    "CNNCarliniWagner",
    "CNNSmall",
    "Classifier",
    "CifarResNet",
    "Normalize",
    "OTClassifier",
    "WideResNet",
    "check_options",
    "create",
    "describe",
    "from_config",
    "list_models",
    "register",
    "register_pattern",
]
