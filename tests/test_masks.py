"""Layer densities (uniform / ER / ERK, docs/algorithms.md §4), exact counts and sparse init."""

import math

import pytest
import torch

from mlbreg.models import create_model, prunable_modules
from mlbreg.sparsity import exact_counts, layer_densities, sparse_init_


def _shapes(name):
    with torch.device("meta"):  # shapes only: no memory, no init time (WRN-28-10 has 36M weights)
        model = create_model(name, 10, (3, 32, 32))
    return {n: tuple(m.weight.shape) for n, m in prunable_modules(model)}


@pytest.fixture(scope="module", params=["resnet18", "wrn28_10"])
def shapes(request):
    return _shapes(request.param)


@pytest.mark.parametrize("scheme", ["er", "erk", "uniform"])
@pytest.mark.parametrize("sparsity", [0.9, 0.95])
@pytest.mark.parametrize("dense_first", [False, True])
def test_exact_counts_hit_the_target_within_one_weight(shapes, scheme, sparsity, dense_first):
    density = 1 - sparsity
    dense = (next(iter(shapes)),) if dense_first else ()
    densities = layer_densities(shapes, density, scheme, dense)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(numel.values())
    assert all(0 < p <= 1 for p in densities.values())
    assert all(densities[n] == 1.0 for n in dense)
    # the ε solve itself is exact up to float rounding
    assert sum(densities[n] * numel[n] for n in shapes) == pytest.approx(density * total, rel=1e-12)
    counts = exact_counts(numel, densities)
    assert all(0 <= counts[n] <= numel[n] for n in shapes)
    assert abs(sum(counts.values()) - density * total) <= 1
    # per layer, each count is p_l·N_l rounded down or up
    assert all(abs(counts[n] - densities[n] * numel[n]) < 1 for n in shapes)
    if scheme == "erk":
        # ERK gives the small layers (first conv, 1x1 shortcuts, classifier) more density
        first, last = next(iter(shapes)), list(shapes)[-1]
        assert densities[first] == 1.0 and densities[last] > density


def test_erk_resnet18_forces_layers_dense_and_resolves():
    shapes = _shapes("resnet18")
    densities = layer_densities(shapes, 0.05, "erk")
    dense = sorted(n for n, p in densities.items() if p == 1.0)
    assert dense == ["conv1", "fc", "layer2.0.shortcut.0"]

    # every other layer keeps ε·r_l with one common ε: the ratio p_l / r_l is constant
    def ratio(s):
        return sum(s) / math.prod(s)

    eps = {n: densities[n] / ratio(s) for n, s in shapes.items() if n not in dense}
    assert max(eps.values()) == pytest.approx(min(eps.values()), rel=1e-12)


def test_epsilon_solve_hand_case_with_a_layer_forced_dense():
    """ER on three linear layers (out, in), overall density 1/2.

    N = 4 + 100 + 1000 = 1104, budget 552; r = (in + out)/(in·out) = 1, 0.2, 0.11.
    First ε = 552 / (1·4 + 0.2·100 + 0.11·1000) = 552/134 ≈ 4.12: p_small = 4.12 > 1, so
    `small` is made dense (4 weights) and ε is solved again over the other two:
    ε = (552 − 4) / (20 + 110) = 548/130, p_mid = 0.2·548/130 = 0.84308, p_big = 0.11·548/130 = 0.46369.
    Counts: 84.308 → 84 and 463.69 → 464 (largest remainder), 4 + 84 + 464 = 552."""
    shapes = {"small": (2, 2), "mid": (10, 10), "big": (10, 100)}
    p = layer_densities(shapes, 0.5, "er")
    assert p["small"] == 1.0
    assert p["mid"] == pytest.approx(0.2 * 548 / 130, rel=1e-12)
    assert p["big"] == pytest.approx(0.11 * 548 / 130, rel=1e-12)
    counts = exact_counts({"small": 4, "mid": 100, "big": 1000}, p)
    assert counts == {"small": 4, "mid": 84, "big": 464}
    # a layer named dense up front counts towards the budget the same way
    p_forced = layer_densities(shapes, 0.5, "er", dense=("small",))
    assert p_forced == pytest.approx(p)
    # uniform: no layer ever exceeds the target, so nothing is forced dense
    assert layer_densities(shapes, 0.5, "uniform") == {"small": 0.5, "mid": 0.5, "big": 0.5}


def test_erk_conv_ratio_hand_case():
    # conv (c_out, c_in, kh, kw) = (4, 2, 3, 3): r = (2 + 4 + 3 + 3)/72 = 1/6; linear (10, 8): r = 18/80
    shapes = {"conv": (4, 2, 3, 3), "fc": (10, 8)}
    p = layer_densities(shapes, 0.25, "erk")
    eps = 0.25 * (72 + 80) / (72 / 6 + 80 * 18 / 80)  # 38 / 30
    assert p == pytest.approx({"conv": eps / 6, "fc": eps * 18 / 80})
    p_er = layer_densities(shapes, 0.25, "er")  # ER ignores the kernel: r_conv = 6/8
    eps_er = 38 / (72 * 6 / 8 + 18)
    assert p_er == pytest.approx({"conv": eps_er * 6 / 8, "fc": eps_er * 18 / 80})


@pytest.mark.parametrize("bad", [dict(density=0.0), dict(density=1.5), dict(scheme="random"), dict(dense=("nope",))])
def test_bad_arguments_name_the_value(bad):
    args = dict(shapes={"a": (4, 4)}, density=0.5, scheme="erk") | bad
    with pytest.raises(ValueError) as err:
        layer_densities(**args)
    assert str(list(bad.values())[0]).strip("(),'") in str(err.value)


@pytest.mark.parametrize("scheme", ["uniform", "er", "erk"])
def test_sparse_init_draws_exact_counts(scheme):
    model = create_model("convnet", 10, (3, 16, 16))
    achieved = sparse_init_(model, density=0.1, scheme=scheme, dense_first=True, seed=3)
    layers = prunable_modules(model)
    shapes = {n: tuple(m.weight.shape) for n, m in layers}
    numel = {n: math.prod(s) for n, s in shapes.items()}
    counts = exact_counts(numel, layer_densities(shapes, 0.1, scheme, (layers[0][0],)))
    for name, mod in layers:
        assert int(torch.count_nonzero(mod.weight)) == counts[name]
        assert achieved[name] == counts[name] / numel[name]
    assert int(torch.count_nonzero(layers[0][1].weight)) == numel[layers[0][0]]
    total = sum(int(torch.count_nonzero(m.weight)) for _, m in layers)
    assert abs(total - 0.1 * sum(numel.values())) <= 1


def test_sparse_init_by_group_keeps_whole_kernels():
    model = create_model("convnet", 10, (1, 8, 8))
    sparse_init_(model, density=0.2, scheme="erk", by_group=True, seed=0)
    for _, mod in prunable_modules(model):
        w = mod.weight
        if w.dim() == 4:
            kernel_nonzero = w.flatten(2).ne(0)
            # every kernel is all-zero or (almost surely) all non-zero
            assert torch.equal(kernel_nonzero.any(-1), kernel_nonzero.all(-1))
