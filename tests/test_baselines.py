"""The baselines SET, static sparse training and gradual magnitude pruning (GMP): hand-worked
updates, their schedules, their training FLOPs against hand counts, resumes and bad settings."""

import pandas as pd
import pytest
import torch
from torch import nn

from mlbreg.checks import ConfigError
from mlbreg.config import validate
from mlbreg.methods import build_method
from mlbreg.models import create_model, prunable_modules
from mlbreg.sparsity import GMP, RigL, drop_and_grow_random, gmp_sparsity, layer_magnitude_masks, sparse_init_
from mlbreg.sparsity.rigl import drop_noise, grow_generator
from mlbreg.train import train

from helpers import make_cfg, signal_at_step

IN_SHAPE = (1, 8, 8)
SMALL = ["model.hidden=[16]", "backend=torch"]  # 64-16-10: f_D = 2·64·16 + 2·16·10 = 2368 per sample


def weights(model):
    return [m.weight for _, m in prunable_modules(model)]


def batch(step):
    g = torch.Generator().manual_seed(2000 + step)
    return torch.randn(32, *IN_SHAPE, generator=g), torch.randint(0, 10, (32,), generator=g)


def forward_backward(model, method, step):
    x, y = batch(step)
    method.optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()


# -- SET ------------------------------------------------------------------------------------
def set_layer(w, grad, seed=0, t=10):
    """A SET mask machinery on one weight at update step t (ΔT = 10, T_end = 20: f = α/2 = 0.5)."""
    w = nn.Parameter(torch.tensor(w))
    w.grad = torch.tensor(grad)
    rigl = RigL([w], total_steps=40, delta_t=10, alpha=1.0, end_fraction=0.5, seed=seed, grow="random")
    rigl.steps_taken = t
    assert rigl.is_update_step() and rigl.drop_counts() == [2]
    return w, rigl


def test_set_drops_the_smallest_and_regrows_at_random_among_the_inactive():
    """Hand case: 4 active weights, k = ⌊0.5·4⌋ = 2: the two smallest |w| go, two weights drawn
    among the 8 inactive after the drop come in at 0 with zero momentum, whatever the gradient."""
    w0 = [0.5, -0.1, 0.0, 0.3, 0.0, 0.0, -0.2, 0.0, 0.0, 0.0]
    grad = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1e6]  # RigL would grow index 9; SET ignores it
    grown_sets = set()
    for seed in range(8):
        w, rigl = set_layer(w0, grad, seed=seed)
        opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        opt.state[w]["momentum_buffer"] = torch.arange(1.0, 11.0)
        old = rigl.masks[0].clone()
        assert rigl.update_masks(opt) == [2]
        new = rigl.masks[0]
        assert int(new.sum()) == 4  # the density never changes
        assert bool(new[0]) and bool(new[3])  # 0.5 and 0.3 stay
        grown = torch.nonzero(new & ~torch.tensor([True, False, False, True] + [False] * 6)).flatten().tolist()
        assert len(grown) == 2 and not set(grown) & {0, 3}  # two of the 8 candidates (1, 2, 4, ..., 9)
        fresh = new & ~old  # connections that are new
        assert torch.all(w[fresh] == 0) and torch.all(opt.state[w]["momentum_buffer"][fresh] == 0)
        assert torch.all(w[~new] == 0)
        grown_sets.add(tuple(grown))
        # the same (seed, step, layer) draws the same
        w2, again = set_layer(w0, [0.0] * 10, seed=seed)
        again.update_masks()
        assert torch.equal(again.masks[0], new)
    assert len(grown_sets) >= 4, grown_sets  # random, not the largest gradient every time


def test_set_grows_each_candidate_with_equal_probability():
    """Drawn 3000 times (another seed each), each of the 8 candidates is grown with probability
    k/8 = 0.25, whatever its |θ| (the drop noise is off: drops are the hand-picked ones)."""
    w = torch.tensor([0.9, 0.8, 0.05, 0.04, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    mask = w != 0
    hits = torch.zeros(10)
    for s in range(3000):
        new, kept = drop_and_grow_random(w, mask, 2, grow_generator(s, 100, 0))
        assert kept.tolist() == [True, True] + [False] * 8
        hits += (new & ~kept).float()
    freq = hits[2:] / 3000
    assert hits[:2].sum() == 0 and torch.all((freq - 0.25).abs() < 0.035), freq


def test_set_update_steps_take_the_sgd_step_then_drop_and_regrow():
    """SET over 60 steps (ΔT = 5, T_end = 45): every step is sparse; on an update step the SGD
    step is taken first (as by the static method on the same mask), then the drop on the
    stepped weights and the random regrowth of `drop_and_grow_random` with this step's seeds."""
    model = create_model("mlp", 10, IN_SHAPE, hidden=[48, 32])
    sparse_init_(model, density=0.2, scheme="erk", seed=0)
    twin = create_model("mlp", 10, IN_SHAPE, hidden=[48, 32])
    twin.load_state_dict(model.state_dict())
    opts = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    method = build_method("set", model, total_steps=60, delta_t=5, seed=3, **opts)
    plain = build_method("static", twin, **opts)  # the same SGD step + re-masking, no update
    counts = list(method.rigl.active)
    updates = []
    for t in range(60):
        assert method.step_kind() == "sparse"
        forward_backward(model, method, t)
        forward_backward(twin, plain, t)
        plain.masks = [m.clone() for m in method.rigl.masks]
        old, k = [m.clone() for m in method.rigl.masks], method.rigl.drop_counts()
        update = method.rigl.is_update_step()
        method.step()
        plain.step()
        stepped = weights(twin)
        if update:
            updates.append(t)
            for i, (w, w_sgd) in enumerate(zip(weights(model), stepped)):
                want, _ = drop_and_grow_random(w_sgd, old[i], k[i], grow_generator(3, t, i), drop_noise(w.shape, 1e-5, 3, t, i))
                assert torch.equal(method.rigl.masks[i], want)
                assert torch.equal(w, w_sgd * (want & old[i]))
        else:
            assert all(torch.equal(a, b) for a, b in zip(weights(model), stepped))
        assert [int(m.sum()) for m in method.rigl.masks] == counts
        twin.load_state_dict(model.state_dict())  # go on from SET's state
        for p, q in zip(model.parameters(), twin.parameters()):
            plain.optimizer.state[q]["momentum_buffer"] = method.optimizer.state[p]["momentum_buffer"].clone()
    assert updates == [5, 10, 15, 20, 25, 30, 35, 40]


# -- GMP ------------------------------------------------------------------------------------
def test_gmp_schedule_hand_values():
    """s_t = s_f(1 − (1 − (t − t₀)/(t_end − t₀))³): 0 up to t₀, the target from t_end on; pruning
    points every Δt after t₀, and t_end itself when the window is not a multiple of Δt."""
    assert [gmp_sparsity(t, 0.5, 12, 24) for t in (0, 12, 18, 24, 30)] == [0.0, 0.0, 0.4375, 0.5, 0.5]
    assert gmp_sparsity(3, 0.5, 0, 10) == pytest.approx(0.5 * (1 - 0.7**3))
    w = [torch.ones(4)]
    assert GMP(w, target=0.5, total_steps=48, begin=0.25, end=0.5, frequency=6).prune_steps() == [18, 24]
    assert GMP(w, target=0.5, total_steps=48, begin=0.25, end=0.5, frequency=5).prune_steps() == [17, 22, 24]
    assert GMP(w, target=0.5, total_steps=48, begin=0.25, end=0.5, frequency=100).prune_steps() == [24]


def test_gmp_prunes_by_magnitude_per_layer_or_globally():
    """Hand case, two layers of 4: per layer (uniform) each keeps its own largest |w|; globally
    the smallest of all go first; a pruned weight never comes back; momentum is masked too."""
    a = nn.Parameter(torch.tensor([[0.3, -0.1], [0.2, 0.05]]))
    b = nn.Parameter(torch.tensor([4.0, -6.0, 1.0, 2.0]))
    gmp = GMP([a, b], target=0.75, total_steps=10, begin=0.0, end=1.0, frequency=1)
    opt = torch.optim.SGD([a, b], lr=0.1, momentum=0.9)
    for p in (a, b):
        opt.state[p]["momentum_buffer"] = torch.ones_like(p)
    gmp.prune(0.5, opt)
    assert gmp.masks[0].tolist() == [[True, False], [True, False]] and gmp.masks[1].tolist() == [True, True, False, False]
    assert a.tolist() == [[pytest.approx(0.3), 0.0], [pytest.approx(0.2), 0.0]]
    assert opt.state[a]["momentum_buffer"].tolist() == [[1, 0], [1, 0]]
    gmp.prune(0.75, opt)
    assert gmp.masks[0].tolist() == [[True, False], [False, False]] and gmp.masks[1].tolist() == [False, True, False, False]
    # an inactive weight is never revived, even with a large value (it would be 0 in training)
    revived = layer_magnitude_masks([torch.tensor([9.0, 1.0, 2.0])], [torch.tensor([False, True, True])], [2])
    assert revived[0].tolist() == [False, True, True]
    a2, b2 = torch.tensor([[0.3, -0.1], [0.2, 0.05]]), torch.tensor([4.0, -6.0, 1.0, 2.0])
    glob = GMP([a2, b2], target=0.75, total_steps=10, begin=0.0, end=1.0, frequency=1, scope="global")
    glob.prune(0.5)  # the 4 smallest of 8: all of a
    assert not glob.masks[0].any() and glob.masks[1].all()
    # ERK per layer: the layer sizes of the init scheme at each step's density
    mlp = weights(create_model("mlp", 10, IN_SHAPE, hidden=[48, 32]))
    erk = GMP(mlp, target=0.9, total_steps=10, scheme="erk")
    assert erk.counts(0.9) != GMP(mlp, target=0.9, total_steps=10).counts(0.9)
    assert sum(erk.counts(0.9)) == round(0.1 * sum(w.numel() for w in mlp))


def test_gmp_on_digits_reaches_the_target_exactly(tmp_path):
    """A run: dense until the first pruning point, non-zeros shrinking monotonically, the exact
    target from t_end on (and to the end), momentum masked; global scope too."""
    for scope in ("layer", "global"):
        cfg = make_cfg(
            "method=gmp",
            "sparsity=0.9",
            "epochs=6",
            "method.frequency=7",
            f"method.scope={scope}",
            "model.hidden=[32]",
            "backend=torch",
        )
        run = tmp_path / scope
        assert train(cfg, run)["status"] == "finished"
        m = pd.read_csv(run / "metrics.csv")
        n = int(m.prunable_params.iloc[0])
        # T = 72, t0 = 14, t_end = 54: epoch 1 (12 steps) is dense, epochs 5 and 6 at the target
        assert m.nonzeros.iloc[0] == n and (m.nonzeros.diff().dropna() <= 0).all()
        assert m.nonzeros.iloc[-2:].tolist() == [n - round(0.9 * n)] * 2
        ckpt = torch.load(run / "checkpoint.pt", weights_only=False)["method"]
        assert ckpt["gmp"]["prunes_done"] == 6  # 21, 28, ..., 49 and t_end = 54
        buffers = [s["momentum_buffer"] for s in ckpt["optimizer"]["state"].values() if s["momentum_buffer"].dim() == 2]
        assert len(buffers) == 2
        for mask, buf in zip(ckpt["gmp"]["masks"], buffers):  # the weights' buffers, in layer order
            assert torch.all(buf[~mask] == 0) and bool((buf[mask] != 0).any())


# -- training FLOPs, hand counted -------------------------------------------------------------
# digits: 1437 training images, batch 128: 12 steps per epoch, the 12th of 29 images
@pytest.mark.parametrize(
    "method, overrides, ratio",
    [
        ("static", ["sparsity=0.75"], 0.25),  # 3·f_S every step, f_S = f_D/4
        ("set", ["sparsity=0.75", "method.delta_t=5"], 0.25),  # the same: no step needs a dense gradient
        # dense steps 1-18 (17·128 + 29 images), at 7/16 sparsity steps 19-24 (5·128 + 29), at 1/2 steps 25-48
        (
            "gmp",
            ["sparsity=0.5", "method.begin=0.25", "method.end=0.5", "method.frequency=6"],
            (2205 + 9 / 16 * 669 + 1 / 2 * 2874) / 5748,
        ),
    ],
)
def test_training_flops_match_a_hand_count(method, overrides, ratio, tmp_path):
    """3·f_D per image for dense steps, 3·f_S for steps on a mask (f_S: the mask's share of each
    layer's f_D), over 4 epochs of the 64-16-10 MLP."""
    cfg = make_cfg(f"method={method}", "epochs=4", *SMALL, *overrides)
    assert train(cfg, tmp_path)["status"] == "finished"
    last = pd.read_csv(tmp_path / "metrics.csv").iloc[-1]
    f_dense = 2 * 64 * 16 + 2 * 16 * 10
    assert last.train_gflops == pytest.approx(3 * f_dense * 4 * 1437 * ratio / 1e9, rel=1e-9)
    assert last.train_flops_vs_sgd == pytest.approx(ratio, rel=1e-9)
    assert (last.fine_steps, last.coarse_steps) == ((18, 30) if method == "gmp" else (0, 48))
    assert last.nonzeros == (592 if method == "gmp" else 296)


# -- resume -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method",
    [
        ["method=static", "sparsity=0.8"],
        ["method=gmp", "sparsity=0.9", "method.frequency=5"],
        ["method=set", "sparsity=0.9", "method.delta_t=4"],
    ],
    ids=lambda m: m[0],
)
def test_a_run_stopped_mid_epoch_resumes_to_the_same_masks(method, tmp_path, monkeypatch):
    """SIGTERM at step 21 (epoch 2, between mask changes), then a rerun: weights, masks and
    momentum equal the uninterrupted run's."""
    overrides = [*method, "epochs=4", "model.hidden=[32]", "backend=torch"]
    assert train(make_cfg(*overrides), tmp_path / "ref")["status"] == "finished"
    signal_at_step(monkeypatch, 21)
    assert train(make_cfg(*overrides), tmp_path / "run")["status"] == "interrupted"
    monkeypatch.undo()
    assert train(make_cfg(*overrides), tmp_path / "run")["status"] == "finished"
    ref, run = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in ("ref", "run"))
    for key, value in ref["model"].items():
        assert torch.equal(run["model"][key], value), key
    key = method[0].split("=")[1]
    masks = {"static": lambda s: s["masks"], "gmp": lambda s: s["gmp"]["masks"], "set": lambda s: s["rigl"]["masks"]}[key]
    assert all(torch.equal(a, b) for a, b in zip(masks(ref["method"]), masks(run["method"])))
    for a, b in zip(ref["method"]["optimizer"]["state"].values(), run["method"]["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


# -- bad settings -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=set"], r"invalid sparsity=null: method=set needs a target sparsity in \(0, 1\)"),
        (["method=static"], r"invalid sparsity=null: method=static needs a target sparsity"),
        (["method=gmp", "sparsity=1.0"], r"invalid sparsity=1.0: must be in \(0, 1\)"),
        (["method=set", "sparsity=0.9", "method.delta_t=0"], r"invalid method.delta_t=0: must be an integer >= 1"),
        (["method=set", "sparsity=0.9", "method.alpha=1.5"], r"invalid method.alpha=1.5: must be in \[0, 1\]"),
        (["method=set", "sparsity=0.9", "method.end_fraction=0"], r"invalid method.end_fraction=0: must be in \(0, 1\]"),
        (["method=static", "sparsity=0.9", "method.weight_decay=-1"], r"invalid method.weight_decay=-1: must be >= 0"),
        (["method=gmp", "sparsity=0.9", "method.begin=1"], r"invalid method.begin=1: must be in \[0, 1\) \(t0 = begin"),
        (["method=gmp", "sparsity=0.9", "method.end=0"], r"invalid method.end=0: must be in \(0, 1\] \(t_end"),
        (["method=gmp", "sparsity=0.9", "method.frequency=0.5"], r"invalid method.frequency=0.5: must be an integer >= 1"),
        (["method=gmp", "sparsity=0.9", "method.scope=layers"], r"invalid method.scope='layers': valid: layer, global"),
        (["method=gmp", "sparsity=0.9", "method.begin=0.8"], r"invalid method.begin=0.8: must be < method.end=0.75"),
        (
            ["method=gmp", "sparsity=0.9", "method.scope=global", "init.dense_first=true"],
            r"invalid method.scope='global': .* use method.scope=layer",
        ),
    ],
)
def test_bad_settings_name_the_key_and_the_valid_range(overrides, message):
    """Each bad value of SET's, static's and GMP's settings fails the config check with the key,
    the value and the valid range (or the way out), before anything runs."""
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(*overrides))


def test_a_schedule_window_without_steps_is_refused():
    """begin and end that round to the same step of a short run leave nothing to prune over:
    GMP refuses them with both values and the way out, instead of never pruning."""
    with pytest.raises(ValueError, match=r"begin=0.5 and end=0.55 of 10 steps leave no step to prune over"):
        GMP([torch.ones(3)], target=0.5, total_steps=10, begin=0.5, end=0.55)
    assert GMP([torch.ones(3)], target=0.5, total_steps=10, begin=0.5, end=0.6).prune_steps() == [6]
