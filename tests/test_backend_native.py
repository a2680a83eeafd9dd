"""The native backend: every kernel against torch in float64, the layout and guards, and ML
LinBreg trajectories / whole runs that equal backend=torch.

Relative error = ||got - ref|| / ||ref|| over the whole tensor, against a float64 reference.
"""

import copy

import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mlbreg.backends import TorchBackend, make_backend
from mlbreg.backends.native import build as native_build
from mlbreg.methods import split_param_groups
from mlbreg.models import create_model
from mlbreg.optim import MLLinBreg
from mlbreg.sparsity import sparse_init_

from helpers import backend_step, make_batches, make_cfg, run_mllinbreg, signal_at_step

try:
    EXT = native_build.load()
except native_build.NativeUnavailable as err:  # pragma: no cover - a machine without a compiler
    pytest.skip(f"native kernels unavailable: {err}", allow_module_level=True)

from mlbreg.backends.native import ops  # noqa: E402
from mlbreg.backends.native.backend import NativeBackend  # noqa: E402

TOL = 1e-5


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def masked_weight(shape, density, gen, empty_rows=(), dense_rows=()):
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = torch.rand(shape, generator=gen) < density
    for r in empty_rows:
        mask[r] = False
    for r in dense_rows:
        mask[r] = True
    return w * mask, mask


def check_conv(batch, c_in, c_out, hw, k, stride, pad, density, layout="nchw", seed=0):
    gen = torch.Generator().manual_seed(seed)
    w, mask = masked_weight((c_out, c_in, k, k), density, gen, empty_rows=(0,), dense_rows=(c_out - 1,))
    x64 = torch.randn(batch, c_in, hw, hw + 1, generator=gen, dtype=torch.float64)
    st = ops.build_structure(EXT, mask, stride, pad)
    x = x64.float()
    if layout == "chwb":
        x = ops.from_chwb(ops.to_chwb(x))
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # a non-contiguous view
        x = torch.stack([x, x], -1)[..., 0]
    x.requires_grad_(True)
    w_val = w.reshape(-1)[st.idx].float().requires_grad_(True)
    out = ops.sparse_conv2d(x, w_val, st)
    g64 = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(g64.float())
    xr, wr = x64.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = F.conv2d(xr, wr, stride=stride, padding=pad)
    ref.backward(g64)
    assert out.shape == ref.shape
    assert rel(out, ref) < TOL
    assert rel(x.grad, xr.grad) < TOL
    assert rel(w_val.grad, wr.grad.reshape(-1)[st.idx]) < TOL
    return st


@pytest.mark.parametrize(
    "k,stride,pad", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0), (3, 1, 0), (3, 2, 2), (5, 1, 2), (2, 2, 1)]
)
@pytest.mark.parametrize("batch", [1, 13, 32, 37, 70])
def test_conv_matches_torch_across_geometry_and_batch(k, stride, pad, batch):
    """Forward, input gradient and weight gradient (on the support) of every geometry, at batch sizes
    below, at and around the 32-lane batch tile (a partial tile takes the scalar path)."""
    check_conv(batch, 6, 7, 9, k, stride, pad, 0.3, seed=batch * 10 + k + stride)


@pytest.mark.parametrize("density", [0.01, 0.05, 0.3, 1.0])
def test_conv_matches_torch_across_density(density):
    """Sparse to fully dense, one output channel empty and one fully dense every time."""
    check_conv(40, 32, 16, 8, 3, 1, 1, density)
    check_conv(33, 32, 16, 8, 3, 2, 1, density)


@pytest.mark.parametrize("layout", ["nchw", "chwb", "channels_last", "sliced"])
def test_conv_any_input_layout(layout):
    check_conv(35, 5, 6, 7, 3, 1, 1, 0.4, layout=layout)


def test_conv_output_is_chwb_and_expanded_gradient():
    """The output is a CHWB view; an expanded incoming gradient (loss = out.sum()) is handled."""
    gen = torch.Generator().manual_seed(3)
    w, mask = masked_weight((4, 3, 3, 3), 0.5, gen)
    st = ops.build_structure(EXT, mask, 1, 1)
    x = torch.randn(9, 3, 5, 5, generator=gen).requires_grad_(True)
    w_val = w.reshape(-1)[st.idx].float().requires_grad_(True)
    out = ops.sparse_conv2d(x, w_val, st)
    assert ops.is_chwb(out)
    out.sum().backward()
    xr, wr = x.detach().double().requires_grad_(True), w.clone().requires_grad_(True)
    F.conv2d(xr, wr, padding=1).sum().backward()
    assert rel(x.grad, xr.grad) < TOL and rel(w_val.grad, wr.grad.reshape(-1)[st.idx]) < TOL


def test_empty_support_and_hand_worked_case():
    """A 1x1 conv with two weights worked by hand, and a conv with no non-zeros (output 0)."""
    mask = torch.zeros(2, 2, 1, 1, dtype=torch.bool)
    mask[0, 1] = mask[1, 0] = True
    st = ops.build_structure(EXT, mask, 1, 0)
    x = torch.tensor([[[[1.0]], [[2.0]]], [[[3.0]], [[4.0]]]])  # (B=2, C=2, 1, 1)
    w_val = torch.tensor([10.0, 100.0])  # w[0,1] = 10, w[1,0] = 100
    out = ops.sparse_conv2d(x, w_val, st)
    assert out.flatten(1).tolist() == [[20.0, 100.0], [40.0, 300.0]]
    empty = ops.build_structure(EXT, torch.zeros(3, 2, 3, 3, dtype=torch.bool), 1, 1)
    assert torch.equal(ops.sparse_conv2d(torch.randn(4, 2, 5, 5), torch.zeros(0), empty), torch.zeros(4, 3, 5, 5))


@pytest.mark.parametrize("batch", [1, 13, 64, 77])
@pytest.mark.parametrize("density", [0.01, 0.3, 1.0])
def test_linear_matches_torch(batch, density):
    gen = torch.Generator().manual_seed(batch)
    w, mask = masked_weight((10, 48), density, gen, empty_rows=(0,), dense_rows=(9,))
    st = ops.build_structure(EXT, mask)
    x64 = torch.randn(batch, 48, generator=gen, dtype=torch.float64)
    x = x64.float().requires_grad_(True)
    w_val = w.reshape(-1)[st.idx].float().requires_grad_(True)
    out = ops.sparse_linear(x, w_val, st)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(g.float())
    xr, wr = x64.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = F.linear(xr, wr)
    ref.backward(g)
    assert rel(out, ref) < TOL and rel(x.grad, xr.grad) < TOL
    assert rel(w_val.grad, wr.grad.reshape(-1)[st.idx]) < TOL


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("res,relu", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("batch,momentum", [(13, 0.1), (32, None), (3, 0.3)])
def test_batchnorm_matches_torch(training, res, relu, batch, momentum):
    """Native BatchNorm (+ residual) (+ ReLU) equals nn.BatchNorm2d: output, all gradients, running
    statistics and num_batches_tracked, in train and eval mode, over three steps."""
    gen = torch.Generator().manual_seed(batch)
    bn = nn.BatchNorm2d(5, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.uniform_(-1, 1, generator=gen)
        bn.running_mean.uniform_(-1, 1, generator=gen)
        bn.running_var.uniform_(0.5, 2, generator=gen)
    ref = copy.deepcopy(bn).double()
    bn.train(training)
    ref.train(training)
    for _step in range(3):
        x64 = torch.randn(batch, 5, 6, 4, generator=gen, dtype=torch.float64) * 3 + 1
        r64 = torch.randn(batch, 5, 6, 4, generator=gen, dtype=torch.float64)
        x = ops.from_chwb(ops.to_chwb(x64.float())).requires_grad_(True)
        r = r64.float().requires_grad_(True)  # NCHW residual: converted inside
        xr, rr = x64.clone().requires_grad_(True), r64.clone().requires_grad_(True)
        out = ops.batch_norm(bn, x, EXT, res=r if res else None, relu=relu)
        want = ref(xr) + (rr if res else 0)
        want = torch.relu(want) if relu else want
        g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        out.backward(g.float())
        want.backward(g)
        assert ops.is_chwb(out)
        assert rel(out, want) < TOL and rel(x.grad, xr.grad) < TOL
        if res:
            assert rel(r.grad, rr.grad) < TOL
        assert rel(bn.weight.grad, ref.weight.grad) < TOL and rel(bn.bias.grad, ref.bias.grad) < TOL
        assert rel(bn.running_mean, ref.running_mean) < TOL and rel(bn.running_var, ref.running_var) < TOL
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked)
        bn.zero_grad()
        ref.zero_grad()


def test_kernels_give_the_same_bits_on_every_call_and_thread_count():
    """The kernels sum in a fixed order: forward, both input gradients (stride 1 and 2) and the weight
    gradient are bit-identical across calls and across 1 and 2 threads (each output element is computed by
    one thread, in the same order), with a batch that has a scalar tail (37 lanes)."""
    gen = torch.Generator().manual_seed(3)
    results = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        gen.manual_seed(3)
        got = []
        for stride, k, pad in ((1, 3, 1), (2, 3, 1), (2, 1, 0)):
            mask = torch.rand(24, 16, k, k, generator=gen) < 0.2
            w = torch.randn(24, 16, k, k, generator=gen) * mask
            st = ops.build_structure(EXT, mask, stride, pad)
            x = ops.from_chwb(torch.randn(16, 12, 12, 37, generator=gen)).requires_grad_(True)
            w_val = w.reshape(-1)[st.idx].clone().requires_grad_(True)
            out = ops.sparse_conv2d(x, w_val, st)
            out.backward(ops.from_chwb(torch.randn(out.permute(1, 2, 3, 0).shape, generator=gen)))
            got += [out.detach(), x.grad, w_val.grad]
        results.append(got)
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)
    for a, b in zip(results[0], results[2]):
        assert torch.equal(a, b)


def test_padded_planes_and_the_padded_entry_points():
    """pad_chwb: zero border, a channel stride of an odd number of cache lines (no two channels' windows in
    the same cache sets), p = 0 a view; the padded entry points equal the plain ones; a padded tensor of
    the wrong size is refused."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 6, 7, 16, generator=gen)
    xp = EXT.pad_chwb(x, 2)
    cs = xp.shape[1]
    assert cs >= 10 * 11 * 16 and (cs // 16) % 2 == 1 and cs % 16 == 0
    planes = xp[:, : 10 * 11 * 16].reshape(5, 10, 11, 16)
    assert torch.equal(planes[:, 2:8, 2:9], x)
    border = planes.clone()
    border[:, 2:8, 2:9] = 0
    assert not border.any() and not xp[:, 10 * 11 * 16 :].any()
    assert EXT.pad_chwb(x, 0).data_ptr() == x.data_ptr()
    mask = torch.rand(3, 5, 5, 5, generator=gen) < 0.4
    st = ops.build_structure(EXT, mask, 1, 2)
    val = torch.randn(st.nnz, generator=gen)
    plain = EXT.conv_gather(x, st.bptr, st.chan, val, 3, 5, 1, 2)
    assert torch.equal(EXT.conv_gather_padded(xp, 10, 11, 16, st.bptr, st.chan, val, 3, 5, 1, False), plain)
    g = torch.randn(plain.permute(1, 2, 3, 0).shape, generator=gen).contiguous()
    assert torch.equal(
        EXT.conv_sddmm_padded(g, xp, 10, 11, st.bptr, st.chan, 5, 1), EXT.conv_sddmm(g, x, st.bptr, st.chan, 5, 1, 2)
    )
    with pytest.raises(RuntimeError, match="padded input does not match"):
        EXT.conv_gather_padded(xp, 10, 12, 16, st.bptr, st.chan, val, 3, 5, 1, False)


def test_deep_layer_uses_batch_slices_and_stays_exact():
    """512 input channels at 4x4 with a batch of 128: the kernels work on slices of the batch (the input
    window of all channels must fit a core's L2); still equal to float64 torch."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(8, 512, 3, 3, generator=gen) * (torch.rand(8, 512, 3, 3, generator=gen) < 0.05)
    x = torch.randn(128, 512, 4, 4, generator=gen, dtype=torch.float64)
    assert ops.max_conv_error(EXT, x, w, 1, 1) < TOL


def test_structure_checks_reject_bad_input():
    st = ops.build_structure(EXT, torch.ones(2, 3, 3, 3, dtype=torch.bool), 1, 1)
    with pytest.raises(RuntimeError, match="contiguous"):
        EXT.conv_gather(torch.randn(3, 4, 4, 2).transpose(1, 2), st.bptr, st.chan, torch.ones(st.nnz), 2, 3, 1, 1)
    with pytest.raises(RuntimeError, match="channel index"):
        EXT.conv_gather(torch.randn(2, 4, 4, 2), st.bptr, st.chan, torch.ones(st.nnz), 2, 3, 1, 1)


# --------------------------------------------------------------------------- the backend
class SmallNet(nn.Module):
    """conv -> BN -> ReLU -> strided conv (with bias) + BN(1x1 strided shortcut) -> flatten -> linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True)
        self.shortcut = nn.Conv2d(2, 16, 1, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.conv2(h) + self.bn2(self.shortcut(x)))
        return self.fc(h.flatten(1))


def sparse_model(seed=0, density=0.3):
    torch.manual_seed(seed)
    model = SmallNet()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight.mul_((torch.rand_like(mod.weight) < density).float() * 3)
    return model


def state_error(model, ref, opt, ref_opt):
    """The worst relative error (of the whole tensor) over every parameter, its v and momentum, and
    every BN statistic, with its name; asserts the supports and integer buffers are equal exactly."""
    errors = {}
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        errors[name] = rel(p, q)
        s, r = opt.state[p], ref_opt.state[q]
        for key in ("v", "momentum_buffer"):
            if key in r:
                errors[f"{name} {key}"] = rel(s[key], r[key])
        if "support" in r:
            assert torch.equal(s["support"], r["support"]), name
    for (name, b), (_, c) in zip(model.named_buffers(), ref.named_buffers()):
        if b.is_floating_point():
            errors[name] = rel(b, c)
        else:
            assert torch.equal(b, c), name
    worst = max(errors, key=errors.get)
    return errors[worst], worst


def assert_same_state(model, ref, opt, ref_opt, tol=TOL):
    err, name = state_error(model, ref, opt, ref_opt)
    assert err < tol, (name, err)


@pytest.mark.parametrize("reg,lam", [("l1", 0.05), ("group", 0.2)])
def test_same_trajectory_as_torch_layers(reg, lam):
    """Fine/coarse cycles (m = 3) with batches of 13 and 5 in coarse steps: weights, v, momentum,
    support and BN statistics equal torch layers."""
    sizes = [16, 13, 40, 16, 5, 16, 13, 8, 16, 33, 13, 16]
    ref, model = sparse_model(), sparse_model()
    ref_opt, ref_trace, _ = run_mllinbreg(ref, lambda m, o: TorchBackend(m), make_batches(sizes), reg=reg, lam=lam)
    opt, trace, backend = run_mllinbreg(
        model,
        lambda m, o: NativeBackend(m, batch_size=16, in_shape=(2, 16, 16), force=True, optimizer=o),
        make_batches(sizes),
        reg=reg,
        lam=lam,
    )
    assert [k for k, _ in trace] == [k for k, _ in ref_trace]
    assert sum(k == "sparse" for k, _ in trace) == 8 and backend.rebuilds == 4
    assert set(backend.swapped_layers()) == {"conv1", "conv2", "shortcut", "fc"}
    for (_, a), (_, b) in zip(trace, ref_trace):
        assert a == pytest.approx(b, rel=TOL, abs=1e-6)
    assert_same_state(model, ref, opt, ref_opt)


def test_resnet18_five_steps_equal_torch():
    """Five ML LinBreg steps (one fine, four coarse) of the CIFAR ResNet-18 with fused blocks: each
    step, started from torch's state before it, ends where torch's step ends (weights, v, momentum,
    BN statistics < 1e-5; supports equal). Step by step, because this sparse-initialized ResNet is
    chaotic in fp32: run on its own for 5 steps, torch fp32 ends 10% away from float64, and any change
    of summation order (torch on 1 vs 2 threads, native vs torch) grows from 1e-7 to 1e-4.

    The supports match exactly at every step; the tensors within 5e-2 (relative, whole tensor):
    with 2.9M batch-norm outputs per step (batch 19) feeding the ReLUs, a pre-activation within
    fp32 rounding of 0 can take the other side of the kink under a different summation order.
    That is torch's own noise: torch against torch on 2 threads with a channels_last input
    differs by up to 2.6e-3 per step on the same five steps (Intel Xeon, AVX-512), and even its
    supports differ; a kernel error (a wrong index, a lost term) is O(1). The exact agreement of
    the kernels is asserted on the small models above. Measured on a Zen 4 (torch's AVX-512
    kernels), 1 thread: step 3 flips one ReLU after layer4.1.bn1, channel 476 -- that channel's bias
    gradient is off by 1.8e-3 while its weight gradient (times x_hat ~ 0) is off by 2e-7 and every
    other channel by at most 1.1e-8 (a kink flip, not a kernel error; fp32 torch agrees with float64 there to
    3e-7); the whole bias momentum is then 1.05e-2 apart. On 2 threads it is step 5, channel 16 of
    layer2.1.bn1 (7e-4). On a Zen 3 no step flipped; on an Intel Xeon (AVX-512) three of the
    five steps did (1e-3 .. 7e-3), so the number of flips is not bounded here."""

    def build():
        torch.manual_seed(0)
        model = create_model("resnet18", 10, (3, 16, 16))
        sparse_init_(model, density=0.1, scheme="uniform", seed=0)
        return model

    batches = make_batches([19] * 5, shape=(3, 16, 16))
    ref, model = build(), build()
    ref_opt = MLLinBreg(split_param_groups(ref, "l1", 0.05), lr=0.01, lam=0.05, momentum=0.9, m=5)
    opt = MLLinBreg(split_param_groups(model, "l1", 0.05), lr=0.01, lam=0.05, momentum=0.9, m=5)
    backend = NativeBackend(model, batch_size=19, in_shape=(3, 16, 16), force=True, optimizer=opt)
    kinds, errors = [], []
    for x, y in batches:
        model.load_state_dict(ref.state_dict())
        opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
        kind = "full_grad" if ref_opt.next_step_is_fine() else "sparse"
        kinds.append(kind)
        for net, o, be in ((ref, ref_opt, TorchBackend(ref)), (model, opt, backend)):
            backend_step(net, o, be, x, y, kind)
            be.use_dense()
        backend.after_step("full_grad")  # the next step starts from torch's state: rebuild
        errors.append(state_error(model, ref, opt, ref_opt))
    assert all(err < 5e-2 for err, _ in errors), errors
    assert kinds == ["full_grad"] + ["sparse"] * 4
    assert len(backend.swapped_layers()) == 21 and len(backend.fusions) == 17 and backend.rebuilds == 4


def test_layout_stays_chwb_between_native_layers():
    """Inside a coarse step every conv of a ResNet block reads a CHWB input (no layout copies)."""
    torch.manual_seed(0)
    model = create_model("resnet18", 10, (3, 16, 16))
    sparse_init_(model, density=0.1, scheme="uniform", seed=0)
    backend = NativeBackend(model, batch_size=8, in_shape=(3, 16, 16), force=True)
    seen = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) and name != "conv1":
            mod.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, ops.is_chwb(a[0])))
    backend.before_step("sparse")
    model(torch.randn(8, 3, 16, 16)).sum().backward()
    assert seen and all(seen.values()), seen


def test_sequential_bn_relu_is_fused_and_exact(monkeypatch):
    """In an nn.Sequential, BatchNorm2d + ReLU(inplace) run as one fused op (no ReLU module is called); outputs,
    gradients and BN statistics equal the plain model (the conv net of the digits runs)."""
    torch.manual_seed(0)
    model = create_model("convnet", 10, (2, 12, 12))
    sparse_init_(model, density=0.3, scheme="uniform", seed=0)
    ref = copy.deepcopy(model)
    backend = NativeBackend(model, batch_size=13, in_shape=(2, 12, 12), force=True)
    assert [(f.bn, f.pattern) for f in backend.fusions] == [(f"features.{i}", "conv -> bn -> relu") for i in (1, 4, 8)]
    calls = []
    relu_forward = nn.ReLU.forward
    monkeypatch.setattr(nn.ReLU, "forward", lambda self, x: calls.append(1) or relu_forward(self, x))
    x = torch.randn(13, 2, 12, 12)
    backend.before_step("sparse")
    calls.clear()  # the rebuild's shape-finding forward ran them
    out = model(x)
    assert not calls  # every ReLU ran inside the fused BatchNorm
    out.square().sum().backward()
    backend.after_backward()
    want = ref(x)
    want.square().sum().backward()
    assert rel(out, want) < TOL
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        mask = p != 0 if p.dim() > 1 else torch.ones_like(p, dtype=torch.bool)  # swapped: gradient on S only
        assert rel(p.grad[mask], q.grad[mask]) < TOL, name
    for (name, b), (_, c) in zip(model.named_buffers(), ref.named_buffers()):
        assert rel(b, c) < TOL if b.is_floating_point() else torch.equal(b, c), name
    backend.use_dense()
    assert "forward" not in model.__dict__


def test_guards_unsupported_layers_stay_dense():
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=2, padding=1),
        nn.Conv2d(4, 4, 3, dilation=2, padding=2),
        nn.Conv2d(4, 4, (1, 3), padding=(0, 1)),
        nn.Conv2d(4, 4, 3, stride=(1, 2), padding=1),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 4, 3, padding="same"),
        nn.Conv2d(4, 4, 3, padding=1),
    )
    backend = NativeBackend(model, batch_size=8, in_shape=(4, 12, 12), force=True)
    backend.before_step("sparse")
    why = {row["layer"]: (row["choice"], row["why"]) for row in backend.summary()}
    assert why["0"] == ("dense", "groups=2") and why["1"] == ("dense", "dilation=(2, 2)")
    assert why["2"][1] == "non-square kernel 1x3" and why["3"][1].startswith("stride=(1, 2)")
    assert why["4"][1] == "padding_mode='reflect'" and why["5"][1].startswith("padding='same'")
    assert why["6"] == ("native", "forced")
    x = torch.randn(8, 4, 12, 12)
    with torch.no_grad():
        got = model(x)
        backend.use_dense()
        assert torch.allclose(got, model(x), rtol=1e-5, atol=1e-5)
    double = nn.Sequential(nn.Conv2d(2, 2, 3)).double()
    b2 = NativeBackend(double, batch_size=4, in_shape=(2, 6, 6), force=True)
    b2.before_step("sparse")
    assert "fp32 CPU only" in b2.summary()[0]["why"]


def test_under_autocast_the_activations_are_bf16_and_the_arithmetic_fp32():
    """A coarse step under bf16 autocast (precision=bf16) runs the swapped layers and BatchNorm natively
    with their activations stored in bf16 (CHWB) and the arithmetic in fp32 on the fp32 master weights:
    the output is within bf16 rounding of the plain fp32 model and closer to it than the dense model
    under autocast (whose convolutions also round the weights); the value gradients reach the dense
    weights, zero outside the support, as far from fp32 as the dense bf16 model's."""
    model, ref, ref16 = sparse_model(), sparse_model(), sparse_model()
    backend = NativeBackend(model, batch_size=8, in_shape=(2, 16, 16), force=True, precision="bf16")
    backend.before_step("sparse")
    assert set(backend.swapped_layers()) == {"conv1", "conv2", "shortcut", "fc"}
    seen = {}
    hooks = [
        mod.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, o))
        for name, mod in model.named_modules()
        if name in ("conv1", "bn1", "conv2")
    ]
    x = torch.randn(8, 2, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        dense_bf16 = ref16(x).float()
    for h in hooks:
        h.remove()
    want = ref(x)
    for name in ("conv1", "bn1", "conv2"):
        assert seen[name].dtype == torch.bfloat16 and ops.is_chwb(seen[name]), name
    assert rel(out, want) < 2e-2
    assert rel(out, want) < rel(dense_bf16, want)
    cot = torch.randn(want.shape)  # a random cotangent (a plain sum cancels inside the BatchNorms)
    out.float().backward(cot)
    want.backward(cot)
    dense_bf16.backward(cot)
    backend.after_backward()
    for (name, p), (_, q), (_, q16) in zip(model.named_parameters(), ref.named_parameters(), ref16.named_parameters()):
        # a swapped weight's gradient lives on its support (the coarse step's S), zero elsewhere
        on = (p != 0) if name.endswith("weight") and p.dim() > 1 else torch.ones_like(p, dtype=torch.bool)
        assert p.grad.dtype == torch.float32 and not p.grad[~on].any(), name
        # bf16 activations through two BatchNorms: a few % from fp32, the size of dense bf16's own error
        # (bn1.weight: 13.7% here against dense bf16's 12.1%). A conv feeding a BatchNorm has a weight
        # gradient orthogonal to its weight (scale invariance): on the support it nearly cancels (the
        # shortcut's: 1e-6 of its dense gradient), so errors are taken relative to 1% of the dense one.
        scale = max(float((q.grad * on).norm()), 1e-2 * float(q.grad.norm()))
        err, err16 = (float((g * on - q.grad * on).norm()) / scale for g in (p.grad, q16.grad))
        assert err <= max(0.08, 1.5 * err16), (name, err, err16)
    backend.use_dense()


def bf16_conv_errors(ext, stride, k, pad, batch, gen):
    """Relative errors (output, input gradient, weight gradient) of the sparse conv with bf16 activations
    against float64 autograd on the same bf16-rounded input and output gradient."""
    mask = torch.rand(12, 9, k, k, generator=gen) < 0.4
    w = torch.randn(12, 9, k, k, generator=gen) * mask
    st = ops.build_structure(ext, mask, stride, pad)
    x16 = ops.from_chwb(torch.randn(9, 11, 10, batch, generator=gen).to(torch.bfloat16)).requires_grad_(True)
    w_val = w.reshape(-1)[st.idx].clone().requires_grad_(True)
    out = ops.sparse_conv2d(x16, w_val, st, True)
    assert out.dtype == torch.bfloat16 and ops.is_chwb(out)
    g16 = ops.from_chwb(torch.randn(out.permute(1, 2, 3, 0).shape, generator=gen).to(torch.bfloat16))
    out.backward(g16)
    assert x16.grad.dtype == torch.bfloat16 and w_val.grad.dtype == torch.float32
    xr = x16.detach().double().requires_grad_(True)
    wr = w.double().requires_grad_(True)
    ref = F.conv2d(xr, wr, stride=stride, padding=pad)
    ref.backward(g16.double())
    return rel(out, ref), rel(x16.grad, xr.grad), rel(w_val.grad, wr.grad.reshape(-1)[st.idx])


@pytest.mark.parametrize("stride,k,pad,batch", [(1, 3, 1, 37), (2, 3, 1, 40), (2, 1, 0, 33), (1, 1, 0, 16)])
def test_bf16_conv_matches_float64_on_the_rounded_inputs(stride, k, pad, batch):
    """bf16 activations: forward, input gradient and weight gradient against float64 autograd on the same
    bf16-rounded input and output gradient; the only error left is the rounding of the bf16 results
    (relative error of the whole tensor < 5e-3; the weight gradient, fp32, < 1e-5)."""
    out_err, in_err, w_err = bf16_conv_errors(EXT, stride, k, pad, batch, torch.Generator().manual_seed(11))
    assert out_err < 5e-3 and in_err < 5e-3 and w_err < 1e-5


def test_bf16_batchnorm_matches_float64_on_the_rounded_inputs():
    """Fused BatchNorm + residual + ReLU with bf16 activations: output, input and residual gradients within
    bf16 rounding of float64 torch on the same rounded inputs; the statistics and affine gradients in fp32."""
    gen = torch.Generator().manual_seed(12)
    x = ops.from_chwb(torch.randn(6, 5, 4, 24, generator=gen).to(torch.bfloat16)).requires_grad_(True)
    r = ops.from_chwb(torch.randn(6, 5, 4, 24, generator=gen).to(torch.bfloat16)).requires_grad_(True)
    bn, ref_bn = nn.BatchNorm2d(6), nn.BatchNorm2d(6).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        ref_bn.load_state_dict(bn.state_dict())
    out = ops.batch_norm(bn, x, EXT, res=r, relu=True)
    assert out.dtype == torch.bfloat16
    xr, rr = x.detach().double().requires_grad_(True), r.detach().double().requires_grad_(True)
    ref = torch.relu(ref_bn(xr) + rr)
    g = torch.randn(out.shape, generator=gen).to(torch.bfloat16)
    out.backward(g)
    ref.backward(g.double())
    assert rel(out, ref) < 5e-3 and rel(x.grad, xr.grad) < 1e-2 and rel(r.grad, rr.grad) < 5e-3
    assert rel(bn.weight.grad, ref_bn.weight.grad) < 1e-4 and rel(bn.running_var, ref_bn.running_var) < 1e-5


def test_bf16_five_steps_close_to_torch_bf16():
    """precision=bf16: five ML LinBreg steps (one fine, four coarse; batches of 16 and a tail of 13) with
    the native backend stay within bf16 rounding of torch layers under the same autocast: the weights are
    less than half as far from torch bf16 as torch bf16 is from the fp32 run (5.5e-2 against 0.145 for
    conv2, its conv -> BN -> add -> ReLU fused; 4.7e-2 unfused), losses within 2e-2. Both differ from the fp32
    run by about 15% after five steps (the fine step is bf16 in both, and this small sparse net amplifies
    rounding), so no finer claim holds."""
    batches = make_batches([16, 16, 13, 16, 16])
    runs = {}
    for name, precision, native in (("fp32", "fp32", False), ("torch bf16", "bf16", False), ("native bf16", "bf16", True)):
        model = sparse_model()

        def make(m, o, native=native):
            if native:
                return NativeBackend(m, batch_size=16, in_shape=(2, 16, 16), force=True, optimizer=o, precision="bf16")
            return TorchBackend(m)

        opt, trace, backend = run_mllinbreg(model, make, batches, m=5, precision=precision)
        assert [k for k, _ in trace] == ["full_grad"] + ["sparse"] * 4
        runs[name] = (model, trace, backend)
    assert len(runs["native bf16"][2].swapped_layers()) == 4

    def worst(a, b):
        return max(rel(p, q) for p, q in zip(runs[a][0].parameters(), runs[b][0].parameters()))

    assert worst("native bf16", "torch bf16") < 0.5 * worst("torch bf16", "fp32"), worst("native bf16", "torch bf16")
    losses = {name: [loss for _, loss in run[1]] for name, run in runs.items()}
    assert losses["native bf16"] == pytest.approx(losses["torch bf16"], rel=2e-2)


@pytest.mark.parametrize("min_speedup, native", [(0.0, True), (1e9, False)], ids=["native-wins", "dense-wins"])
def test_timed_choice_and_summary(min_speedup, native):
    """Without `force`, every layer is timed and chosen by `min_speedup` (0: the native layer always
    wins, 1e9: dense always wins, so the outcome does not depend on the machine's timings), its
    neighbours' conversions included; the summary says which and why."""
    model = sparse_model(density=0.05)
    backend = NativeBackend(
        model, batch_size=16, in_shape=(2, 16, 16), repeats=1, warmup=1, min_speedup=min_speedup, choice_store=None
    )
    backend.before_step("sparse")
    rows = backend.summary()
    choices = [(row["layer"], row["choice"], row["why"]) for row in rows]
    assert all("dense_ms" in row and "native_ms" in row for row in rows)
    if native:
        assert all(row["choice"] == "native" and "faster than dense" in row["why"] for row in rows), choices
        assert backend.swapped_layers() == [row["layer"] for row in rows]
    else:
        assert all(row["choice"] == "dense" and row["why"].startswith("dense is faster") for row in rows), choices
        assert backend.swapped_layers() == []
    assert all(row["decided_by"] == "timed in this run (no machine record)" for row in rows)
    assert backend.timing_seconds > 0 and len(backend.decisions) == len(rows)


def test_timed_choices_survive_a_checkpoint():
    """state_dict / load_state_dict carry the timed choices: a resumed run chooses the same layers
    without timing again (so it computes what the interrupted run would have)."""
    model = sparse_model(density=0.05)
    first = NativeBackend(model, batch_size=16, in_shape=(2, 16, 16), repeats=1, warmup=0, choice_store=None)
    first.before_step("sparse")
    first.use_dense()
    state = first.state_dict()
    again = NativeBackend(model, batch_size=16, in_shape=(2, 16, 16), repeats=1, warmup=0, choice_store=None)
    again.load_state_dict(state)
    again.before_step("sparse")
    assert again.timing_seconds == 0 and again.swapped_layers() == first.swapped_layers()
    assert [r["why"] for r in again.summary()] == [r["why"] for r in first.summary()]
    assert {r["decided_by"] for r in again.summary()} == {"restored from the run's checkpoint"}
    again.use_dense()
    other = NativeBackend(model, batch_size=16, in_shape=(2, 16, 16), choice_store=None)
    other.load_state_dict(dict(state, backend="sparseprop"))  # another backend's choices: ignored
    assert other.decisions == {}
    other.load_state_dict(dict(state, format=1))  # the older format (keyed by layer name): ignored
    assert other.decisions == {}


def test_make_backend_native_and_auto():
    model = sparse_model()
    assert isinstance(
        make_backend("native", model, torch.device("cpu"), "mllinbreg", batch_size=8, in_shape=(2, 16, 16)), NativeBackend
    )
    assert make_backend("auto", model, torch.device("cpu"), "mllinbreg", batch_size=8, in_shape=(2, 16, 16)).name == "native"
    assert isinstance(make_backend("auto", model, torch.device("cpu"), "sgd"), TorchBackend)


def test_unavailable_compiler_falls_back_with_one_line(monkeypatch, capsys):
    import mlbreg.backends as backends

    def broken():
        raise native_build.NativeUnavailable("no compiler")

    monkeypatch.setattr(native_build, "load", broken)
    be = backends.make_backend("auto", sparse_model(), torch.device("cpu"), "mllinbreg", batch_size=8, in_shape=(2, 16, 16))
    assert be.name in ("sparseprop", "torch")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "native kernels unavailable (no compiler)" in err
    with pytest.raises(RuntimeError, match="backend=native"):
        backends.make_backend("native", sparse_model(), torch.device("cpu"), "mllinbreg")


class Forced(NativeBackend):
    """Every eligible layer native (a timed choice could differ between two runs)."""

    instances = []

    def __init__(self, model, **options):
        super().__init__(model, force=True, **options)
        Forced.instances.append(self)


def test_train_convnet_same_as_torch_backend(tmp_path, monkeypatch):
    """A whole run through train(): backend=native equals backend=torch (last batch 29 samples)."""
    import mlbreg.backends.native.backend as native_backend
    from mlbreg.train import train

    monkeypatch.setattr(native_backend, "NativeBackend", Forced)
    common = ["model=convnet", "device=cpu", "epochs=2", "m=5", "init.density=0.2", "lam=0.01", "lr=0.05", "checkpoint_every=0"]
    results = {}
    for name in ("torch", "native"):
        outcome = train(make_cfg(f"backend={name}", *common), tmp_path / name)
        assert outcome["status"] == "finished"
        results[name] = (pd.read_csv(tmp_path / name / "metrics.csv"), torch.load(tmp_path / name / "model.pt"))
    (ref, ref_model), (got, got_model) = results["torch"], results["native"]
    assert Forced.instances[-1].rebuilds >= 4 and len(Forced.instances[-1].swapped_layers()) >= 3
    for col in ("train_loss", "test_loss", "sparsity_pct"):
        assert got[col].tolist() == pytest.approx(ref[col].tolist(), rel=1e-4, abs=1e-5), col
    for col in ("train_acc_pct", "test_acc_pct"):
        assert got[col].tolist() == pytest.approx(ref[col].tolist(), abs=100 / 360 + 1e-9), col
    for key in ref_model:
        torch.testing.assert_close(got_model[key], ref_model[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("precision,epochs,kill_at", [("fp32", 3, 33), ("bf16", 2, 28)])
def test_resume_is_bit_identical(tmp_path, monkeypatch, precision, epochs, kill_at):
    """A run stopped by SIGTERM inside a coarse cycle (a coarse step of epoch 2; 23 steps per epoch) and
    resumed equals the uninterrupted run bit for bit (metrics, layers, weights); with precision=bf16 too
    (fine steps under bf16 autocast and channels_last, coarse steps on the native kernels, bf16
    activations)."""

    from test_resume import assert_same_results

    import mlbreg.backends.native.backend as native_backend
    from mlbreg.flops import FlopsAccount
    from mlbreg.train import train

    monkeypatch.setattr(native_backend, "NativeBackend", Forced)
    overrides = [
        "model=convnet",
        f"epochs={epochs}",
        "batch_size=64",
        "m=5",
        "backend=native",
        "device=cpu",
        f"precision={precision}",
    ]
    ref = train(make_cfg(*overrides), tmp_path / "ref")
    original = signal_at_step(monkeypatch, kill_at)
    out = train(make_cfg(*overrides), tmp_path / "run")
    assert out["status"] == "interrupted" and out["step"] == kill_at
    monkeypatch.setattr(FlopsAccount, "add_step", original)
    out = train(make_cfg(*overrides), tmp_path / "run")
    assert out["status"] == "finished" and ref["status"] == "finished"
    assert_same_results(tmp_path / "ref", tmp_path / "run")


def test_portable_fallback_paths_are_exact():
    """The plain C++ path (what a CPU without AVX2 gets) and, where the CPU has AVX-512, the AVX2
    path: built and checked against float64 torch like the default one, with fp32 and bf16 activations."""
    paths = {"plain": native_build._load("plain")}
    if EXT.simd_path() == "avx512":
        paths["avx2"] = native_build._load("avx2")
    gen = torch.Generator().manual_seed(5)
    for name, ext in paths.items():
        assert ext.simd_path() == name
        for stride, k, pad, batch in ((1, 3, 1, 70), (2, 3, 1, 64), (2, 1, 0, 35), (1, 5, 2, 33)):
            w = torch.randn(7, 6, k, k, generator=gen) * (torch.rand(7, 6, k, k, generator=gen) < 0.3)
            x = torch.randn(batch, 6, 9, 8, generator=gen, dtype=torch.float64)
            assert ops.max_conv_error(ext, x, w, stride, pad) < TOL, (name, stride, k)
            out_err, in_err, w_err = bf16_conv_errors(ext, stride, k, pad, batch, gen)  # bf16 activations
            assert out_err < 5e-3 and in_err < 5e-3 and w_err < 1e-5, (name, "bf16", stride, k)
        assert ops.max_bn_error(ext, gen) < TOL, name


def test_cache_location_and_isa_choice(monkeypatch, tmp_path):
    """The cache follows $MLBREG_CACHE, else $XDG_CACHE_HOME/mlbreg; a bad MLBREG_NATIVE_ISA names the
    valid ones (as NativeUnavailable: backend=auto falls back, backend=native reports it)."""
    assert EXT.simd_path() in ("avx512", "avx2", "plain")
    monkeypatch.setenv("MLBREG_CACHE", str(tmp_path / "c"))
    assert native_build.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MLBREG_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert native_build.cache_dir() == tmp_path / "x" / "mlbreg"
    monkeypatch.setenv("MLBREG_NATIVE_ISA", "sse9")
    with pytest.raises(native_build.NativeUnavailable, match="'sse9' is not one of auto, avx2, plain"):
        native_build.load()


def test_no_compiler_gives_one_line_and_trains(tmp_path):
    """A real failed build (the C++ compiler is /bin/false, empty cache): `mlbreg train` with
    backend=auto says so in one line and trains with the fallback; backend=native is a config error."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, CXX="/bin/false", MLBREG_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "mlbreg", "train", "epochs=1", "progress=false", "device=cpu"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    notes = [line for line in run.stderr.splitlines() if "native kernels unavailable" in line]
    assert len(notes) == 1 and "backend=auto uses" in notes[0], run.stderr
    assert "Traceback" not in run.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "mlbreg", "train", "epochs=1", "progress=false", "device=cpu", "backend=native"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "backend='native'" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert "could not build the native kernels" in bad.stderr
