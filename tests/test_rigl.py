"""RigL (docs/algorithms.md §5): fixed density, cosine drop schedule, grow by gradient, checkpoints."""

import copy
import io
import math

import pandas as pd
import pytest
import torch
from torch import nn

import mlbreg.config as config
from mlbreg.checks import ConfigError
from mlbreg.flops import dense_layer_flops
from mlbreg.methods import build_method, method_class
from mlbreg.models import create_model, prunable_modules
from mlbreg.sparsity import RigL, drop_and_grow, drop_fraction, exact_counts, layer_densities, sparse_init_
from mlbreg.sparsity.rigl import drop_noise
from mlbreg.train import train

from helpers import make_cfg

IN_SHAPE = (1, 8, 8)
# mlbreg's RigL before it followed the reference's defaults
OLD = dict(reinit_when_same=True, count="round", drop_noise_std=0)


def make(seed=0, delta_t=5, total_steps=60, alpha=0.3, lr=0.05, **options):
    model = create_model("mlp", 10, IN_SHAPE, hidden=[48, 32])
    sparse_init_(model, density=0.2, scheme="erk", seed=seed)
    method = build_method(
        "rigl",
        model,
        lr=lr,
        momentum=0.9,
        weight_decay=5e-4,
        total_steps=total_steps,
        delta_t=delta_t,
        alpha=alpha,
        end_fraction=0.75,
        **options,
    )
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


@pytest.mark.parametrize("options", [{}, OLD], ids=["reference", "old"])
def test_short_run_keeps_counts_and_follows_the_schedule(options):
    model, method = make(delta_t=5, total_steps=60, **options)
    rigl = method.rigl
    old_behaviour = bool(options)
    size = round if old_behaviour else int
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
                k = size(f * counts[i]) if rigl.updatable[i] else 0
                assert expected_k[i] == k
                buf = method.optimizer.state[w]["momentum_buffer"]
                # the update is drop_and_grow with this step's noise, then zero what does not keep its value
                noise = drop_noise(w.shape, 1e-5, 0, t, i) if not old_behaviour else None
                want, kept = drop_and_grow(w0, w.grad, old, k, noise)
                assert torch.equal(new, want)
                keep = kept if old_behaviour else old & new
                assert torch.equal(w, w0 * keep) and torch.equal(buf, bufs_before[i] * keep)
                assert torch.all(w[new & ~old] == 0) and torch.all(buf[new & ~old] == 0)  # new ones start at 0
                if old_behaviour:
                    stay = old & (w != 0)  # kept through the drop, untouched
                    assert int((old & ~stay).sum()) == k  # k dropped, each one zeroed
                    grown = new & ~stay  # grown (possibly a just-dropped one again)
                    assert int(grown.sum()) == k
                    assert torch.all(w[grown] == 0)  # new weights start at exactly 0 ...
                    assert torch.all(buf[~stay] == 0)  # ... with zero momentum
                    assert torch.equal(w[stay], w0[stay])  # no SGD step on an update step
                    assert torch.equal(buf[stay], bufs_before[i][stay])
            assert all(torch.equal(p, q) for p, q in zip(others, others_before))
        else:
            assert kind == "sparse"
        for w, m, n in zip(weights(model), rigl.masks, counts):
            assert int(m.sum()) == n  # the density never changes
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
    model_b, b = make(seed=7, delta_t=5, total_steps=60)  # another init and mask: all must be restored
    # the options are constructor arguments: a checkpoint holds the keys it always had
    assert set(saved["method"]["rigl"]) == {"masks", "steps_taken", "updates_done", "delta_t", "alpha", "t_end"}
    model_b.load_state_dict(saved["model"])
    b.load_state_dict(saved["method"])
    assert b.rigl.steps_taken == 12
    for t in range(12, 40):  # crosses update steps 15, 20, ...
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


def one_layer(w, g, mask=None, total_steps=40, delta_t=10, alpha=0.3, end_fraction=0.5, t=10, **options):
    """A RigL on one weight with gradient g, at update step t (by default the middle of
    [0, T_end): the drop fraction is α/2)."""
    w = nn.Parameter(torch.as_tensor(w, dtype=torch.float32).clone())
    w.grad = torch.as_tensor(g, dtype=torch.float32).clone()
    rigl = RigL(
        [w],
        total_steps=total_steps,
        delta_t=delta_t,
        alpha=alpha,
        end_fraction=end_fraction,
        masks=None if mask is None else [torch.as_tensor(mask)],
        **options,
    )
    rigl.steps_taken = t
    assert rigl.is_update_step()
    return w, rigl


def test_the_drop_count_is_truncated_as_in_the_reference():
    # 10 active weights, f = 0.52 / 2 = 0.26: f·n = 2.6 -> 2 (the reference's int()), not round()'s 3
    w0 = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4, 0.5, 0.55] + [0.0] * 10
    g = [0.0] * 10 + [float(i + 1) for i in range(10)]
    for options, k in (({}, 2), ({"count": "truncate"}, 2), ({"count": "round"}, 3)):
        w, rigl = one_layer(w0, g, alpha=0.52, **options)
        assert rigl.drop_fraction() == pytest.approx(0.26)
        assert rigl.drop_counts() == [k]
        old = rigl.masks[0].clone()
        assert rigl.update_masks() == [k]
        new = rigl.masks[0]
        # the k smallest (0.1, 0.2, 0.3 at 1, 3, 5) go, the k largest-|g| inactive (19, 18, 17) come
        assert torch.nonzero(old & ~new).flatten().tolist() == [1, 3, 5][:k]
        assert torch.nonzero(new & ~old).flatten().tolist() == [19, 18, 17][:k][::-1]
        assert int(new.sum()) == 10


@pytest.mark.parametrize("reinit", [None, False, True])
def test_a_dropped_and_regrown_weight_keeps_its_value_and_momentum(reinit):
    # active 0, 1, 2, 5; f = 1 / 2: k = 2, drop 1 (|w| 0.05) and 5 (0.2); grow 1 (|g| 10, just
    # dropped) and 3 (|g| 5, a new connection; its weight and momentum hold junk that must go)
    mask = torch.tensor([True, True, True, False, False, True])
    w, rigl = one_layer(
        [0.5, -0.05, 0.3, 0.7, 0.0, 0.2],
        [0.0, 10.0, 0.0, 5.0, 1.0, 0.0],
        mask=mask,
        alpha=1.0,
        **({} if reinit is None else {"reinit_when_same": reinit}),
    )
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    opt.state[w]["momentum_buffer"] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert rigl.update_masks(opt) == [2]
    assert rigl.masks[0].tolist() == [True, True, True, True, False, False]
    buf = opt.state[w]["momentum_buffer"]
    if reinit:  # reset like a new connection
        assert w.tolist() == pytest.approx([0.5, 0.0, 0.3, 0.0, 0.0, 0.0]) and buf.tolist() == [1, 0, 3, 0, 0, 0]
    else:  # the reference default: only connections not in the mask before are new
        assert w.tolist() == pytest.approx([0.5, -0.05, 0.3, 0.0, 0.0, 0.0]) and buf.tolist() == [1, 2, 3, 0, 0, 0]


def test_exact_ties_without_noise_drop_the_lowest_index():
    # 4 tied active weights, f ≈ 0.45: k = 1; the grown one is 7 (largest |g|)
    for seed in range(3):
        w, rigl = one_layer(
            [0.3, -0.3, 0.3, 0.3, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 2, 3, 4],
            total_steps=1000,
            delta_t=1,
            alpha=0.45,
            end_fraction=1.0,
            t=5,
            drop_noise_std=0,
            seed=seed,
            count="truncate",
        )
        rigl.update_masks()
        assert rigl.masks[0].tolist() == [False, True, True, True, False, False, False, True]
    # the same in the grow, and for more than one tie (torch.topk alone would not promise it)
    w = torch.tensor([0.3, 0.3, 0.3, 0.3, 0.3, 0.1, 0, 0, 0, 0, 0, 0])
    new, kept = drop_and_grow(w, torch.tensor([0.0] * 6 + [2.0] * 6), w != 0, k=3)
    assert kept.tolist() == [False, False, True, True, True] + [False] * 7
    assert new.tolist() == [False, False, True, True, True, False, True, True, True, False, False, False]


def test_the_noise_breaks_ties_at_random_but_reproducibly():
    def dropped(seed, t):
        w, rigl = one_layer(
            [0.3, -0.3, 0.3, 0.3, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 2, 3, 4],
            total_steps=1000,
            delta_t=1,
            alpha=0.45,
            end_fraction=1.0,
            t=t,
            seed=seed,
            count="truncate",
        )
        assert rigl.drop_counts() == [1]
        rigl.update_masks()
        out = torch.nonzero(~rigl.masks[0][:4]).flatten().tolist()
        assert len(out) == 1 and w[out[0]] == 0 and bool(rigl.masks[0][7])
        return out[0]

    pairs = [(seed, t) for seed in (0, 1, 2) for t in (1, 2, 3)]
    first = [dropped(s, t) for s, t in pairs]
    assert [dropped(s, t) for s, t in pairs] == first  # the same (seed, step): the same choice
    assert set(first) != {0} and len(set(first)) >= 2, first  # not always the lowest index
    # the seed, the step and the layer all move the noise
    assert not torch.equal(drop_noise((5,), 1e-5, 0, 1, 0), drop_noise((5,), 1e-5, 1, 1, 0))
    assert not torch.equal(drop_noise((5,), 1e-5, 0, 1, 0), drop_noise((5,), 1e-5, 0, 2, 0))
    assert not torch.equal(drop_noise((5,), 1e-5, 0, 1, 0), drop_noise((5,), 1e-5, 0, 1, 1))
    assert torch.equal(drop_noise((5,), 1e-5, 4, 7, 2), drop_noise((5,), 1e-5, 4, 7, 2))


def test_the_noise_does_not_reorder_distinct_weights():
    g = torch.Generator().manual_seed(0)
    n = 200
    w = torch.zeros(n)
    active = torch.randperm(n, generator=g)[:100]
    signs = torch.where(torch.rand(100, generator=g) < 0.5, -1.0, 1.0)
    w[active] = 0.01 * (torch.randperm(100, generator=g) + 1).float() * signs  # |θ| 1000σ apart
    grad = torch.randn(n, generator=g)
    want, want_kept = drop_and_grow(w, grad, w != 0, 30)
    for seed in range(5):
        noise = drop_noise(w.shape, 1e-5, seed, 100, 0)
        assert float(noise.abs().max()) < 1e-4
        new, kept = drop_and_grow(w, grad, w != 0, 30, noise)
        assert torch.equal(new, want) and torch.equal(kept, want_kept)
        w_a, noisy = one_layer(w, grad, total_steps=1000, delta_t=1, alpha=0.6, end_fraction=1.0, t=3, seed=seed)
        w_b, plain = one_layer(w, grad, total_steps=1000, delta_t=1, alpha=0.6, end_fraction=1.0, t=3, drop_noise_std=0)
        noisy.update_masks()
        plain.update_masks()
        assert torch.equal(noisy.masks[0], plain.masks[0]) and torch.equal(w_a, w_b)


def test_the_options_reach_rigl_and_are_checked():
    model = create_model("mlp", 10, IN_SHAPE, hidden=[8])
    rigl = build_method("rigl", model, lr=0.1, total_steps=10).rigl
    assert (rigl.reinit_when_same, rigl.count, rigl.drop_noise_std, rigl.seed) == (False, "truncate", 1e-5, 0)
    cfg = make_cfg("method=rigl", "sparsity=0.9", "seed=4")
    s = method_class("rigl").settings_from(cfg, steps_per_epoch=3)
    assert (s.reinit_when_same, s.count, s.drop_noise_std, s.seed) == (False, "truncate", 1e-5, 4)
    config.validate(cfg)
    old = make_cfg(
        "method=rigl", "sparsity=0.9", "method.reinit_when_same=true", "method.count=round", "method.drop_noise_std=0"
    )
    config.validate(old)
    s = method_class("rigl").settings_from(old, steps_per_epoch=3)
    assert (s.reinit_when_same, s.count, s.drop_noise_std) == (True, "round", 0)
    for override, message in (
        ("method.count=floor", r"invalid method.count='floor': valid: truncate, round"),
        ("method.reinit_when_same=1", r"invalid method.reinit_when_same=1: must be true or false"),
        ("method.drop_noise_std=-1", r"invalid method.drop_noise_std=-1: must be >= 0"),
    ):
        with pytest.raises(ConfigError, match=message):
            config.validate(make_cfg("method=rigl", "sparsity=0.9", override))
    for bad in (dict(count="floor"), dict(drop_noise_std=-1.0)):
        with pytest.raises(ValueError, match="invalid"):
            RigL([torch.ones(4)], total_steps=10, **bad)


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
