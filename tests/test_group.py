"""The ML LinBreg design space beyond the defaults: the group regularizer (kernel-wise
support, docs/algorithms.md §1/§3) and the adaptive coarse-cycle criterion (paper eq. 10),
both through the real config and loop."""

import pandas as pd
import pytest
import torch
from torch import nn

from mlbreg.optim import MLLinBreg
from mlbreg.train import train

from helpers import make_cfg


def run(tmp_path, *overrides):
    outcome = train(make_cfg(*overrides), tmp_path)
    assert outcome["status"] == "finished"
    return pd.read_csv(tmp_path / "metrics.csv").iloc[-1]


def test_group_gives_kernel_sparsity_that_l1_does_not(tmp_path):
    """Same small conv net, same overall sparsity (~80%): the group norm empties whole
    3x3 kernels, l1 scatters its zeros across them."""
    common = ["model=convnet", "epochs=20", "init.density=0.1", "m=10"]
    group = run(tmp_path / "group", *common, "regularizer=group", "lam=0.003")
    l1 = run(tmp_path / "l1", *common, "regularizer=l1", "lam=0.01")
    assert abs(group.sparsity_pct - l1.sparsity_pct) < 5
    assert group.conv_sparsity_pct > 2 * l1.conv_sparsity_pct and group.conv_sparsity_pct - l1.conv_sparsity_pct > 40
    # with group sparsity nearly every zero is part of an empty kernel
    assert group.conv_sparsity_pct > 0.9 * group.sparsity_pct
    assert group.test_acc_pct >= 90.0 and l1.test_acc_pct >= 90.0


def test_group_support_and_coarse_steps_keep_whole_kernels():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, bias=False)
    with torch.no_grad():
        conv.weight.mul_((torch.rand(6, 4, 1, 1) < 0.3).float())  # 30% of the kernels non-zero
        conv.weight[0, 0, 1, 1] = 0.0  # a zero inside a live kernel
    opt = MLLinBreg([conv.weight], lr=0.1, lam=0.01, reg="group", m=5)
    x = torch.randn(8, 4, 7, 7)
    support_at_fine = None  # set by the fine step (k = 0)
    for k in range(5):
        opt.zero_grad()
        conv(x).pow(2).mean().backward()
        opt.step()
        support = opt.state[conv.weight]["support"]
        # the support is a union of whole kernels: a kernel is in if any entry is non-zero
        assert torch.equal(support.flatten(2).amin(-1), support.flatten(2).amax(-1))
        if k > 0:  # coarse steps: kernels outside the support stay exactly zero
            live = conv.weight.detach().flatten(2).ne(0).any(-1)
            assert not (live & ~support.flatten(2)[..., 0].bool()).any()
            assert torch.equal(support.flatten(2)[..., 0].bool(), support_at_fine)
        else:
            support_at_fine = support.flatten(2)[..., 0].bool()
            assert torch.equal(support_at_fine, conv.weight.detach().flatten(2).ne(0).any(-1))


@pytest.mark.parametrize("on_support, coarse", [(0.05, False), (0.9, True)])
def test_adaptive_criterion_by_gradient_share(on_support, coarse):
    """‖Rg‖ below κ‖g‖ forces fine steps, above it allows the coarse cycle (group support)."""
    w = nn.Parameter(torch.zeros(2, 2, 3, 3, dtype=torch.float64))
    with torch.no_grad():
        w[0, 0] = 1.0  # the support: kernel (0, 0), a quarter of the entries
    opt = MLLinBreg([w], lr=1e-3, lam=1.0, reg="group", m=4, criterion="adaptive", kappa=0.45)
    g = torch.zeros_like(w)
    g[0, 0] = on_support  # the gradient's share on the support decides
    g[0, 1] = g[1, 0] = g[1, 1] = 1.0 - on_support
    w.grad = g
    share = g[0, 0].norm() / g.norm()
    assert (share >= 0.45) == coarse
    opt.step()
    assert opt.coarse_cycle == coarse
    assert opt.next_step_is_fine() == (not coarse)


def test_adaptive_criterion_from_the_command_line(tmp_path):
    """`method.criterion=adaptive`: κ = 0, ε = 0 never vetoes a cycle (identical to fixed);
    κ close to 1 demands nearly all of the gradient on the support, so the cycles are
    mostly fine steps."""
    common = ["epochs=10", "m=10"]
    fixed = run(tmp_path / "fixed", *common)
    always = run(tmp_path / "always", *common, "method.criterion=adaptive", "method.kappa=0", "method.eps=0")
    strict = run(tmp_path / "strict", *common, "method.criterion=adaptive", "method.kappa=0.9")
    assert fixed.coarse_steps == 120 - 12
    assert always.coarse_steps == fixed.coarse_steps and always.test_acc_pct == fixed.test_acc_pct
    assert strict.coarse_steps < fixed.coarse_steps / 2
    assert strict.fine_steps + strict.coarse_steps == 120
    assert strict.train_flops_vs_sgd > fixed.train_flops_vs_sgd  # fine steps need the full gradient
