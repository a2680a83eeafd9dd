"""Invariants and hand-worked cases of LinBreg / ML LinBreg (docs/algorithms.md §1-§3)."""

import copy
import math

import pytest
import torch
from torch import nn

from mlbreg.optim import LinBreg, MLLinBreg
from mlbreg.optim.regularizers import group_shrink_, prox_, subgradient, support


def tiny_net(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).to(dtype)
    with torch.no_grad():  # a sparse start, as mlbreg initializes
        for mod in (net[0], net[3]):
            mod.weight.mul_((torch.rand_like(mod.weight) < 0.4).to(dtype))
            mod.weight[:2] = 0  # whole zero kernels / rows, so the group support is a strict subset
    return net


def batches(n, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 2, 5, 5, generator=g, dtype=dtype), torch.randint(0, 3, (6,), generator=g)) for _ in range(n)]


def split_groups(net, **reg):
    weights = [net[0].weight, net[3].weight]
    others = [net[0].bias, net[3].bias]
    return [dict(params=weights, **reg), dict(params=others, reg="none")]


def run(net, opt, data):
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


@pytest.mark.parametrize("momentum,dampening,wd", [(0.0, 0.0, 0.0), (0.9, 0.0, 0.0), (0.9, 0.9, 0.0), (0.5, 0.1, 5e-4)])
@pytest.mark.parametrize("foreach", [False, True])
def test_linbreg_lam0_delta1_equals_sgd(momentum, dampening, wd, foreach):
    net_a, net_b = tiny_net(), tiny_net()
    sgd = torch.optim.SGD(net_a.parameters(), lr=0.1, momentum=momentum, dampening=dampening, weight_decay=wd)
    lb = LinBreg(
        net_b.parameters(),
        lr=0.1,
        lam=0.0,
        delta=1.0,
        reg="l1",
        momentum=momentum,
        dampening=dampening,
        weight_decay=wd,
        foreach=foreach,
    )
    for x, y in batches(8):
        for net, opt in ((net_a, sgd), (net_b, lb)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        for pa, pb in zip(net_a.parameters(), net_b.parameters()):
            assert torch.equal(pa, pb)


@pytest.mark.parametrize("reg", ["l1", "group", "l1_group"])
@pytest.mark.parametrize("delta", [1.0, 0.3, 2.0])
def test_prox_of_initial_dual_gives_initial_weights(reg, delta):
    torch.manual_seed(0)
    for shape in [(5, 3, 3, 3), (7, 11)]:
        theta = torch.randn(shape, dtype=torch.float64)
        theta[0] = 0  # a zero group must stay zero
        theta[1].view(-1)[::2] = 0
        v0 = theta / delta + subgradient(theta, reg, lam=0.7)
        out = torch.empty_like(theta)
        prox_(out, v0, reg, lam=0.7, delta=delta)
        torch.testing.assert_close(out, theta, rtol=1e-12, atol=1e-12)


def test_l1_prox_hand_case():
    v = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.5])
    out = torch.empty_like(v)
    prox_(out, v, "l1", lam=1.0, delta=2.0)  # δ·shrink(v, λ)
    assert out.tolist() == [-4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0]


def test_group_prox_zeroes_whole_kernels_hand_case():
    # two 2x2 kernels: norms 2·√... kernel A = all 1 (‖A‖ = 2), kernel B = all 0.25 (‖B‖ = 0.5)
    v = torch.stack([torch.ones(2, 2), torch.full((2, 2), 0.25)]).view(1, 2, 2, 2)
    out = torch.empty_like(v)
    prox_(out, v, "group", lam=0.25, delta=1.0)  # threshold λ√n = 0.25·2 = 0.5
    torch.testing.assert_close(out[0, 0], torch.full((2, 2), 0.75))  # factor 1 − 0.5/2
    assert torch.count_nonzero(out[0, 1]) == 0  # factor max(1 − 0.5/0.5, 0) = 0: the whole kernel
    rows = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # linear: rows are groups, n = 2
    group_shrink_(rows, 1 / math.sqrt(2))  # threshold 1: row norms 5 and 0.5
    torch.testing.assert_close(rows, torch.tensor([[2.4, 3.2], [0.0, 0.0]]))


def test_linbreg_hand_worked_steps():
    """Two steps on f(θ) = ½‖θ − c‖² worked by hand (λ = 1, δ = 2, no momentum)."""
    theta = nn.Parameter(torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64))
    c = torch.tensor([4.0, 1.0, -2.0], dtype=torch.float64)
    opt = LinBreg([theta], lr=0.5, lam=1.0, delta=2.0, reg="l1")
    # v0 = θ/δ + sign θ = [0, 1.5, -2]
    theta.grad = theta.detach() - c  # g = [-4, 0, 0]
    opt.step()  # v = [2, 1.5, -2], θ = 2·shrink(v,1) = [2, 1, -2]
    assert theta.tolist() == [2.0, 1.0, -2.0]
    theta.grad = theta.detach() - c  # g = [-2, 0, 0]
    opt.step()  # v = [3, 1.5, -2] -> θ = [4, 1, -2]
    assert theta.tolist() == [4.0, 1.0, -2.0]
    torch.testing.assert_close(opt.state[theta]["v"], torch.tensor([3.0, 1.5, -2.0], dtype=torch.float64))


@pytest.mark.parametrize("reg", ["l1", "group", "l1_group"])
@pytest.mark.parametrize("momentum,dampening", [(0.0, 0.0), (0.9, 0.9), (0.9, 0.0)])
def test_foreach_and_loop_agree(reg, momentum, dampening):
    nets = [tiny_net(), tiny_net()]
    opts = [
        MLLinBreg(
            split_groups(net, reg=reg), lr=0.1, lam=0.05, delta=1.5, momentum=momentum, dampening=dampening, m=3, foreach=fe
        )
        for net, fe in zip(nets, (False, True))
    ]
    data = batches(9)
    for net, opt in zip(nets, opts):
        run(net, opt, data)
    for pa, pb in zip(*(n.parameters() for n in nets)):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reg", ["l1", "group"])
def test_mllinbreg_m1_equals_linbreg(reg):
    nets = [tiny_net(), tiny_net()]
    a = LinBreg(split_groups(nets[0], reg=reg), lr=0.1, lam=0.02, momentum=0.9, dampening=0.9)
    b = MLLinBreg(split_groups(nets[1], reg=reg), lr=0.1, lam=0.02, momentum=0.9, dampening=0.9, m=1)
    data = batches(10)
    run(nets[0], a, data)
    run(nets[1], b, data)
    for pa, pb in zip(*(n.parameters() for n in nets)):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("reg", ["l1", "group", "l1_group"])
@pytest.mark.parametrize("foreach", [False, True, "compiled"])
def test_coarse_steps_never_touch_state_outside_support(reg, foreach):
    net = tiny_net()
    path = dict(foreach=True, compiled=True) if foreach == "compiled" else dict(foreach=foreach)
    opt = MLLinBreg(split_groups(net, reg=reg), lr=0.5, lam=0.1, momentum=0.9, m=5, **path)
    weights = [net[0].weight, net[3].weight]
    data = batches(15)
    saw_coarse = 0
    for k, (x, y) in enumerate(data):
        fine = opt.next_step_is_fine()
        assert fine == (k % 5 == 0)
        before = [(w.detach().clone(), opt.state[w].get("v", None), opt.state[w].get("momentum_buffer")) for w in weights]
        before = [(w, None if v is None else v.clone(), None if b is None else b.clone()) for w, v, b in before]
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        if fine:
            # the support is fixed right after the fine step: the non-zeros (whole kernels for group)
            for w in weights:
                torch.testing.assert_close(opt.state[w]["support"], support(w.detach(), reg))
            continue
        saw_coarse += 1
        for w, (w0, v0, b0) in zip(weights, before):
            outside = opt.state[w]["support"] == 0
            assert outside.any()
            assert torch.all(w[outside] == 0) and torch.equal(w0[outside], w.detach()[outside])
            assert torch.equal(opt.state[w]["v"][outside], v0[outside])
            assert torch.equal(opt.state[w]["momentum_buffer"][outside], b0[outside])
            inside = ~outside
            assert not torch.equal(opt.state[w]["v"][inside], v0[inside])  # the coarse step did move S
    assert saw_coarse == 12


def test_coarse_step_on_support_is_linbreg_step_hand_case():
    theta = nn.Parameter(torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64))
    opt = MLLinBreg([theta], lr=1.0, lam=0.5, reg="l1", m=2)
    theta.grad = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
    opt.step()  # fine: v0 = θ + 0.5·sign θ = [1.5, 0, -1.5]; θ unchanged; S = {0, 2}
    assert opt.state[theta]["support"].tolist() == [1.0, 0.0, 1.0]
    theta.grad = torch.tensor([-1.0, -5.0, 2.0], dtype=torch.float64)
    opt.step()  # coarse: v_S = [2.5, ·, -3.5]; v outside S stays 0 although g = -5 there
    assert opt.state[theta]["v"].tolist() == [2.5, 0.0, -3.5]
    assert theta.tolist() == [2.0, 0.0, -3.0]
    theta.grad = torch.tensor([0.0, -5.0, 0.0], dtype=torch.float64)
    opt.step()  # fine again: the full gradient now reaches entry 1: v = [2.5, 5, -3.5]
    assert theta.tolist() == [2.0, 4.5, -3.0]


@pytest.mark.parametrize("criterion", ["fixed", "adaptive"])
def test_state_dict_round_trip_then_lockstep(criterion):
    nets = [tiny_net(), None]
    kw = dict(lr=0.1, lam=0.02, momentum=0.9, m=4, criterion=criterion, kappa=0.3, eps=1e-3)
    opt = MLLinBreg(split_groups(nets[0], reg="l1"), **kw)
    data = batches(16)
    run(nets[0], opt, data[:6])  # stop in the middle of a cycle
    nets[1] = copy.deepcopy(nets[0])
    opt2 = MLLinBreg(split_groups(nets[1], reg="l1"), **kw)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.steps_taken == 6 and opt2.next_step_is_fine() == opt.next_step_is_fine()
    run(nets[0], opt, data[6:])
    run(nets[1], opt2, data[6:])
    assert opt2.coarse_cycles_started == opt.coarse_cycles_started >= 2
    for pa, pb in zip(*(n.parameters() for n in nets)):
        assert torch.equal(pa, pb)


def test_adaptive_criterion_with_a_tensor_that_lost_its_gradient():
    net = tiny_net()
    opt = MLLinBreg(split_groups(net, reg="l1"), lr=0.1, lam=0.02, m=2, criterion="adaptive", kappa=0.0)
    run(net, opt, batches(2))  # cycle 0 starts coarse: θ_last of every tensor
    net[3].bias.requires_grad_(False)  # e.g. a layer frozen from now on
    net[3].bias.grad = None
    run(net, opt, batches(2, seed=5))  # cycle 1: compares the tensors with gradients
    assert opt.coarse_cycles_started == 2


def test_closure_and_param_groups_like_sgd():
    net = tiny_net()
    opt = LinBreg(split_groups(net, reg="l1", lam=0.1), lr=0.1)
    assert opt.param_groups[0]["lam"] == 0.1 and opt.param_groups[1]["reg"] == "none"
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss)
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_adaptive_criterion_skips_coarse_cycle_when_support_misses_gradient():
    theta = nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    opt = MLLinBreg([theta], lr=0.01, lam=10.0, reg="l1", m=3, criterion="adaptive", kappa=0.45)
    # the gradient lies almost entirely outside the support {0}: ‖Rg‖ = 0.1 < 0.45·‖g‖
    theta.grad = torch.tensor([0.1, 1.0, 1.0, 1.0], dtype=torch.float64)
    opt.step()
    assert not opt.coarse_cycle and opt.next_step_is_fine()
    opt.step()
    opt.step()  # steps 1, 2 are fine as well (each tests again, and fails again)
    theta.grad = torch.tensor([1.0, 0.01, 0.0, 0.0], dtype=torch.float64)
    opt.step()  # step 3: gradient on the support -> coarse cycle
    assert opt.coarse_cycle and not opt.next_step_is_fine()


def test_adaptive_criterion_restricts_with_the_support_before_the_fine_step():
    """Eq. 10 at θ_k: R_k is the support of θ_k, not of the iterate the fine step makes. Here the
    fine step makes every entry non-zero (λ = 0), so restricting afterwards would always pass."""
    theta = nn.Parameter(torch.tensor([1.0, 0.0], dtype=torch.float64))
    opt = MLLinBreg([theta], lr=0.01, lam=0.0, reg="l1", m=4, criterion="adaptive", kappa=0.45)
    theta.grad = torch.tensor([0.1, 1.0], dtype=torch.float64)  # ‖R_0 g‖ = 0.1 < 0.45 · 1.005
    opt.step()
    assert theta.detach().ne(0).all()  # the support after the step is everything
    assert not opt.coarse_cycle and opt.next_step_is_fine()


def test_adaptive_criterion_tests_again_at_the_next_step_after_a_failure():
    """Eq. 10 decides at every iteration: a failed test makes the next step fine, which tests again
    (not m − 1 untested fine steps); the cycle that starts there has m − 1 coarse steps."""
    theta = nn.Parameter(torch.tensor([1.0, 0.0], dtype=torch.float64))
    opt = MLLinBreg([theta], lr=0.01, lam=0.0, reg="l1", m=4, criterion="adaptive", kappa=0.45)
    kinds = []
    for k in range(6):
        kinds.append("fine" if opt.next_step_is_fine() else "coarse")
        # step 0: the gradient is off the support (fails); from step 1 on θ is dense (passes)
        theta.grad = torch.tensor([0.1, 1.0] if k == 0 else [1.0, 1.0], dtype=torch.float64)
        opt.step()
    assert kinds == ["fine", "fine", "coarse", "coarse", "coarse", "fine"]
    assert opt.coarse_cycles_started == 2 and opt.cycle_start == 5


@pytest.mark.parametrize("eps,second_cycle", [(0.0, True), (0.0128, True), (0.0130, False)])
def test_adaptive_criterion_needs_theta_to_move_since_the_last_coarse_cycle(eps, second_cycle):
    # on the support the gradient is all there is (κ test passes); θ moves by lr·g per step
    theta = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = MLLinBreg([theta], lr=0.01, lam=0.0, reg="l1", m=2, criterion="adaptive", kappa=0.45, eps=eps)
    theta.grad = torch.tensor([1.0, 1.0], dtype=torch.float64)
    opt.step()  # step 0: tested at θ_0, no θ_last yet: coarse, θ_last = θ_0 = [1, 2]
    assert opt.coarse_cycle and opt.coarse_cycles_started == 1
    opt.step()  # step 1 (coarse): θ = [0.98, 1.98]
    opt.step()  # step 2, tested at θ_2 = [0.98, 1.98]: ‖θ − θ_last‖ = 0.02·√2, ‖θ‖ ≈ 2.2093
    # ratio 0.028284 / 2.209299 = 0.012802: a cycle starts for ε up to that, not beyond
    assert opt.coarse_cycle == second_cycle and opt.coarse_cycles_started == 1 + second_cycle


@pytest.mark.parametrize("bad", [dict(lam=-1.0), dict(m=0), dict(reg="l2"), dict(criterion="sometimes"), dict(delta=0.0)])
def test_bad_arguments_name_the_value(bad):
    with pytest.raises(ValueError) as err:
        MLLinBreg([nn.Parameter(torch.zeros(2))], lr=0.1, **bad)
    assert str(list(bad.values())[0]) in str(err.value)


# -- the torch.compile'd update (compiled=True): the same math, fused ----------------------
def _lockstep(opts, nets, data, lr_of_step):
    """Train several (optimizer, net) pairs on the same batches, changing lr every step."""
    for k, (x, y) in enumerate(data):
        for net, opt in zip(nets, opts):
            for group in opt.param_groups:
                group["lr"] = lr_of_step(k)
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()


# CUDA runs these too where it exists (Triton kernels instead of C++)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reg", ["l1", "group", "l1_group"])
@pytest.mark.parametrize("momentum,dampening,wd,delta", [(0.9, 0.0, 0.0, 1.0), (0.0, 0.0, 5e-4, 2.0), (0.5, 0.1, 0.0, 0.5)])
def test_compiled_update_equals_eager_without_recompiling(reg, momentum, dampening, wd, delta, device):
    from torch._dynamo.utils import counters

    nets = [tiny_net(torch.float32).to(device), tiny_net(torch.float32).to(device)]
    opts = [
        MLLinBreg(
            split_groups(net, reg=reg),
            lr=0.2,
            lam=0.05,
            delta=delta,
            momentum=momentum,
            dampening=dampening,
            weight_decay=wd,
            m=4,
            foreach=True,
            compiled=c,
        )
        for net, c in zip(nets, (False, True))
    ]
    graphs_before = counters["stats"]["unique_graphs"]
    data = [(x.to(device), y.to(device)) for x, y in batches(13, torch.float32)]
    _lockstep(opts, nets, data, lambda k: 0.2 * (1 - k / 13))
    graphs = counters["stats"]["unique_graphs"] - graphs_before
    # variants: regularized fine (the support written in place), regularized coarse,
    # unregularized; a new lr every step must not add graphs
    assert 1 <= graphs <= 3
    for pa, pb in zip(*(n.parameters() for n in nets)):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)
    for wa, wb in zip(opts[0].param_groups[0]["params"], opts[1].param_groups[0]["params"]):
        for key in ("v", "momentum_buffer", "support"):
            if key in opts[0].state[wa]:
                torch.testing.assert_close(opts[1].state[wb][key], opts[0].state[wa][key], rtol=1e-5, atol=1e-6)


def test_compiled_linbreg_lam0_delta1_follows_sgd():
    net_a, net_b = tiny_net(torch.float32), tiny_net(torch.float32)
    sgd = torch.optim.SGD(net_a.parameters(), lr=0.1, momentum=0.9)
    lb = LinBreg(net_b.parameters(), lr=0.1, lam=0.0, momentum=0.9, compiled=True)
    _lockstep([sgd, lb], [net_a, net_b], batches(8, torch.float32), lambda k: 0.1 / (k + 1))
    assert lb._compiled_update is not None
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_compiled_auto_compiles_on_cuda():
    net = tiny_net(torch.float32).cuda()
    opt = MLLinBreg(split_groups(net, reg="l1"), lr=0.1, lam=0.05, momentum=0.9, m=3, compiled=None)
    run(net, opt, [(x.cuda(), y.cuda()) for x, y in batches(4, torch.float32)])
    assert opt._compiled_update is not None and opt.compiled is None  # compiled, no fallback


def test_compiled_auto_stays_eager_on_cpu():
    nets = [tiny_net(), tiny_net()]
    opts = [
        MLLinBreg(split_groups(net, reg="l1"), lr=0.1, lam=0.05, momentum=0.9, m=3, compiled=c)
        for net, c in zip(nets, (False, None))
    ]
    _lockstep(opts, nets, batches(6), lambda k: 0.1)
    assert opts[1]._compiled_update is None  # auto compiles CUDA tensors only
    for pa, pb in zip(*(n.parameters() for n in nets)):
        assert torch.equal(pa, pb)


def test_compile_failure_in_auto_mode_falls_back_to_the_eager_update(monkeypatch):
    def broken(*args, **kwargs):
        raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, RuntimeError("no triton"), None)

    nets = [tiny_net(), tiny_net()]
    opts = [
        MLLinBreg(split_groups(net, reg="l1"), lr=0.1, lam=0.05, momentum=0.9, m=3, compiled=c)
        for net, c in zip(nets, (False, None))
    ]
    # stand in for a CUDA machine whose Triton cannot compile: auto mode tries, then falls back
    monkeypatch.setattr(opts[1], "_compiled", lambda: broken)
    monkeypatch.setattr(
        opts[1], "_use_compiled", lambda group, params, bufs: opts[1].compiled is not False and all(b is not None for b in bufs)
    )
    with pytest.warns(RuntimeWarning, match="compiling the LinBreg update failed"):
        _lockstep(opts, nets, batches(6), lambda k: 0.1)
    assert opts[1].compiled is False
    for pa, pb in zip(*(n.parameters() for n in nets)):
        assert torch.equal(pa, pb)  # the failed attempt changed nothing
    net = tiny_net()
    forced = MLLinBreg(split_groups(net, reg="l1"), lr=0.1, momentum=0.0, compiled=True)
    monkeypatch.setattr(forced, "_compiled", lambda: broken)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed):
        run(net, forced, batches(1))  # compiled=True: the error reaches the user


def test_bad_compiled_value_names_it():
    with pytest.raises(ValueError, match="compiled='yes'"):
        LinBreg(tiny_net().parameters(), lr=0.1, compiled="yes")


@pytest.mark.parametrize("path", [dict(foreach=False), dict(foreach=True), dict(foreach=True, compiled=True)])
def test_support_counts_nan_as_nonzero_on_every_path(path):
    # after a divergence: the support must not depend on the code path
    p = nn.Parameter(torch.tensor([1.0, 0.0, 2.0, -3.0]))
    opt = MLLinBreg([p], lr=0.1, lam=0.5, m=2, momentum=0.9, **path)
    for g in ([0.1, 0.0, float("nan"), 0.0], [0.0] * 4, [0.0] * 4):  # the third step is fine again
        p.grad = torch.tensor(g)
        opt.step()
    assert opt.state[p]["support"].tolist() == support(p.detach(), "l1").tolist() == [1.0, 0.0, 1.0, 1.0]
