"""Residual networks for small images: CIFAR ResNet-20 and ResNet-18, and Wide ResNets ``wrn-D-W``.

All use a 3x3 stem without max-pooling and end with adaptive average pooling, so any input size works (down to 1x1);
the pooled vector is :meth:`~models.base.Classifier.features`.

References
----------
.. [1] K. He, X. Zhang, S. Ren and J. Sun, "Deep residual learning for image recognition", CVPR 2016.
.. [2] S. Zagoruyko and N. Komodakis, "Wide residual networks", BMVC 2016.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models._common import check_dropout
from models.base import Classifier
from models.registry import register, register_pattern

__all__ = ["BasicBlock", "CifarResNet", "WideBasicBlock", "WideResNet", "parse_wrn_name"]


def _init_weights(module: nn.Module) -> None:
    """He (fan-out) initialisation for convolutions, unit/zero BatchNorm, zero Linear bias [1]_."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Post-activation residual block of He et al. (2016): two 3x3 conv-BN, projection (option B) shortcut.

    Parameters
    ----------
    in_planes, planes
        Input and output channels.
    stride
        Stride of the first convolution; a 1x1 conv + BN shortcut is used when ``stride != 1`` or the width changes.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(Classifier):
    """ResNet for small images (He et al. 2016 [1]_): 3x3 stem conv-BN-ReLU, stages of :class:`BasicBlock`, global
    average pooling (the features), and a linear head.

    ``resnet20`` is the CIFAR-10 ResNet of [1]_ section 4.2 (stem 16, stages 16/32/64 with 3 blocks each, option-B
    shortcuts); ``resnet18`` is the common CIFAR adaptation of ImageNet ResNet-18 (stem 64 without max-pool, stages
    64/128/256/512 with 2 blocks each).

    Parameters
    ----------
    name
        Registry name recorded in ``config``.
    num_classes
        Number of classes (>= 2).
    input_shape
        ``(C, H, W)``; any size works (adaptive pooling).
    widths
        Output channels of each stage; the stem has ``widths[0]`` channels.
    blocks
        Number of blocks per stage; every stage after the first halves the resolution.
    mean, std
        Per-channel normalisation (length ``C`` or 1); ``None`` is the identity.

    References
    ----------
    .. [1] K. He, X. Zhang, S. Ren and J. Sun, "Deep residual learning for image recognition", CVPR 2016.
    """

    def __init__(
        self,
        name: str,
        num_classes: int,
        input_shape: Sequence[int],
        widths: Sequence[int],
        blocks: Sequence[int],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(name, num_classes, input_shape, mean, std)
        c = self.input_shape[0]
        self.stem = nn.Sequential(
            nn.Conv2d(c, widths[0], 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages: list[nn.Module] = []
        in_planes = widths[0]
        for i, (planes, count) in enumerate(zip(widths, blocks)):
            layers: list[nn.Module] = []
            for j in range(count):
                layers.append(BasicBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = in_planes
        self.head = nn.Linear(in_planes, self.num_classes)
        _init_weights(self)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input -> globally pooled features ``(N, widths[-1])``."""
        return self.pool(self.stages(self.stem(x)))

    def logits_from_features(self, z: torch.Tensor) -> torch.Tensor:
        """Pooled features -> logits."""
        return self.head(z)


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block of Zagoruyko & Komodakis (2016): BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3.

    When the width changes, the shortcut is a 1x1 convolution applied to the pre-activated input (as in the authors'
    implementation).

    Parameters
    ----------
    in_planes, planes
        Input and output channels.
    stride
        Stride of the first convolution (and of the shortcut).
    dropout
        Dropout probability between the two convolutions.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.equal_in_out = in_planes == planes and stride == 1
        self.shortcut: nn.Module = (
            nn.Identity() if self.equal_in_out else nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activation residual update."""
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + (x if self.equal_in_out else self.shortcut(pre))


class WideResNet(Classifier):
    """Wide ResNet WRN-D-W (Zagoruyko & Komodakis 2016 [1]_).

    3x3 stem conv with 16 channels; three stages of ``n = (D - 4) / 6`` :class:`WideBasicBlock` with widths 16W, 32W,
    64W (strides 1, 2, 2); final BN-ReLU; adaptive average pooling gives the ``64W``-d features; linear head.

    Parameters
    ----------
    num_classes
        Number of classes (>= 2).
    input_shape
        ``(C, H, W)``; any size works (adaptive pooling).
    depth
        ``D``: at least 10 with ``(D - 4) % 6 == 0``.
    width
        ``W``: widening factor, an integer >= 1.
    mean, std
        Per-channel normalisation (length ``C`` or 1); ``None`` is the identity.
    dropout
        Dropout probability inside each block; default 0.0.

    References
    ----------
    .. [1] S. Zagoruyko and N. Komodakis, "Wide residual networks", BMVC 2016.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: Sequence[int],
        depth: int = 28,
        width: int = 10,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        dropout: float = 0.0,
    ) -> None:
        _check_wrn(depth, width)
        name = f"wrn-{depth}-{width}"
        p = check_dropout(dropout, name)
        super().__init__(name, num_classes, input_shape, mean, std, {"dropout": p})
        self.depth = depth
        self.width = width
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(self.input_shape[0], widths[0], 3, stride=1, padding=1, bias=False)
        stages: list[nn.Module] = []
        in_planes = widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            layers: list[nn.Module] = []
            for j in range(n):
                layers.append(WideBasicBlock(in_planes, planes, stride if j == 0 else 1, p))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.final = nn.Sequential(nn.BatchNorm2d(in_planes), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = in_planes
        self.head = nn.Linear(in_planes, self.num_classes)
        _init_weights(self)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input -> pooled ``64W``-d features."""
        return self.pool(self.final(self.stages(self.stem(x))))

    def logits_from_features(self, z: torch.Tensor) -> torch.Tensor:
        """Pooled features -> logits."""
        return self.head(z)


_WRN_RULE = (
    "Wide ResNet names are wrn-D-W with depth D >= 10 and (D - 4) divisible by 6 (10, 16, 22, 28, 34, 40, ...) "
    "and width W an integer >= 1, e.g. wrn-28-10"
)


def _check_wrn(depth: object, width: object) -> None:
    """Raise a ValueError explaining the WRN rule when ``depth``/``width`` are invalid."""
    for what, value in (("depth", depth), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"Wide ResNet {what} must be an integer, got {value!r}; {_WRN_RULE}")
    if depth < 10 or (depth - 4) % 6 != 0:  # type: ignore[operator]
        raise ValueError(f"bad model name 'wrn-{depth}-{width}': depth {depth} is invalid; {_WRN_RULE}")
    if width < 1:  # type: ignore[operator]
        raise ValueError(f"bad model name 'wrn-{depth}-{width}': width {width} is invalid; {_WRN_RULE}")


def parse_wrn_name(name: str) -> dict[str, Any] | None:
    """Parse ``wrn-D-W`` into ``{"depth": D, "width": W}``.

    Parameters
    ----------
    name
        Lower-case model name.

    Returns
    -------
    dict or None
        The depth and width, or ``None`` if ``name`` is not of the form ``wrn-<int>-<int>``.

    Raises
    ------
    ValueError
        If the form is right but ``D`` or ``W`` violates the rule.
    """
    match = re.fullmatch(r"wrn-(\d+)-(\d+)", name)
    if match is None:
        return None
    depth, width = int(match.group(1)), int(match.group(2))
    _check_wrn(depth, width)
    return {"depth": depth, "width": width}


@register("resnet20", "ResNet-20 for CIFAR, 3 stages 16/32/64 x 3 basic blocks, 0.27M params (He et al. 2016)")
def resnet20(
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Classifier:
    """Build the CIFAR ResNet-20 of He et al. (2016), section 4.2, with projection shortcuts."""
    return CifarResNet("resnet20", num_classes, input_shape, (16, 32, 64), (3, 3, 3), mean, std)


@register("resnet18", "ResNet-18, CIFAR variant (3x3 stem, no max-pool), 64-512 channels, 11.2M (He et al. 2016)")
def resnet18(
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Classifier:
    """Build the CIFAR-style ResNet-18 (He et al. 2016)."""
    return CifarResNet("resnet18", num_classes, input_shape, (64, 128, 256, 512), (2, 2, 2, 2), mean, std)


@register_pattern(
    "wrn-D-W",
    "Wide ResNet of depth D and width W, pre-activation, e.g. wrn-28-10 (Zagoruyko & Komodakis 2016)",
    prefix="wrn-",
    parse=parse_wrn_name,
    rule=_WRN_RULE,
)
def wide_resnet(
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    depth: int,
    width: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dropout: float = 0.0,
) -> Classifier:
    """Build :class:`WideResNet` ``wrn-{depth}-{width}``."""
    return WideResNet(num_classes, input_shape, depth, width, mean, std, dropout)
