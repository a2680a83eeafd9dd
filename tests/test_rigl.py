"""RigL (algorithms.md §5): fixed density, cosine drop schedule, grow by gradient, checkpoints."""
import copy
import io
import math

import pandas as pd
import pytest
import torch
from torch import nn

from mlbreg.flops import dense_layer_flops
from mlbreg.methods import build_method
from mlbreg.models import create_model, prunable_modules
from mlbreg.sparsity import RigL, drop_and_grow, drop_fraction, exact_counts, layer_densities, sparse_init_
from mlbreg.train import train

from helpers import make_cfg

IN_SHAPE = (1, 8, 8)


def make(seed=0, delta_t=5, total_steps=60, alpha=0.3, lr=0.05):
    model = create_model("mlp", 10, IN_SHAPE, hidden=[48, 32])
    sparse_init_(model, density=0.2, scheme="erk", seed=seed)
    method = build_method("rigl", model, lr=lr, momentum=0.9, weight_decay=5e-4, total_steps=total_steps,
                          delta_t=delta_t, alpha=alpha, end_fraction=0.75)
    return model, method


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(32, *IN_SHAPE, generator=g), torch.randint(0, 10, (32,), generator=g)


def forward_backward(model, method, step):
    x, y = batch(step)
    method.optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()


def weights(model):
    return [m.weight for _, m in prunable_modules(model)]


def test_drop_fraction_is_cosine_and_stops_at_t_end():
    assert drop_fraction(0, 0.3, 750) == pytest.approx(0.3)
    assert drop_fraction(375, 0.3, 750) == pytest.approx(0.15)
    assert drop_fraction(700, 0.3, 750) == pytest.approx(0.15 * (1 + math.cos(math.pi * 700 / 750)))
    assert drop_fraction(750, 0.3, 750) == 0.0 and drop_fraction(900, 0.3, 750) == 0.0
    rigl = RigL([torch.ones(4)], total_steps=1000, delta_t=100)
    assert rigl.t_end == 750
    assert [t for t in range(1000) if rigl.is_update_step(t)] == [100, 200, 300, 400, 500, 600, 700]


def test_drop_and_grow_hand_case():
    w = torch.tensor([0.5, -0.1, 0.0, 0.3, 0.0, 0.0, -0.2, 0.0])
    mask = w != 0
    g = torch.tensor([9.0, 0.0, 1.0, 0.0, -3.0, 2.0, 0.0, 0.5])
    new, kept = drop_and_grow(w, g, mask, k=2)
    # drop the two smallest |w| among the active (-0.1 at 1, -0.2 at 6); grow the two largest |g|
    # among the rest (index 0 is active, so 4 (|g| = 3) and 5 (|g| = 2))
    assert kept.tolist() == [True, False, False, True, False, False, False, False]
    assert new.tolist() == [True, False, False, True, True, True, False, False]
    # a just-dropped weight may be grown again (as in the reference): huge gradient at index 1
    g2 = g.clone()
    g2[1] = 100.0
    new2, kept2 = drop_and_grow(w, g2, mask, k=2)
    assert torch.equal(kept2, kept) and new2.tolist() == [True, True, False, True, True, False, False, False]


def test_short_run_keeps_counts_and_follows_the_schedule():
    model, method = make(delta_t=5, total_steps=60)
    rigl = method.rigl
    assert sum(rigl.updatable) >= 2
    counts = [int(m.sum()) for m in rigl.masks]
    others = [p for p in model.parameters() if all(p is not w for w in weights(model))]
    update_steps = []
    for t in range(60):
        kind = method.step_kind()
        forward_backward(model, method, t)
        before = [w.detach().clone() for w in weights(model)]
        bufs_before = [copy.deepcopy(method.optimizer.state[w].get("momentum_buffer")) for w in weights(model)]
        others_before = [p.detach().clone() for p in others]
        old_masks = [m.clone() for m in rigl.masks]
        expected_k = rigl.drop_counts()
        method.step()
        if kind == "full_grad":
            update_steps.append(t)
            f = 0.3 / 2 * (1 + math.cos(math.pi * t / 45))
            for i, (w, w0, old, new) in enumerate(zip(weights(model), before, old_masks, rigl.masks)):
                k = round(f * counts[i]) if rigl.updatable[i] else 0
                assert expected_k[i] == k
                stay = old & (w != 0)                    # kept through the drop, untouched
                assert int((old & ~stay).sum()) == k     # k dropped, each one zeroed
                grown = new & ~stay                      # grown (possibly a just-dropped one again)
                assert int(grown.sum()) == k
                assert torch.all(w[grown] == 0)          # new weights start at exactly 0 ...
                buf = method.optimizer.state[w]["momentum_buffer"]
                assert torch.all(buf[~stay] == 0)        # ... with zero momentum
                assert torch.equal(w[stay], w0[stay])    # no SGD step on an update step
                assert torch.equal(buf[stay], bufs_before[i][stay])
            assert all(torch.equal(p, q) for p, q in zip(others, others_before))
        else:
            assert kind == "sparse"
        for w, m, n in zip(weights(model), rigl.masks, counts):
            assert int(m.sum()) == n                      # the density never changes
            assert torch.all(w[~m] == 0)
            buf = method.optimizer.state[w].get("momentum_buffer")
            assert buf is None or torch.all(buf[~m] == 0)
    # T = 60, T_end = 45: updates at 5, 10, ..., 40 and never after
    assert update_steps == [5, 10, 15, 20, 25, 30, 35, 40]
    assert rigl.updates_done == 8 and rigl.steps_taken == 60


def test_masks_really_move():
    model, method = make(delta_t=2, total_steps=40, alpha=0.5)
    start = [m.clone() for m in method.rigl.masks]
    for t in range(20):
        forward_backward(model, method, t)
        method.step()
    changed = sum(int((a != b).sum()) for a, b in zip(start, method.rigl.masks))
    assert changed > 0


def test_state_dict_round_trip_then_lockstep():
    model_a, a = make(seed=0, delta_t=5, total_steps=60)
    for t in range(12):
        forward_backward(model_a, a, t)
        a.step()
    buf = io.BytesIO()
    torch.save(dict(model=model_a.state_dict(), method=a.state_dict()), buf)
    buf.seek(0)
    saved = torch.load(buf, map_location="cpu", weights_only=False)
    model_b, b = make(seed=7, delta_t=5, total_steps=60)   # another init and mask: all must be restored
    model_b.load_state_dict(saved["model"])
    b.load_state_dict(saved["method"])
    assert b.rigl.steps_taken == 12
    for t in range(12, 40):   # crosses update steps 15, 20, ...
        assert a.step_kind() == b.step_kind()
        forward_backward(model_a, a, t)
        forward_backward(model_b, b, t)
        a.step()
        b.step()
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    assert all(torch.equal(m, n) for m, n in zip(a.rigl.masks, b.rigl.masks))
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a.optimizer.state[p]["momentum_buffer"], b.optimizer.state[q]["momentum_buffer"])


def test_dense_layers_are_never_updated():
    model = create_model("mlp", 10, IN_SHAPE, hidden=[48, 32])
    sparse_init_(model, density=0.3, scheme="uniform", dense_last=True, seed=0)
    method = build_method("rigl", model, lr=0.05, momentum=0.9, total_steps=40, delta_t=2)
    assert method.rigl.updatable == [True, True, False] and bool(method.rigl.masks[-1].all())
    last = weights(model)[-1]
    for t in range(8):
        forward_backward(model, method, t)
        method.step()
    assert bool((last != 0).all())


def test_rigl_on_digits(tmp_path):
    """15 epochs x 12 steps, ΔT = 10: T_end = 135, mask updates at 10, 20, ..., 130."""
    cfg = make_cfg("method=rigl", "sparsity=0.9", "init=erk", "epochs=15", "method.delta_t=10")
    outcome = train(cfg, tmp_path)
    assert outcome["status"] == "finished"
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    layers = pd.read_csv(tmp_path / "layers.csv")
    last = metrics.iloc[-1]
    assert last.test_acc_pct >= 90.0
    # the density stays at the target: active weights = the exact ERK counts
    model = create_model("mlp", 10, (1, 8, 8), hidden=[256, 128])
    shapes = {n: tuple(m.weight.shape) for n, m in prunable_modules(model)}
    numel = {n: math.prod(s) for n, s in shapes.items()}
    counts = exact_counts(numel, layer_densities(shapes, 0.1, "erk"))
    for row in layers.itertuples():
        assert row.nonzeros <= counts[row.layer]
    assert (metrics.sparsity_pct >= 89.99).all() and (metrics.sparsity_pct <= 90.1).all()
    assert last.fine_steps == 13 and last.coarse_steps == 180 - 13
    # FLOPs: 3·f_S per step, 2·f_S + f_D on the 13 update steps, relative to SGD's 3·f_D
    flops = dense_layer_flops(model, (1, 8, 8))
    f_dense = sum(flops.values())
    f_sparse = sum(flops[n] * counts[n] / numel[n] for n in flops)
    expected = (3 * f_sparse * 167 + (2 * f_sparse + f_dense) * 13) / (3 * f_dense * 180)
    assert last.train_flops_vs_sgd == pytest.approx(expected, rel=0.02)
    assert last.inference_flops_vs_dense == pytest.approx(f_sparse / f_dense, rel=0.01)
