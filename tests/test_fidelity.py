"""Where mlbreg follows a reference exactly: LinBreg's momentum convention of the reference code
(BregmanLearning `optimizers.LinBreg`), against a small independent implementation of its formula,
and the FLOPs of coarse steps counted from the frozen support (docs/algorithms.md §6)."""

import math

import pytest
import torch
from torch import nn

from mlbreg.flops import FlopsAccount
from mlbreg.methods import build_method
from mlbreg.models import create_model
from mlbreg.optim import LinBreg, MLLinBreg

from helpers import make_cfg


def reference_linbreg(theta0, grad_fn, lrs, lam, delta, beta):
    """The reference formula, written out: v₀ = θ₀/δ + λ·sign(θ₀), b₀ = 0; per step
    b ← β·b + (1 − β)·τ·g, v ← v − b, θ = δ·sign(v)·max(|v| − λ, 0). Returns the iterates."""
    theta = theta0.clone()
    v = theta / delta + lam * torch.sign(theta)
    b = torch.zeros_like(theta)
    out = []
    for tau in lrs:
        g = grad_fn(theta)
        b = beta * b + (1 - beta) * tau * g
        v = v - b
        theta = delta * torch.sign(v) * torch.clamp(v.abs() - lam, min=0)
        out.append((theta.clone(), v.clone(), b.clone()))
    return out


def quadratic(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(20, n, generator=g, dtype=torch.float64)
    y = torch.randn(20, generator=g, dtype=torch.float64)
    theta0 = torch.randn(n, generator=g, dtype=torch.float64) * (torch.rand(n, generator=g) < 0.4)
    return A, y, theta0, (lambda th: A.T @ (A @ th - y) / 20)


def cosine(steps, lr=0.3):
    return [0.5 * lr * (1 + math.cos(math.pi * k / steps)) for k in range(steps)]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("delta", [1.0, 2.0])
def test_reference_momentum_is_the_reference_formula_step_for_step(foreach, delta):
    A, y, theta0, grad_fn = quadratic()
    lrs, lam, beta = cosine(8), 0.05, 0.9
    expected = reference_linbreg(theta0, grad_fn, lrs, lam, delta, beta)
    theta = nn.Parameter(theta0.clone())
    opt = LinBreg([theta], lr=lrs[0], lam=lam, delta=delta, momentum=beta, momentum_style="reference", foreach=foreach)
    for k, tau in enumerate(lrs):
        opt.param_groups[0]["lr"] = tau  # τ changes every step: it sits inside the buffer
        theta.grad = grad_fn(theta.detach())
        opt.step()
        want_theta, want_v, want_b = expected[k]
        torch.testing.assert_close(theta.detach(), want_theta, rtol=0, atol=1e-12)
        torch.testing.assert_close(opt.state[theta]["v"], want_v, rtol=0, atol=1e-12)
        torch.testing.assert_close(opt.state[theta]["momentum_buffer"], want_b, rtol=0, atol=1e-12)
    assert theta.detach().eq(0).any() and theta.detach().ne(0).any()  # l1 pruned, not everything


def test_torch_momentum_moves_v_ten_times_further_at_beta_0_9():
    """docs/method.md's warning in numbers: the first step's change of v is τ·g (torch) vs (1 − β)·τ·g."""
    _, _, theta0, grad_fn = quadratic(seed=1)
    steps = {}
    for style in ("torch", "reference"):
        theta = nn.Parameter(theta0.clone())
        opt = LinBreg([theta], lr=0.1, lam=0.0, momentum=0.9, momentum_style=style)
        theta.grad = grad_fn(theta.detach())
        v0 = theta.detach().clone()  # λ = 0, δ = 1: v₀ = θ₀
        opt.step()
        steps[style] = opt.state[theta]["v"] - v0
    torch.testing.assert_close(steps["torch"], 10 * steps["reference"], rtol=1e-12, atol=1e-15)


def test_ml_linbreg_reference_momentum_m1_is_linbreg_and_coarse_steps_stay_on_the_support():
    _, _, theta0, grad_fn = quadratic(seed=2)
    a, b = nn.Parameter(theta0.clone()), nn.Parameter(theta0.clone())
    lb = LinBreg([a], lr=0.1, lam=0.05, momentum=0.9, momentum_style="reference")
    ml = MLLinBreg([b], lr=0.1, lam=0.05, momentum=0.9, momentum_style="reference", m=1)
    for _ in range(5):
        a.grad, b.grad = grad_fn(a.detach()), grad_fn(b.detach())
        lb.step()
        ml.step()
    assert torch.equal(a, b)
    c = nn.Parameter(theta0.clone())
    opt = MLLinBreg([c], lr=0.1, lam=0.05, momentum=0.9, momentum_style="reference", m=3)
    c.grad = grad_fn(c.detach())
    opt.step()  # fine: S fixed
    outside = opt.state[c]["support"] == 0
    v, buf = opt.state[c]["v"].clone(), opt.state[c]["momentum_buffer"].clone()
    c.grad = grad_fn(c.detach())
    opt.step()  # coarse
    assert torch.equal(opt.state[c]["v"][outside], v[outside])
    assert torch.equal(opt.state[c]["momentum_buffer"][outside], buf[outside])
    assert c.detach()[outside].eq(0).all()


def test_reference_momentum_from_the_config():
    cfg = make_cfg("method=linbreg", "method.momentum_style=reference")
    from mlbreg.methods import method_from_config

    model = create_model("mlp", 10, (1, 8, 8), hidden=[8])
    method = method_from_config(cfg, model, steps_per_epoch=4)
    assert {g["momentum_style"] for g in method.optimizer.param_groups} == {"reference"}
    from mlbreg.config import ConfigError, validate

    with pytest.raises(ConfigError, match="invalid method.dampening=0.5: must be 0 with method.momentum_style"):
        validate(make_cfg("method=linbreg", "method.momentum_style=reference", "method.dampening=0.5"))
    with pytest.raises(ConfigError, match="invalid method.momentum_style='sgd': valid: torch, reference"):
        validate(make_cfg("method=mllinbreg", "method.momentum_style=sgd"))


def test_coarse_flops_count_the_frozen_support_not_theta():
    """A coarse step computes on all of S, also where θ shrank to 0 inside the cycle."""
    torch.manual_seed(0)
    model = create_model("mlp", 10, (1, 8, 8), hidden=[16])
    method = build_method("mllinbreg", model, lr=0.5, lam=0.02, m=3)
    flops = FlopsAccount(model, (1, 8, 8), torch.device("cpu"))
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))

    def step():
        kind = method.step_kind()
        method.optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        flops.add_step(kind, 32, method.structure_nnz(kind))
        method.step()
        return kind

    assert step() == "full_grad"
    weights = [m.weight for m in (model.net[1], model.net[3])]
    supports = [method.optimizer.state[w]["support"] for w in weights]
    with torch.no_grad():  # θ shrinks to 0 at half of S: the support stays
        for w, s in zip(weights, supports):
            idx = s.flatten().nonzero().squeeze(1)[::2]
            w.view(-1)[idx] = 0
    assert step() == "sparse"
    counted = flops.nnz_samples["sparse"] / 32
    assert counted.tolist() == [float(s.sum()) for s in supports]
    assert counted.sum() > sum(float((w != 0).sum()) for w in weights)


def test_reference_momentum_compiled_equals_eager():
    """The torch.compile'd update takes τ as a 0-d tensor: it must scale the buffer's input the same way."""
    _, _, theta0, grad_fn = quadratic(seed=3)
    theta0 = theta0.float()
    params = [nn.Parameter(theta0.clone()) for _ in range(2)]
    opts = [
        LinBreg([p], lr=0.2, lam=0.05, momentum=0.9, momentum_style="reference", foreach=True, compiled=c)
        for p, c in zip(params, (False, True))
    ]
    for tau in cosine(4, lr=0.2):
        for p, opt in zip(params, opts):
            opt.param_groups[0]["lr"] = tau
            p.grad = grad_fn(p.detach().double()).float()
            opt.step()
    assert opts[1]._compiled_update is not None
    torch.testing.assert_close(params[1].detach(), params[0].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opts[1].state[params[1]]["v"], opts[0].state[params[0]]["v"], rtol=1e-5, atol=1e-6)
