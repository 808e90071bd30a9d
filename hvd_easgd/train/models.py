"""Networks: the paper's CIFAR-10 and ImageNet models, torchvision ResNets, and a net for digits.

Every model returns logits; the softmax of the paper's last layer lives in the loss
(``nn.CrossEntropyLoss``). ``build_model(name, num_classes, ...)`` is the only entry point the
trainer needs; ``MODEL_NAMES`` lists the valid names.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["MODEL_NAMES", "build_model", "CifarPaperNet", "ImageNetPaperNet", "DigitsNet"]


def _conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _init_biases(module: nn.Module, value: float) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            nn.init.constant_(m.bias, value)


class _PaperNet(nn.Module):
    """A ``features`` stack of (name, kind, out_channels, kernel, stride, padding) layers, then
    fully-connected+ReLU+dropout layers and a linear classifier.

    Each layer the paper lists is one named module (``conv1``, ``pool1``, ..., ``fc1``,
    ``classifier``) so forward hooks see exactly the paper's (channels, size) after each layer.
    """

    #: (name, "conv"|"pool", out_channels (conv only), kernel, stride, padding)
    LAYERS: Sequence[Tuple[str, str, int, int, int, int]] = ()
    PAPER_IMAGE_SIZE = 0
    BIAS_INIT = 0.0

    def __init__(self, num_classes: int, in_channels: int, image_size: Optional[int],
                 hidden: Sequence[int], dropout: float):
        super().__init__()
        size = self.PAPER_IMAGE_SIZE if image_size is None else int(image_size)
        channels = in_channels
        feats: "OrderedDict[str, nn.Module]" = OrderedDict()
        spatial = size
        for name, kind, out_ch, k, s, p in self.LAYERS:
            spatial = _conv_out(spatial, k, s, p)
            if spatial < 1:
                raise ValueError(
                    f"{type(self).__name__}: image_size={size} is too small (the feature map "
                    f"vanishes at layer {name}); the paper uses {self.PAPER_IMAGE_SIZE}, the "
                    f"smallest that works is {self.min_image_size()}")
            if kind == "conv":
                feats[name] = nn.Conv2d(channels, out_ch, kernel_size=k, stride=s, padding=p)
                feats[f"{name}_relu"] = nn.ReLU(inplace=True)
                channels = out_ch
            else:
                feats[name] = nn.MaxPool2d(kernel_size=k, stride=s, padding=p)
        self.features = nn.Sequential(feats)
        self.feature_shape = (channels, spatial, spatial)
        head: "OrderedDict[str, nn.Module]" = OrderedDict()
        head["flatten"] = nn.Flatten()
        width = channels * spatial * spatial
        for i, h in enumerate(hidden, start=1):
            head[f"fc{i}"] = nn.Linear(width, h)
            head[f"fc{i}_relu"] = nn.ReLU(inplace=True)
            head[f"fc{i}_dropout"] = nn.Dropout(p=dropout)
            width = h
        head["classifier"] = nn.Linear(width, num_classes)
        self.head = nn.Sequential(head)
        _init_biases(self, self.BIAS_INIT)

    @classmethod
    def min_image_size(cls) -> int:
        size = 1
        while True:
            s = size
            for _, _, _, k, st, p in cls.LAYERS:
                s = _conv_out(s, k, st, p)
                if s < 1:
                    break
            else:
                return size
            size += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class CifarPaperNet(_PaperNet):
    """The paper's CIFAR-10 network (Zhang, Choromanska & LeCun 2015, section 5).

    (channels, spatial size) after each layer, for the paper's 28x28 crops:

    ==========  ===========================================  ============
    layer       module                                       output
    ==========  ===========================================  ============
    input                                                    (3, 28)
    conv1       Conv2d 5x5, stride 1, pad 0 + ReLU           (64, 24)
    pool1       MaxPool 2x2, stride 2                        (64, 12)
    conv2       Conv2d 5x5, stride 1, pad 0 + ReLU           (128, 8)
    pool2       MaxPool 2x2, stride 2                        (128, 4)
    conv3       Conv2d 3x3, stride 1, pad 0 + ReLU           (64, 2)
    fc1         Linear 256 -> 256 + ReLU + Dropout           (256)
    classifier  Linear 256 -> 10 (logits; softmax in loss)   (10)
    ==========  ===========================================  ============

    All biases start at 0 (the paper). Weights use PyTorch's default initialisation.
    ``image_size`` other than 28 changes only the input width of ``fc1``.
    """

    LAYERS = (
        ("conv1", "conv", 64, 5, 1, 0),
        ("pool1", "pool", 0, 2, 2, 0),
        ("conv2", "conv", 128, 5, 1, 0),
        ("pool2", "pool", 0, 2, 2, 0),
        ("conv3", "conv", 64, 3, 1, 0),
    )
    PAPER_IMAGE_SIZE = 28
    BIAS_INIT = 0.0

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 image_size: Optional[int] = None, dropout: float = 0.5):
        super().__init__(num_classes, in_channels, image_size, hidden=(256,), dropout=dropout)


class ImageNetPaperNet(_PaperNet):
    """The paper's ImageNet (ILSVRC 2013) network.

    PAPER.md gives only (channels, spatial size) after each layer; these kernels, strides and
    paddings (all "valid", no padding) give exactly those sizes from a 221x221 input:

    ==========  ===========================================  ============
    layer       module                                       output
    ==========  ===========================================  ============
    input                                                    (3, 221)
    conv1       Conv2d 7x7, stride 2 + ReLU                  (96, 108)
    pool1       MaxPool 3x3, stride 3                        (96, 36)
    conv2       Conv2d 5x5, stride 1 + ReLU                  (256, 32)
    pool2       MaxPool 2x2, stride 2                        (256, 16)
    conv3       Conv2d 3x3, stride 1 + ReLU                  (384, 14)
    conv4       Conv2d 2x2, stride 1 + ReLU                  (384, 13)
    conv5       Conv2d 2x2, stride 1 + ReLU                  (256, 12)
    pool3       MaxPool 2x2, stride 2                        (256, 6)
    fc1         Linear 9216 -> 4096 + ReLU + Dropout         (4096)
    fc2         Linear 4096 -> 4096 + ReLU + Dropout         (4096)
    classifier  Linear 4096 -> 1000 (logits)                 (1000)
    ==========  ===========================================  ============

    (221 - 7) / 2 + 1 = 108; (108 - 3) / 3 + 1 = 36; 36 - 5 + 1 = 32; 32 / 2 = 16;
    16 - 3 + 1 = 14; 14 - 2 + 1 = 13; 13 - 2 + 1 = 12; 12 / 2 = 6.

    All biases start at 0.1 (the paper). About 58M parameters at 1000 classes.
    ``image_size`` other than 221 (at least 101) changes only the input width of ``fc1``.
    """

    LAYERS = (
        ("conv1", "conv", 96, 7, 2, 0),
        ("pool1", "pool", 0, 3, 3, 0),
        ("conv2", "conv", 256, 5, 1, 0),
        ("pool2", "pool", 0, 2, 2, 0),
        ("conv3", "conv", 384, 3, 1, 0),
        ("conv4", "conv", 384, 2, 1, 0),
        ("conv5", "conv", 256, 2, 1, 0),
        ("pool3", "pool", 0, 2, 2, 0),
    )
    PAPER_IMAGE_SIZE = 221
    BIAS_INIT = 0.1

    def __init__(self, num_classes: int = 1000, in_channels: int = 3,
                 image_size: Optional[int] = None, dropout: float = 0.5):
        super().__init__(num_classes, in_channels, image_size, hidden=(4096, 4096),
                         dropout=dropout)


class DigitsNet(nn.Module):
    """A small CNN for scikit-learn's 8x8 digits (1x8x8 inputs, ~0.2M parameters).

    conv 3x3 (32, pad 1) + ReLU -> conv 3x3 (64, pad 1) + ReLU -> maxpool 2 -> fc 128 + ReLU
    + dropout -> linear.
    Works for any ``image_size`` >= 2 (default 8).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 image_size: Optional[int] = None, dropout: float = 0.5):
        super().__init__()
        size = 8 if image_size is None else int(image_size)
        if size < 2:
            raise ValueError(f"DigitsNet needs image_size >= 2, got {size}")
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 32, 3, padding=1)),
            ("conv1_relu", nn.ReLU(inplace=True)),
            ("conv2", nn.Conv2d(32, 64, 3, padding=1)),
            ("conv2_relu", nn.ReLU(inplace=True)),
            ("pool1", nn.MaxPool2d(2)),
        ]))
        half = size // 2
        self.head = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(64 * half * half, 128)),
            ("fc1_relu", nn.ReLU(inplace=True)),
            ("fc1_dropout", nn.Dropout(p=dropout)),
            ("classifier", nn.Linear(128, num_classes)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _resnet(arch: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: Optional[int],
              dropout: float) -> nn.Module:
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        small = image_size is not None and image_size <= 64
        if small:
            # CIFAR-style stem (He et al. 2016, section 4.2): a 7x7/2 conv and a max-pool would
            # shrink a 28-32 px image to 8 px before the first residual block.
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1,
                                    bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3,
                                    bias=False)
        if small or in_channels != 3:
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        return model

    return build


def _from_class(cls) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: Optional[int],
              dropout: float) -> nn.Module:
        return cls(num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                   dropout=dropout)

    return build


_BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    "cifar_paper": _from_class(CifarPaperNet),
    "imagenet_paper": _from_class(ImageNetPaperNet),
    "resnet18": _resnet("resnet18"),
    "resnet34": _resnet("resnet34"),
    "resnet50": _resnet("resnet50"),
    "digits_net": _from_class(DigitsNet),
}

#: Valid names for ``build_model``.
MODEL_NAMES: Tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, num_classes: int, *, in_channels: int = 3,
                image_size: Optional[int] = None, dropout: float = 0.5) -> nn.Module:
    """Build a freshly initialised network that maps (N, in_channels, S, S) images to logits.

    name:        one of ``MODEL_NAMES``:
                 ``cifar_paper`` / ``imagenet_paper`` (the paper's nets, see their classes),
                 ``resnet18`` / ``resnet34`` / ``resnet50`` (torchvision, ``weights=None``; for
                 ``image_size <= 64`` the stem becomes a 3x3/1 conv without max-pool, as for
                 CIFAR in the ResNet paper; ``in_channels`` other than 3 replaces the first conv),
                 ``digits_net`` (a small CNN for 1x8x8 digits).
    num_classes: width of the output layer.
    image_size:  side of the (square) input; ``None`` means the paper's size (28 for
                 ``cifar_paper``, 221 for ``imagenet_paper``, 8 for ``digits_net``; ResNets
                 accept any size >= 32 with the standard stem).
    dropout:     probability of the dropout after each hidden fully-connected layer.
    """
    key = str(name).strip().lower()
    if key not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return _BUILDERS[key](int(num_classes), int(in_channels), image_size, float(dropout))
