"""FLOP accounting: analytic per-layer counts, agreement with FlopCounterMode, step costs."""

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from mlbreg.flops import dense_layer_flops, sparse_forward_flops, step_flops
from mlbreg.models import create_model, prunable_modules


def test_exact_linear_and_conv():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 64, 10))
    f = dense_layer_flops(model, (3, 8, 8))
    assert f == {"0": 2 * 3 * 8 * 9 * 64, "2": 2 * 512 * 10}
    lin = dense_layer_flops(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), (1, 8, 8))
    assert lin == {"1": 2 * 64 * 10}


def test_exact_strided_grouped_conv():
    # stride 2 halves 8x8 to 4x4; groups=2 halves the per-output dot product.
    model = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2))
    assert dense_layer_flops(model, (4, 8, 8)) == {"0": 2 * (4 // 2) * 9 * 6 * 16}


def _flop_counter_per_layer(model, in_shape):
    """Per-layer FLOPs according to torch's FlopCounterMode (keys 'ClassName.path')."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False, depth=None) as fc:
        model(torch.zeros(1, *in_shape))
    counts = {k.split(".", 1)[1]: sum(v.values()) for k, v in fc.get_flop_counts().items() if "." in k}
    return counts, fc.get_total_flops()


@pytest.mark.parametrize(
    "name,in_shape",
    [
        ("mlp", (1, 8, 8)),
        ("convnet", (1, 28, 28)),
        ("resnet18", (3, 32, 32)),
        ("vgg16", (3, 64, 64)),
        ("wrn28_10", (3, 32, 32)),
    ],
)
def test_agrees_with_flop_counter_mode(name, in_shape):
    model = create_model(name, 10, in_shape)
    ours = dense_layer_flops(model, in_shape)
    assert list(ours) == [n for n, _ in prunable_modules(model)]
    per_layer, total = _flop_counter_per_layer(model, in_shape)
    for lname, f in ours.items():
        assert f == per_layer[lname], lname
    # Only conv/linear carry FLOPs in FlopCounterMode's model too.
    assert sum(ours.values()) == total


@pytest.mark.parametrize("name,gmac", [("resnet18", 0.56), ("vgg16", 0.31), ("wrn28_10", 5.25)])
def test_reference_model_flops(name, gmac):
    model = create_model(name, 10, (3, 32, 32))
    total = sum(dense_layer_flops(model, (3, 32, 32)).values())
    assert total / 2 == pytest.approx(gmac * 1e9, rel=0.03)


def test_mode_and_params_untouched():
    model = create_model("convnet", 10, (1, 8, 8))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense_layer_flops(model, (1, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats included
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed
    model.eval()
    dense_layer_flops(model, (1, 8, 8))
    assert not model.training


def test_sparse_forward_flops():
    layer = {"a": 100.0, "b": 50.0}
    assert sparse_forward_flops(layer, {"a": 0.1, "b": 0.5}) == pytest.approx(35.0)
    assert sparse_forward_flops(layer, {"a": 1.0, "b": 1.0}) == 150.0
    assert sparse_forward_flops(layer, {"a": 0.0}) == 50.0  # missing layer counts dense
    assert sparse_forward_flops(layer, {"a": torch.tensor(0.5), "b": 0.0}) == 50.0
    with pytest.raises(ValueError, match="zzz"):
        sparse_forward_flops(layer, {"zzz": 0.5})


def test_step_flops():
    assert step_flops("dense", 10.0, 2.0) == 30.0
    assert step_flops("full_grad", 10.0, 2.0) == 14.0
    assert step_flops("sparse", 10.0, 2.0) == 6.0
    # a fully dense network costs the same whichever step kind is used
    assert {step_flops(k, 7.0, 7.0) for k in ("dense", "full_grad", "sparse")} == {21.0}
    with pytest.raises(ValueError) as e:
        step_flops("bogus", 1.0, 1.0)
    assert "'bogus'" in str(e.value)
    for kind in ("dense", "full_grad", "sparse"):
        assert kind in str(e.value)


def test_flops_account_hand_case_and_resume():
    from mlbreg.flops import FlopsAccount

    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, 0, 2], [0, 0, 0, 0], [3, 0, 0, 0]]))  # 3 of 12 non-zero
    acc = FlopsAccount(model, (4,), "cpu")
    f_dense, f_sparse = 2 * 4 * 3, 2 * 3  # a multiply-add is 2 FLOPs
    acc.add_step("dense", 2)
    acc.add_step("full_grad", 2)
    acc.add_step("sparse", 3)
    assert acc.total() == 3 * f_dense * 2 + (2 * f_sparse + f_dense) * 2 + 3 * f_sparse * 3
    assert acc.sgd_total() == 3 * f_dense * 7
    resumed = FlopsAccount(model, (4,), "cpu")
    resumed.load_state_dict(acc.state_dict())
    for a in (acc, resumed):
        a.add_step("sparse", 5)
    assert resumed.total() == acc.total() and resumed.sgd_total() == acc.sgd_total()
    assert resumed.counts == acc.counts == {"dense": 1, "full_grad": 1, "sparse": 2}
