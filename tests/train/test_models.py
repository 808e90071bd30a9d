"""The networks: the paper's exact layer shapes, bias initialisation, ResNets, the digits net."""

import pytest
import torch
from torch import nn

from hvd_easgd.train.models import MODEL_NAMES, build_model

# (channels, spatial size) after each layer, exactly as PAPER.md lists them (input first).
CIFAR_PAPER = [(3, 28), (64, 24), (64, 12), (128, 8), (128, 4), (64, 2), (256,), (10,)]
IMAGENET_PAPER = [(3, 221), (96, 108), (96, 36), (256, 32), (256, 16), (384, 14), (384, 13),
                  (256, 12), (256, 6), (4096,), (4096,), (1000,)]


def _layer_shapes(model, x):
    """Output shapes (without batch) of every conv, max-pool and linear layer, in call order."""
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.Linear))]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return shapes, out


def _as_paper(shape):
    # (C, S, S) -> (C, S); (F,) stays.
    if len(shape) == 3:
        assert shape[1] == shape[2], f"non-square feature map {shape}"
        return shape[:2]
    return shape


@pytest.mark.parametrize("name, paper, bias", [
    ("cifar_paper", CIFAR_PAPER, 0.0),
    ("imagenet_paper", IMAGENET_PAPER, 0.1),
])
def test_paper_nets_have_the_papers_layer_shapes_and_bias_init(name, paper, bias):
    torch.manual_seed(0)
    num_classes = paper[-1][0]
    model = build_model(name, num_classes).eval()
    c, s = paper[0]
    shapes, out = _layer_shapes(model, torch.randn(2, c, s, s))
    assert [_as_paper(sh) for sh in shapes] == paper[1:]
    assert out.shape == (2, num_classes)
    # Logits, not probabilities: the softmax is in the loss.
    assert not any(isinstance(m, (nn.Softmax, nn.LogSoftmax)) for m in model.modules())
    assert not torch.allclose(out.sum(1), torch.ones(2))
    # ReLU after every conv and hidden fc; dropout after every hidden fc.
    n_relu = sum(isinstance(m, nn.ReLU) for m in model.modules())
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    n_fc = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert n_relu == n_conv + n_fc - 1
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == n_fc - 1
    biases = [m.bias for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert biases and all(torch.all(b == bias) for b in biases)
    # Weights are random (not constant) and the two builds differ (fresh initialisation).
    w = model.features.conv1.weight
    assert w.std() > 0


def test_paper_nets_take_other_channels_classes_sizes_and_dropout():
    m = build_model("cifar_paper", 7, in_channels=1, image_size=32, dropout=0.2)
    assert m(torch.randn(3, 1, 32, 32)).shape == (3, 7)
    assert [d.p for d in m.modules() if isinstance(d, nn.Dropout)] == [0.2]
    # The smallest image that still has a feature map; one less is refused with the reason.
    assert build_model("cifar_paper", 10, image_size=24)(torch.randn(1, 3, 24, 24)).shape == (1, 10)
    with pytest.raises(ValueError, match="too small.*smallest that works is 24"):
        build_model("cifar_paper", 10, image_size=23)
    m = build_model("imagenet_paper", 5, image_size=101)
    assert m(torch.randn(1, 3, 101, 101)).shape == (1, 5)
    with pytest.raises(ValueError, match="smallest that works is 101"):
        build_model("imagenet_paper", 5, image_size=100)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_resnets(name):
    torch.manual_seed(0)
    # Small grey images: the CIFAR-style stem and a 1-channel first conv.
    m = build_model(name, 7, in_channels=1, image_size=16).eval()
    assert m.conv1.in_channels == 1 and m.conv1.stride == (1, 1)
    assert m(torch.randn(2, 1, 16, 16)).shape == (2, 7)
    if name == "resnet18":  # the standard stem at ImageNet-like sizes
        m = build_model(name, 4, image_size=96).eval()
        assert m.conv1.kernel_size == (7, 7) and m.conv1.in_channels == 3
        assert m(torch.randn(1, 3, 96, 96)).shape == (1, 4)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ValueError) as err:
        build_model("vgg16", 10)
    for name in MODEL_NAMES:
        assert name in str(err.value)
    assert set(MODEL_NAMES) == {"cifar_paper", "imagenet_paper", "resnet18", "resnet34",
                                "resnet50", "digits_net"}
    with pytest.raises(ValueError, match="num_classes"):
        build_model("digits_net", 0)
    with pytest.raises(ValueError, match="dropout"):
        build_model("digits_net", 10, dropout=1.0)


def test_digits_net_learns_digits_quickly():
    """The digits demo's claim in miniature: plain SGD, one process, a few seconds -> <10%."""
    from hvd_easgd.train.data import build_datasets

    torch.manual_seed(0)
    bundle = build_datasets("digits")
    model = build_model("digits_net", bundle.num_classes, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=32, shuffle=True)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(3):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    model.eval()
    x, y = bundle.test.tensors
    with torch.no_grad():
        error = (model(x).argmax(1) != y).float().mean().item()
    assert error < 0.10, f"test error {error:.3f}"
