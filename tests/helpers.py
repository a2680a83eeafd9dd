"""Plain helpers the tests import (`from helpers import make_cfg`); fixtures live in conftest.py.

A module of its own, not conftest: tests/ddp_worker.py runs as a subprocess outside pytest
and needs `make_cfg` too.
"""

import torch
from hydra import compose, initialize_config_dir

from mlbreg.hydra_glue import register_resolvers
from mlbreg.paths import config_dir

register_resolvers()


def make_cfg(*overrides: str):
    """The real `conf/train.yaml` composed with overrides (progress bar off), as Hydra does
    (lightning-hydra-template style)."""
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("train", overrides=["progress=false", *overrides])


def backend_step(model, opt, backend, x, y, kind, precision="fp32"):
    """One ML LinBreg step the way mlbreg.train drives a backend (under bf16 autocast for
    precision="bf16"); returns the loss."""
    backend.before_step(kind)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    backend.after_backward()
    opt.step()
    backend.after_step(kind)
    return loss.item()


def run_mllinbreg(model, make, batches, m=3, lam=0.05, reg="l1", lr=0.05, precision="fp32"):
    """ML LinBreg over `batches`; `make(model, optimizer)` builds the backend. Returns (optimizer,
    [(step kind, loss)], backend)."""
    from mlbreg.methods import split_param_groups
    from mlbreg.optim import MLLinBreg

    opt = MLLinBreg(split_param_groups(model, reg, lam), lr=lr, lam=lam, momentum=0.9, m=m)
    backend = make(model, opt)
    trace = []
    for x, y in batches:
        kind = "full_grad" if opt.next_step_is_fine() else "sparse"
        trace.append((kind, backend_step(model, opt, backend, x, y, kind, precision)))
    backend.use_dense()
    return opt, trace, backend


def make_batches(sizes, shape=(2, 16, 16), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, *shape, generator=g), torch.randint(0, 10, (b,), generator=g)) for b in sizes]


def signal_at_step(monkeypatch, step: int, signum=None):
    """Fault injection: deliver `signum` (default SIGTERM) to this process while training step `step`
    runs (counted in `FlopsAccount.add_step`, called once per step). Returns the unpatched method, for a
    test that restores it before the rerun."""
    import os
    import signal

    from mlbreg.flops import FlopsAccount

    original, count = FlopsAccount.add_step, {"n": 0}

    def add_step(self, *args):
        count["n"] += 1
        if count["n"] == step:
            os.kill(os.getpid(), signum or signal.SIGTERM)
        return original(self, *args)

    monkeypatch.setattr(FlopsAccount, "add_step", add_step)
    return original
