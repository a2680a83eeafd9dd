"""The SparseProp backend: same trajectory as torch layers, and every guard of the notes exercised.

SparseProp returns silently wrong results for non-contiguous inputs, batches whose size is
not a multiple of 8, non-contiguous incoming gradients and unsupported convs; these tests run
each case through the backend and compare with plain torch layers.
"""

import copy

import pandas as pd
import pytest
import torch
from torch import nn

from mlbreg.backends import TorchBackend, make_backend
from mlbreg.methods import split_param_groups
from mlbreg.optim import MLLinBreg

from helpers import make_batches, make_cfg, run_mllinbreg

# every test needs the package: without it the `sparseprop` marker skips them (conftest.py)
pytestmark = pytest.mark.sparseprop
try:
    import mlbreg.backends.sparseprop as sparseprop_mod
    from mlbreg.backends.sparseprop import SparsePropBackend
except ImportError:
    sparseprop_mod = SparsePropBackend = None


class SmallNet(nn.Module):
    """conv -> conv(stride 2) -> flatten -> linear, 16x16 inputs (the conv output reaches the
    linear layer as a flattened view: guard 1)."""

    def __init__(self, bias=False):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True)
        self.shortcut = nn.Conv2d(2, 16, 1, stride=2, bias=False)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h) + self.shortcut(x))
        return self.fc(h.flatten(1))


def sparse_model(seed=0, density=0.3, **kwargs):
    torch.manual_seed(seed)
    model = SmallNet(**kwargs)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight.mul_((torch.rand_like(mod.weight) < density).float() * 3)
    return model


@pytest.mark.parametrize(
    "force_mode,reg,lam",
    [(False, "l1", 0.05), (True, "l1", 0.05), (True, "group", 0.2)],
    ids=["voo0-l1", "voo1-l1", "voo1-group"],
)
def test_same_trajectory_as_torch_layers(force_mode, reg, lam):
    """Several fine/coarse cycles of ML LinBreg (m = 3): weights, v, momentum and support match
    torch layers to fp32 tolerance, with batches of 13 and 5 (not multiples of 8) in coarse steps.
    `group` (S = whole kernels/rows, zeros included) reads S from the optimizer."""
    sizes = [16, 13, 24, 16, 5, 16, 13, 8, 16, 24, 13, 16]
    ref, model = sparse_model(), sparse_model()
    init_support = {n: (p != 0).float() for n, p in ref.named_parameters() if p.dim() > 1}
    ref_opt, ref_trace, _ = run_mllinbreg(ref, lambda m, o: TorchBackend(m), make_batches(sizes), reg=reg, lam=lam)
    opt, trace, backend = run_mllinbreg(
        model,
        lambda m, o: SparsePropBackend(m, batch_size=16, in_shape=(2, 16, 16), force=True, force_mode=force_mode, optimizer=o),
        make_batches(sizes),
        reg=reg,
        lam=lam,
    )
    assert [k for k, _ in trace] == [k for k, _ in ref_trace]
    assert sum(k == "sparse" for k, _ in trace) == 8 and backend.rebuilds == 4
    assert set(backend.swapped_layers()) == {"conv1", "conv2", "shortcut", "fc"}
    for (_, a), (_, b) in zip(trace, ref_trace):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        s, r = opt.state[p], ref_opt.state[q]
        for key in ("v", "momentum_buffer"):
            if key in r:
                torch.testing.assert_close(s[key], r[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
        if "support" in r:
            assert torch.equal(s["support"], r["support"]), name
    # the coarse steps really ran on the support only, and the support changed over the run
    assert any(
        not torch.equal(ref_opt.state[q]["support"], init_support[n]) for n, q in ref.named_parameters() if n in init_support
    )


def test_state_dict_unchanged_while_swapped_and_rebuild_only_after_fine_steps():
    model = sparse_model()
    keys = list(model.state_dict())
    backend = SparsePropBackend(model, batch_size=16, force=True)
    backend.before_step("full_grad")
    model(torch.randn(16, 2, 16, 16)).sum().backward()  # shapes come from the dense step
    backend.after_step("full_grad")
    backend.before_step("sparse")
    assert backend.rebuilds == 1 and "forward" in model.conv1.__dict__
    assert list(model.state_dict()) == keys and list(dict(model.named_parameters())) == [
        "conv1.weight",
        "conv2.weight",
        "conv2.bias",
        "shortcut.weight",
        "fc.weight",
        "fc.bias",
    ]
    backend.use_dense()
    assert "forward" not in model.conv1.__dict__
    backend.before_step("sparse")  # re-enabled, no rebuild (no fine step)
    assert backend.rebuilds == 1 and "forward" in model.conv1.__dict__
    backend.after_step("sparse")
    backend.before_step("full_grad")
    assert "forward" not in model.conv1.__dict__
    backend.after_step("full_grad")
    backend.before_step("sparse")
    assert backend.rebuilds == 2


def test_support_zeros_keep_their_slot_and_grad():
    """A weight of S that is exactly 0 (group support, or shrunk to 0 inside a cycle) still gets
    its gradient when the optimizer is known (SparseProp's own `w != 0` would drop it)."""
    model = sparse_model()
    opt = MLLinBreg(split_param_groups(model, "l1", 0.0), lr=0.1, m=10)
    w = model.conv1.weight
    support = (w != 0).float()
    with torch.no_grad():
        w.view(-1)[support.view(-1).nonzero()[0]] = 0.0  # a zero inside S
    opt.state[w]["support"] = support
    backend = SparsePropBackend(model, batch_size=8, in_shape=(2, 16, 16), force=True, optimizer=opt)
    backend.before_step("sparse")
    x = torch.randn(8, 2, 16, 16)
    model(x).square().sum().backward()
    backend.after_backward()
    grad = w.grad.clone()
    backend.use_dense()
    w.grad = None
    model(x).square().sum().backward()
    torch.testing.assert_close(grad, w.grad * support, rtol=1e-5, atol=1e-5)
    assert grad.view(-1)[support.view(-1).nonzero()[0]].abs().sum() > 0


def close(a, b, msg=""):
    """Equal to fp32 tolerance, relative to the tensor's scale (sums of many products)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()), msg=msg)


def _same_as_dense(model, backend, x, loss=lambda out: out.square().sum()):
    """Forward/backward through the swapped model and through plain torch layers."""
    model.zero_grad(set_to_none=True)
    ref = copy.deepcopy(model)
    xs, xr = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    backend.before_step("sparse")
    out = model(xs)
    loss(out).backward()
    backend.after_backward()
    out_ref = ref(xr)
    loss(out_ref).backward()
    close(out, out_ref)
    close(xs.grad, xr.grad)
    swapped = {f"{n}.weight".lstrip(".") for n in backend.swapped_layers()}
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if name in swapped:  # a sparse layer's weight gradient lives on the structure (w != 0) only
            mask = p != 0
            assert not p.grad[~mask].any(), name
            close(p.grad[mask], q.grad[mask], msg=name)
        else:
            close(p.grad, q.grad, msg=name)
    backend.use_dense()


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((ln for ln in f if ln.startswith("flags")), "").split())
    except OSError:
        return set()


@pytest.mark.skipif(
    "avx512f" not in _cpu_flags(),
    reason="SparseProp 0.1.14 built for an AVX2-only CPU (2-core AMD EPYC, Zen 3) corrupts the heap "
    "in this test (segfault or abort a few calls later, reproduced 5 of 5 times, also before "
    "the native backend existed); see docs/backends.md",
)
@pytest.mark.parametrize("force_mode", [False, True], ids=["voo0", "voo1"])
def test_guard_non_contiguous_inputs_and_gradients(force_mode):
    """Guards 1 and 3: channels_last and transposed inputs, an expanded incoming gradient
    (`out.sum()`), and conv -> flatten -> linear at batch and features multiples of 16."""
    model = sparse_model()
    backend = SparsePropBackend(model, batch_size=16, in_shape=(2, 16, 16), force=True, force_mode=force_mode)
    x = torch.randn(16, 2, 16, 16)
    _same_as_dense(model, backend, x.to(memory_format=torch.channels_last))
    _same_as_dense(model, backend, x.transpose(2, 3))
    _same_as_dense(model, backend, x, loss=lambda out: out.sum())  # expanded grad
    # a linear fed by a transposed (non-contiguous) view
    lin = nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) < 0.3)
    b = SparsePropBackend(lin, batch_size=16, in_shape=(32,), force=True)
    _same_as_dense(lin, b, torch.randn(32, 16).t())
    assert b.swapped_layers() == [""]


@pytest.mark.parametrize("batch", [1, 3, 13, 21])
def test_guard_batch_not_a_multiple_of_8(batch):
    model = sparse_model()
    backend = SparsePropBackend(model, batch_size=16, in_shape=(2, 16, 16), force=True)
    _same_as_dense(model, backend, torch.randn(batch, 2, 16, 16))


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 8, 3, padding=1, groups=2),
        nn.Conv2d(4, 8, 3, padding=2, dilation=2),
        nn.Conv2d(4, 8, (3, 1), padding=(1, 0)),
        nn.Conv2d(4, 8, 3, stride=3, padding=1),
        nn.Conv2d(4, 8, 3, stride=(1, 2), padding=1),
        nn.Conv2d(4, 8, 3, padding=(1, 0)),
        nn.Conv2d(4, 8, 3, padding="same"),
        nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 8, 3, padding=1).double(),
    ],
    ids=["groups2", "dilation2", "kernel3x1", "stride3", "stride1x2", "padding1x0", "same", "reflect", "float64"],
)
def test_guard_unsupported_convs_stay_dense(conv):
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.3)
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    model.to(conv.weight.dtype)
    backend = SparsePropBackend(model, batch_size=8, in_shape=(4, 12, 12), force=True)
    backend.before_step("sparse")
    assert backend.swapped_layers() == (["2"] if conv.weight.dtype == torch.float32 else [])
    assert "forward" not in conv.__dict__
    backend.use_dense()
    _same_as_dense(model, backend, torch.randn(8, 4, 12, 12, dtype=conv.weight.dtype))


def test_guard_int16_overflow_stays_dense():
    """More than 32767 structure entries in one output channel: an int16 index would overflow."""
    big = nn.Conv2d(3700, 2, 3, padding=1, bias=False)  # 33300 non-zeros per output channel
    small = nn.Conv2d(2, 4, 3, padding=1, bias=False)
    model = nn.Sequential(big, small)
    backend = SparsePropBackend(model, batch_size=8, in_shape=(3700, 4, 4), force=True)
    backend.before_step("sparse")
    assert backend.swapped_layers() == ["1"]
    row = backend.summary()[0]
    assert row["choice"] == "dense" and "32767" in row["why"]
    backend.use_dense()
    with torch.no_grad():  # 1/4 dense: 8325 per channel, fits
        big.weight.mul_(torch.rand_like(big.weight) < 0.25)
    backend.after_step("full_grad")
    _same_as_dense(model, backend, torch.randn(8, 3700, 4, 4))
    assert backend.swapped_layers() == ["0", "1"]


@pytest.mark.parametrize("min_speedup, sparse", [(0.0, True), (1e9, False)], ids=["sparse-wins", "dense-wins"])
def test_timed_choice_and_cache(min_speedup, sparse):
    """Without `force`, a timed comparison picks each layer by `min_speedup` (0: any sparse mode wins,
    1e9: dense always wins, so the outcome does not depend on the machine's timings); the choice is
    reused within its bin of support sizes (3 weights fewer in fc: no new timing) and timed
    again in a new bin (conv2's support doubles)."""
    model = sparse_model(density=0.05)
    backend = SparsePropBackend(
        model, batch_size=16, in_shape=(2, 16, 16), repeats=1, warmup=1, min_speedup=min_speedup, choice_store=None
    )
    backend.before_step("sparse")
    rows = backend.summary()
    choices = [(row["layer"], row["choice"], row["why"]) for row in rows]
    assert all("dense_ms" in row and ("voo0_ms" in row) for row in rows)
    if sparse:
        assert all(row["choice"].startswith("sparse(") and "faster than dense" in row["why"] for row in rows), choices
        assert backend.swapped_layers() == [row["layer"] for row in rows]
    else:
        assert all(row["choice"] == "dense" and row["why"].startswith("dense is faster") for row in rows), choices
        assert backend.swapped_layers() == []
    assert backend.timing_seconds > 0
    n_decisions = len(backend.decisions)
    assert n_decisions == len(rows)
    backend.use_dense()
    with torch.no_grad():  # a few weights leave the support: same decisions
        model.fc.weight.view(-1)[model.fc.weight.view(-1).nonzero()[:3]] = 0.0  # 3 of ~500
    backend.after_step("full_grad")
    backend.before_step("sparse")
    assert len(backend.decisions) == n_decisions and backend.rebuilds == 2
    backend.use_dense()
    with torch.no_grad():  # conv2's support doubles: conv2 is timed again
        w = model.conv2.weight
        w.add_((w == 0) * (torch.rand_like(w) < 0.06) * 0.1)
    backend.after_step("full_grad")
    backend.before_step("sparse")
    assert len(backend.decisions) == n_decisions + 1


def test_make_backend():
    model = sparse_model()
    assert isinstance(
        make_backend("sparseprop", model, torch.device("cpu"), "mllinbreg", batch_size=8, in_shape=(2, 16, 16)),
        SparsePropBackend,
    )
    # auto: SparseProp when the native kernels are unavailable
    from mlbreg.backends.native import build as native_build

    def unavailable():
        raise native_build.NativeUnavailable("test")

    import unittest.mock

    with unittest.mock.patch.object(native_build, "load", unavailable):
        assert isinstance(
            make_backend("auto", model, torch.device("cpu"), "mllinbreg", batch_size=8, in_shape=(2, 16, 16)), SparsePropBackend
        )
    assert isinstance(make_backend("auto", model, torch.device("cpu"), "sgd"), TorchBackend)


def test_train_digits_same_as_torch_backend(tmp_path, monkeypatch):
    """A whole run through train(): backend=sparseprop (every eligible layer swapped) equals
    backend=torch, with a last batch of 29 samples per epoch (1437 % 128)."""
    from mlbreg.train import train

    class Forced(SparsePropBackend):
        def __init__(self, model, **options):
            super().__init__(model, force=True, **options)
            self.instances.append(self)

        instances = []

    monkeypatch.setattr(sparseprop_mod, "SparsePropBackend", Forced)
    # lr 0.05: at lr 0.1 this tiny net amplifies any fp32 summation-order difference to ~1e-3 in
    # 24 steps (torch layers on 1 vs 2 threads differ exactly as much), which would hide a real bug
    common = ["model=convnet", "device=cpu", "epochs=2", "m=5", "init.density=0.2", "lam=0.01", "lr=0.05", "checkpoint_every=0"]
    results = {}
    for name in ("torch", "sparseprop"):
        cfg = make_cfg(f"backend={name}", *common)
        outcome = train(cfg, tmp_path / name)
        assert outcome["status"] == "finished"
        results[name] = (pd.read_csv(tmp_path / name / "metrics.csv"), torch.load(tmp_path / name / "model.pt"))
    (ref, ref_model), (got, got_model) = results["torch"], results["sparseprop"]
    backend = Forced.instances[-1]
    assert backend.rebuilds >= 4 and len(backend.swapped_layers()) >= 3
    assert got.coarse_steps.iloc[-1] > 0
    for col in ("train_loss", "test_loss", "sparsity_pct"):
        assert got[col].tolist() == pytest.approx(ref[col].tolist(), rel=1e-4, abs=1e-5), col
    # accuracies are counts: an fp32 near-tie of two logits may flip one sample (1/360 of the test set)
    for col in ("train_acc_pct", "test_acc_pct"):
        assert got[col].tolist() == pytest.approx(ref[col].tolist(), abs=100 / 360 + 1e-9), col
    assert list(got_model) == list(ref_model)
    for key in ref_model:
        close(got_model[key], ref_model[key], msg=key)


def test_gradients_are_reproducible_with_two_threads():
    """Six identical steps on 2 threads give bit-identical outputs and gradients (SparseProp's OpenMP
    weight-gradient sums vary in order between calls; mlbreg runs its backward on one thread), in both
    `vectorizing_over_on` modes."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False),
        nn.Flatten(),
        nn.Linear(2048, 10),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand_like(p) < 0.1)
    x = torch.randn(64, 16, 8, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for mode in (True, False):
            backend = SparsePropBackend(
                model, batch_size=64, in_shape=(16, 8, 8), force=True, force_mode=mode, choice_store=None
            )
            backend.before_step("sparse")
            assert backend.swapped_layers() == ["0", "2", "4"]
            results = []
            for _ in range(6):
                xx = x.clone().requires_grad_(True)
                model(xx).square().sum().backward()
                backend.after_backward()
                results.append([xx.grad] + [p.grad.clone() for p in model.parameters()])
                model.zero_grad(set_to_none=True)
            backend.use_dense()
            for other in results[1:]:
                assert all(torch.equal(a, b) for a, b in zip(results[0], other)), mode
    finally:
        torch.set_num_threads(threads)
