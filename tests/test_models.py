"""Model zoo: every registered model builds, runs forward/backward, and the registry behaves."""

import pytest
import torch
import torch.nn as nn

from mlbreg.models import create_model, list_models, prunable_modules, register_model

# (model, in_shape, batch): the shapes each model is actually used with.
CASES = [
    ("mlp", (1, 8, 8), 2),
    ("mlp", (3, 32, 32), 2),
    ("convnet", (1, 8, 8), 2),
    ("convnet", (1, 28, 28), 2),
    ("convnet", (3, 32, 32), 2),
    ("convnet", (3, 64, 64), 2),
    ("resnet18", (3, 32, 32), 2),
    ("resnet18", (3, 64, 64), 2),
    ("vgg16", (3, 32, 32), 2),
    ("vgg16", (3, 64, 64), 2),
    ("wrn28_10", (3, 32, 32), 2),
]


def test_cases_cover_every_registered_model():
    assert {name for name, _, _ in CASES} == set(list_models())
    assert list_models() == ["convnet", "mlp", "resnet18", "vgg16", "wrn28_10"]


@pytest.mark.parametrize("name,in_shape,batch", CASES)
def test_forward_backward(name, in_shape, batch):
    torch.manual_seed(0)
    num_classes = 7  # not 10, so a hard-coded class count would show
    model = create_model(name, num_classes=num_classes, in_shape=in_shape)
    model.train()
    out = model(torch.randn(batch, *in_shape))
    assert out.shape == (batch, num_classes)
    out.square().mean().backward()
    layers = prunable_modules(model)
    assert layers, "every model has prunable layers"
    for lname, m in layers:
        assert m.weight.grad is not None, lname
        assert torch.isfinite(m.weight.grad).all(), lname


@pytest.mark.parametrize("name", ["mlp", "convnet", "resnet18", "vgg16"])
def test_tiny_inputs_work(name):
    # 8x8 with any channel count is the smallest size the zoo promises.
    model = create_model(name, num_classes=3, in_shape=(2, 8, 8)).eval()
    assert model(torch.randn(1, 2, 8, 8)).shape == (1, 3)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        create_model("foo", num_classes=10, in_shape=(3, 32, 32))
    msg = str(e.value)
    assert "'foo'" in msg
    for name in list_models():
        assert name in msg


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="mlp"):
        register_model("mlp")(lambda num_classes, in_shape: nn.Identity())


def test_prunable_modules_order_and_types():
    model = create_model("resnet18", num_classes=10, in_shape=(3, 32, 32))
    layers = prunable_modules(model)
    expected = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [n for n, _ in layers] == expected
    # stem + 16 block convs + 3 projection shortcuts + fc
    assert len(layers) == 1 + 16 + 3 + 1
    assert layers[0][0] == "conv1" and layers[-1][0] == "fc"
    assert all(m.bias is None for _, m in layers if isinstance(m, nn.Conv2d))


def test_architecture_sizes():
    # Parameter counts of the reference architectures (10 classes, CIFAR).
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(create_model("resnet18", 10, (3, 32, 32))) == 11_173_962
    assert abs(n(create_model("wrn28_10", 10, (3, 32, 32))) - 36.48e6) < 0.01e6
    assert abs(n(create_model("vgg16", 10, (3, 32, 32))) - 14.73e6) < 0.01e6
    assert len(prunable_modules(create_model("vgg16", 10, (3, 32, 32)))) == 13 + 1
    # 1 stem + 12 blocks * 2 convs + 3 shortcuts + fc
    assert len(prunable_modules(create_model("wrn28_10", 10, (3, 32, 32)))) == 1 + 24 + 3 + 1


def test_model_kwargs():
    mlp = create_model("mlp", 10, (1, 8, 8), hidden=[32])
    assert [m.out_features for _, m in prunable_modules(mlp)] == [32, 10]
    assert all(m.bias is not None for _, m in prunable_modules(mlp))
    wide = create_model("convnet", 10, (1, 8, 8), width=2)
    assert prunable_modules(wide)[-1][1].in_features == 128
    wrn = create_model("wrn28_10", 10, (3, 8, 8), depth=10, widen=2)
    assert len(prunable_modules(wrn)) == 1 + 6 + 3 + 1
    assert wrn(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n\\+4"):
        create_model("wrn28_10", 10, (3, 32, 32), depth=27)
