"""Small convolutional classifiers from the Wasserstein-robustness literature (no batch normalisation).

* ``cnn-small``: the MNIST network of Wong & Kolter (2018), used by the projected-Sinkhorn Wasserstein attack of
  Wong, Schmidt & Kolter (2019).
* ``cnn-cw``: the MNIST CNN of Carlini & Wagner (2017), used by the GOT experiments.
* ``otc``: the OT-Classifier (an encoder to a low-dimensional latent, a classifier on the latent, and a latent WGAN
  critic used only in training), after Li et al. (2018).

References
----------
.. [1] E. Wong and J. Z. Kolter, "Provable defenses against adversarial examples via the convex outer adversarial
   polytope", ICML 2018.
.. [2] E. Wong, F. R. Schmidt and J. Z. Kolter, "Wasserstein adversarial examples via projected Sinkhorn iterations",
   ICML 2019.
.. [3] N. Carlini and D. Wagner, "Towards evaluating the robustness of neural networks", IEEE S&P 2017.
.. [4] Y. Li, M. R. Min, W. Yu, C.-J. Hsieh, T. C. M. Lee and E. Kruus, "Optimal transport classifier: defending
   against adversarial attacks by regularized deep embedding", arXiv:1811.07950, 2018.
.. [5] M. Arjovsky, S. Chintala and L. Bottou, "Wasserstein generative adversarial networks", ICML 2017.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models._common import check_dropout, check_positive_int, conv_out
from models.base import Classifier
from models.registry import register

__all__ = ["CNNCarliniWagner", "CNNSmall", "OTClassifier"]


class CNNSmall(Classifier):
    """The small MNIST CNN of Wong & Kolter (2018) [1]_, the target model of the projected-Sinkhorn attack [2]_.

    ``Conv(C,16,4,s2,p1)-ReLU-Conv(16,32,4,s2,p1)-ReLU-Flatten-Linear(.,100)-ReLU`` gives the 100-d features, then
    ``Linear(100, num_classes)``. The flatten size is computed from ``input_shape``; inputs from 4x4 up work.

    Parameters
    ----------
    num_classes
        Number of classes (>= 2).
    input_shape
        ``(C, H, W)``, ``H, W >= 4``.
    mean, std
        Per-channel normalisation (length ``C`` or 1); ``None`` is the identity.

    References
    ----------
    .. [1] E. Wong and J. Z. Kolter, "Provable defenses against adversarial examples via the convex outer adversarial
       polytope", ICML 2018.
    .. [2] E. Wong, F. R. Schmidt and J. Z. Kolter, "Wasserstein adversarial examples via projected Sinkhorn
       iterations", ICML 2019.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: Sequence[int],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__("cnn-small", num_classes, input_shape, mean, std, min_size=(4, 4))
        c, h, w = self.input_shape
        oh = conv_out(conv_out(h, 4, 2, 1), 4, 2, 1)
        ow = conv_out(conv_out(w, 4, 2, 1), 4, 2, 1)
        self.feature_dim = 100
        self.body = nn.Sequential(
            nn.Conv2d(c, 16, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * oh * ow, 100),
            nn.ReLU(),
        )
        self.head = nn.Linear(100, self.num_classes)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input -> 100-d features."""
        return self.body(x)

    def logits_from_features(self, z: torch.Tensor) -> torch.Tensor:
        """Features ``(N, 100)`` -> logits."""
        return self.head(z)


class CNNCarliniWagner(Classifier):
    """The MNIST CNN of Carlini & Wagner (2017) [1]_ (as used by GOT).

    ``Conv 32 3x3-ReLU-Conv 32 3x3-ReLU-MaxPool 2-Conv 64 3x3-ReLU-Conv 64 3x3-ReLU-MaxPool 2-Flatten-Linear 200-ReLU-
    [Dropout]-Linear 200-ReLU`` gives the 200-d features, then ``Linear(200, num_classes)``. Convolutions are unpadded
    as in the original, so inputs must be at least 16x16.

    Parameters
    ----------
    num_classes
        Number of classes (>= 2).
    input_shape
        ``(C, H, W)``, ``H, W >= 16``.
    mean, std
        Per-channel normalisation (length ``C`` or 1); ``None`` is the identity.
    dropout
        Dropout probability after the first fully connected layer (C&W trained with 0.5); default 0.0.

    References
    ----------
    .. [1] N. Carlini and D. Wagner, "Towards evaluating the robustness of neural networks", IEEE S&P 2017.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: Sequence[int],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        dropout: float = 0.0,
    ) -> None:
        p = check_dropout(dropout, "cnn-cw")
        super().__init__("cnn-cw", num_classes, input_shape, mean, std, {"dropout": p}, min_size=(16, 16))
        c, h, w = self.input_shape

        def out(n: int) -> int:
            n = conv_out(conv_out(n, 3), 3) // 2
            return conv_out(conv_out(n, 3), 3) // 2

        self.feature_dim = 200
        self.body = nn.Sequential(
            nn.Conv2d(c, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * out(h) * out(w), 200),
            nn.ReLU(),
            nn.Dropout(p),
            nn.Linear(200, 200),
            nn.ReLU(),
        )
        self.head = nn.Linear(200, self.num_classes)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input -> 200-d features."""
        return self.body(x)

    def logits_from_features(self, z: torch.Tensor) -> torch.Tensor:
        """Features ``(N, 200)`` -> logits."""
        return self.head(z)


def _mlp(in_dim: int, out_dim: int, hidden: int = 256) -> nn.Sequential:
    """Two-hidden-layer ReLU MLP ``in_dim -> hidden -> hidden -> out_dim``."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
    )


class OTClassifier(Classifier):
    """OT-Classifier: classify in a low-dimensional latent regularised by optimal transport (Li et al. 2018 [1]_).

    The deployed network is ``classifier(encoder(normalize(x)))``:

    * ``encoder``: ``Conv(C,32,3,p1)-ReLU-Conv(32,64,4,s2,p1)-ReLU-Conv(64,128,4,s2,p1)-ReLU-Flatten-Linear(.,256)-ReLU-
      Linear(256, latent_dim)``; its output is :meth:`features` (``feature_dim == latent_dim``).
    * ``classifier``: MLP ``latent_dim -> 256 -> ReLU -> 256 -> ReLU -> num_classes``.
    * ``critic``: a latent WGAN critic [2]_, MLP ``latent_dim -> 256 -> ReLU -> 256 -> ReLU -> 1``. It is a submodule so
      its weights are checkpointed, but neither :meth:`forward` nor :meth:`features` uses it.

    Parameters
    ----------
    num_classes
        Number of classes (>= 2).
    input_shape
        ``(C, H, W)``, ``H, W >= 4``.
    mean, std
        Per-channel normalisation (length ``C`` or 1); ``None`` is the identity.
    latent_dim
        Latent size; ``None`` picks 4 for one-channel inputs and 16 otherwise.

    References
    ----------
    .. [1] Y. Li, M. R. Min, W. Yu, C.-J. Hsieh, T. C. M. Lee and E. Kruus, "Optimal transport classifier: defending
       against adversarial attacks by regularized deep embedding", arXiv:1811.07950, 2018.
    .. [2] M. Arjovsky, S. Chintala and L. Bottou, "Wasserstein generative adversarial networks", ICML 2017.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: Sequence[int],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        latent_dim: int | None = None,
    ) -> None:
        if latent_dim is not None:
            check_positive_int(latent_dim, "latent_dim", "otc")
        channels = input_shape[0] if isinstance(input_shape, Sequence) and len(input_shape) == 3 else None
        resolved = latent_dim if latent_dim is not None else (4 if channels == 1 else 16)
        super().__init__("otc", num_classes, input_shape, mean, std, {"latent_dim": resolved}, min_size=(4, 4))
        c, h, w = self.input_shape
        oh = conv_out(conv_out(h, 4, 2, 1), 4, 2, 1)
        ow = conv_out(conv_out(w, 4, 2, 1), 4, 2, 1)
        self.latent_dim = resolved
        self.feature_dim = resolved
        self.encoder = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 128, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(128 * oh * ow, 256),
            nn.ReLU(),
            nn.Linear(256, resolved),
        )
        self.classifier = _mlp(resolved, self.num_classes)
        self.critic = _mlp(resolved, 1)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input -> latent ``(N, latent_dim)``."""
        return self.encoder(x)

    def logits_from_features(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``(N, latent_dim)`` -> logits."""
        return self.classifier(z)


@register("cnn-small", "Small MNIST CNN, 2 conv + 2 FC (Wong & Kolter 2018; projected Sinkhorn, Wong et al. 2019)")
def cnn_small(
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Classifier:
    """Build :class:`CNNSmall`."""
    return CNNSmall(num_classes, input_shape, mean, std)


@register("cnn-cw", "MNIST CNN, 4 conv + 3 FC, unpadded, inputs >= 16x16 (Carlini & Wagner 2017; used by GOT)")
def cnn_cw(
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dropout: float = 0.0,
) -> Classifier:
    """Build :class:`CNNCarliniWagner`."""
    return CNNCarliniWagner(num_classes, input_shape, mean, std, dropout)


@register("otc", "OT-Classifier: conv encoder to a small latent + MLP classifier + latent WGAN critic (Li et al. 2018)")
def otc(
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    latent_dim: int | None = None,
) -> Classifier:
    """Build :class:`OTClassifier`."""
    return OTClassifier(num_classes, input_shape, mean, std, latent_dim)
