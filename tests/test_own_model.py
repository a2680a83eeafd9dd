"""Bring your own model: `mlbreg.sparse_steps` in a plain training loop, fusion found in the torch.fx graph of any
model (torchvision's ResNet, a user's residual blocks), the fallback for untraceable models, and
`model=torchvision.<name>` from the command line. Small inputs and batches of 8, one thread (conftest)."""

import copy
import io
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import mlbreg
from mlbreg.backends.native import build as native_build
from mlbreg.config import ConfigError, run_name, validate
from mlbreg.methods import split_param_groups
from mlbreg.models import create_model
from mlbreg.optim import MLLinBreg
from mlbreg.sparsity import sparse_init_

from helpers import make_batches, make_cfg

try:
    native_build.load()
except native_build.NativeUnavailable as err:  # pragma: no cover - a machine without a compiler
    pytest.skip(f"native kernels unavailable: {err}", allow_module_level=True)

from mlbreg.backends.native import ops  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "own-model.md"


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class Block(nn.Module):
    """A user's residual block written four ways: inplace ReLU module, `+=`, Tensor.relu, torch.add."""

    def __init__(self, c, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return out.relu()


class Net(nn.Module):
    """Stem (conv -> BN -> F.relu), two blocks, a BN -> add without ReLU, max-pool, average pool, linear."""

    def __init__(self, c=8):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.proj, self.bnp = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(c, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.blocks(x)
        x = torch.add(self.bnp(self.proj(x)), x)
        return self.fc(F.adaptive_avg_pool2d(self.pool(x), 1).flatten(1))


class Untraceable(Net):
    """Net whose own forward branches on a tensor's value (torch.fx cannot trace it); its blocks can be."""

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        if x.sum() > 0:
            x = self.blocks(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def sparse(model, density=0.2):
    sparse_init_(model, density=density, scheme="uniform", seed=0)
    return model


def torchvision_resnet():
    torch.manual_seed(0)
    return sparse(torchvision.models.resnet18(num_classes=10), 0.1)


def loop(model, opt, batches, steps=None):
    """The plain loop the API leaves unchanged; the losses."""
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def optimizer(model, m=5):
    return MLLinBreg(split_param_groups(model, "l1", 0.05), lr=0.01, lam=0.05, momentum=0.9, m=m)


def test_torchvision_resnet18_steps_equal_torch_with_fused_blocks(monkeypatch):
    """torchvision's ResNet-18 (7x7 stride-2 stem, max-pool; 64x64 inputs): five ML LinBreg steps (one fine, four
    coarse) through `mlbreg.sparse_steps` with the native backend, each started from backend=torch's state (loaded
    through the model's and the optimizer's load_state_dict, which the handle follows), end where backend=torch's
    end (weights, v, momentum, BN statistics within 5e-2 relative, the tolerance of the CIFAR ResNet's test in
    test_backend_native.py, which says why; supports equal). The graph pass fuses the stem and both BatchNorms of
    every block (17 chains; no ReLU module is called in a coarse step, each runs inside its fused BatchNorm), the
    max-pool keeps the CHWB layout into layer1, and every layer runs native."""
    ref, model = torchvision_resnet(), torchvision_resnet()
    ref_opt, opt = optimizer(ref), optimizer(model)
    steps = mlbreg.sparse_steps(model, opt, backend="native", force=True)
    ref_steps = mlbreg.sparse_steps(ref, ref_opt, backend="torch")
    chwb, relus = [], []
    model.layer1[0].conv1.register_forward_pre_hook(lambda m, a: chwb.append(ops.is_chwb(a[0])))
    relu_forward = nn.ReLU.forward
    monkeypatch.setattr(nn.ReLU, "forward", lambda self, x: relus.append(1) or relu_forward(self, x))
    calls = []
    for x, y in make_batches([8] * 5, shape=(3, 64, 64)):
        model.load_state_dict(ref.state_dict())
        opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
        loop(ref, ref_opt, [(x, y)])
        relus.clear()
        loop(model, opt, [(x, y)])
        calls.append(len(relus))
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert rel(p, q) < 5e-2, name
            s, r = opt.state[p], ref_opt.state[q]
            assert rel(s["momentum_buffer"], r["momentum_buffer"]) < 5e-2, name
            if "support" in r:
                assert torch.equal(s["support"], r["support"]) and rel(s["v"], r["v"]) < 5e-2, name
        for (name, b), c in zip(model.named_buffers(), ref.buffers()):
            assert rel(b, c) < 5e-2 if b.is_floating_point() else torch.equal(b, c), name
    assert len(steps.fusions) == 17 and sum(f.res for f in steps.fusions) == 8
    assert chwb == [False, True, True, True, True]  # dense in the fine step, CHWB in the coarse ones
    assert calls == [17, 0, 0, 0, 0]  # every ReLU module fused in the coarse steps
    rows = {row["layer"]: row for row in steps.summary()}
    assert rows["conv1"]["choice"] == "native" and rows["maxpool"]["choice"] == "CHWB layout"
    assert rows["layer1.0.bn2"]["why"] == "conv -> bn -> add -> relu"
    assert "17 fused" in steps.report() and ref_steps.summary() == []


def test_custom_blocks_fused_and_equal_torch():
    """A user's model (functional and module ReLUs, `+=`, torch.add, Tensor.relu): the graph pass finds its chains
    (stem, 2 x 2 in the blocks, the BN -> add without ReLU), and six free-running steps with the native backend
    give the losses, weights and BN statistics of backend=torch to 1e-5."""
    torch.manual_seed(0)
    ref = sparse(Net())
    model = copy.deepcopy(ref)
    ref_opt, opt = optimizer(ref, m=3), optimizer(model, m=3)
    steps = mlbreg.sparse_steps(model, opt, backend="native", force=True)
    patterns = [(f.bn, f.pattern) for f in steps.fusions]
    assert patterns == [
        ("bn", "conv -> bn -> relu"),
        ("blocks.0.bn1", "conv -> bn -> relu"),
        ("blocks.0.bn2", "conv -> bn -> add -> relu"),
        ("blocks.1.bn1", "conv -> bn -> relu"),
        ("blocks.1.bn2", "conv -> bn -> add -> relu"),
        ("bnp", "conv -> bn -> add"),
    ]
    batches = make_batches([8] * 6, shape=(3, 12, 12))
    assert loop(model, opt, batches) == pytest.approx(loop(ref, ref_opt, batches), rel=1e-5)
    for (name, t), u in zip(model.state_dict().items(), ref.state_dict().values()):
        assert rel(t, u) < 1e-5 if t.is_floating_point() else torch.equal(t, u), name
    assert len(steps.backend.swapped_layers()) == 7 and steps.backend.rebuilds == 2


def test_untraceable_model_falls_back_to_its_blocks_with_the_reason():
    """A model whose forward torch.fx cannot trace: the summary says why, its traceable blocks are fused alone
    (installed on the blocks, not on the model), the other layers run per-layer swaps, and a coarse step's output
    and gradients equal the dense model's."""
    torch.manual_seed(0)
    model = sparse(Untraceable())
    ref = copy.deepcopy(model)
    steps = mlbreg.sparse_steps(model, optimizer(model), backend="native", force=True)
    note = [row for row in steps.summary() if row["kind"] == "graph"]
    assert [row["layer"] for row in note] == ["(model)"] and "not traceable by torch.fx" in note[0]["why"]
    assert "TraceError" in note[0]["why"] or "Proxy" in note[0]["why"]
    assert {f.root for f in steps.fusions} == {"blocks"} and len(steps.fusions) == 4
    x = torch.randn(8, 3, 12, 12)
    steps.backend.before_step("sparse")
    assert "forward" in model.blocks.__dict__ and "forward" not in model.__dict__
    out, want = model(x), ref(x)
    out.square().sum().backward()
    want.square().sum().backward()
    assert rel(out, want) < 1e-5
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is None:  # proj, bnp: not in this forward
            assert p.grad is None, name
            continue
        on = p != 0 if p.dim() > 1 else torch.ones_like(p, dtype=torch.bool)  # swapped: gradient on S only
        assert rel(p.grad[on], q.grad[on]) < 1e-5, name


def test_gradients_ready_after_backward_eval_dense_and_remove():
    """In a coarse step the swapped layers' dense weight.grad is set when backward() returns (gradient clipping
    before step() sees it); an eval-mode forward runs the plain modules (only the model's pinned forward stays);
    a hooked BatchNorm is called as a module (its hook runs); remove() leaves no hook and no instance forward."""
    torch.manual_seed(0)
    model = sparse(Net())
    opt = optimizer(model, m=3)
    steps = mlbreg.sparse_steps(model, opt, backend="native", force=True)
    batches = make_batches([8] * 2, shape=(3, 12, 12))
    loop(model, opt, batches[:1])  # the fine step
    seen = []
    model.bn.register_forward_hook(lambda m, a, o: seen.append(ops.is_chwb(o)))
    x, y = batches[1]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert seen == [True]
    assert all(mod.weight.grad is not None for mod in model.modules() if isinstance(mod, (nn.Conv2d, nn.Linear)))
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    opt.step()
    assert float(norm) > 0 and steps.backend.swapped_layers()
    model.eval()
    model(x)
    assert [n for n, m in model.named_modules() if "forward" in m.__dict__] == [""]  # the fused graph's, pinned
    model.train()
    model(x)
    assert len([n for n, m in model.named_modules() if "forward" in m.__dict__]) > 1
    steps.remove()
    assert not [n for n, m in model.named_modules() if "forward" in m.__dict__]
    assert not model._forward_pre_hooks and not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_copies_and_pickles_are_plain_models():
    """Inside a coarse cycle (sparse layers installed), copy.deepcopy(model) and torch.save(model) work and give
    a plain model: its forward equals a fresh model's with the same weights (dense, in train and eval mode), and
    training the copy leaves the original and its handle untouched."""
    torch.manual_seed(0)
    model = sparse(Net())
    opt = optimizer(model, m=4)
    steps = mlbreg.sparse_steps(model, opt, backend="native", force=True)
    loop(model, opt, make_batches([8] * 2, shape=(3, 12, 12)))
    opt.zero_grad()
    assert steps.backend._active
    x = torch.randn(8, 3, 12, 12)
    plain = Net()
    plain.load_state_dict(model.state_dict())
    clone = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for other in (clone, loaded):
        for mode in (True, False):
            plain.load_state_dict(other.state_dict())
            torch.testing.assert_close(other.train(mode)(x), plain.train(mode)(x), rtol=0, atol=0)
            assert type(other.forward).__name__ == "Plain"
    clone.train()
    F.cross_entropy(clone(x), torch.zeros(8, dtype=torch.long)).backward()
    for (name, t), u in zip(model.state_dict().items(), before.values()):
        assert torch.equal(t, u), name
    assert steps.backend._active and all(m.weight.grad is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_state_dict_round_trip_and_exact_resume():
    """The model's state_dict has the plain model's keys inside a coarse cycle; saving model, optimizer and handle
    after 3 of 8 steps and loading them into a fresh model, optimizer and handle gives the uninterrupted run's
    weights, buffers and losses bit for bit."""

    def fresh():
        torch.manual_seed(0)
        model = sparse(Net())
        opt = optimizer(model, m=4)
        return model, opt, mlbreg.sparse_steps(model, opt, backend="native", force=True)

    batches = make_batches([8] * 8, shape=(3, 12, 12))
    ref, ref_opt, _ = fresh()
    want = loop(ref, ref_opt, batches)
    model, opt, steps = fresh()
    got = loop(model, opt, batches[:3])
    assert list(model.state_dict()) == list(Net().state_dict())
    saved = copy.deepcopy(dict(model=model.state_dict(), opt=opt.state_dict(), steps=steps.state_dict()))
    model, opt, steps = fresh()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    steps.load_state_dict(saved["steps"])
    got += loop(model, opt, batches[3:])
    assert got == want
    for (name, t), u in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(t, u), name


class TokenMLP(nn.Module):
    """A transformer's MLP block on (batch, tokens, features), then a mean over the tokens and a classifier."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(12, 48), nn.GELU(), nn.Linear(48, 12))
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        x = x.reshape(x.shape[0], 4, 12)  # (B, 3, 4, 4) -> 4 tokens of 12 features
        return self.head((x + self.mlp(x)).mean(1))


def test_token_linears_run_native_and_equal_torch():
    """Linear layers on (batch, tokens, features) inputs run the native kernels (as rows of one matrix): five
    steps equal backend=torch to 1e-5, every Linear is native, and the last (coarse) step's weight gradients lie
    on the support only (a dense fallback would have written the whole gradient)."""
    torch.manual_seed(0)
    ref = sparse(TokenMLP(), 0.3)
    model = copy.deepcopy(ref)
    ref_opt, opt = optimizer(ref, m=3), optimizer(model, m=3)
    steps = mlbreg.sparse_steps(model, opt, backend="native", force=True)
    batches = make_batches([8] * 5, shape=(3, 4, 4))
    assert loop(model, opt, batches) == pytest.approx(loop(ref, ref_opt, batches), rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel(p, q) < 1e-5, name
    assert {row["layer"]: row["choice"] for row in steps.summary()} == dict.fromkeys(("mlp.0", "mlp.2", "head"), "native")
    assert {row["layer"]: row["in_shape"] for row in steps.summary()}["mlp.0"] == (4, 12)
    for mod in (model.mlp[0], model.mlp[2], model.head):  # the last step was coarse: gradients on S only
        support = opt.state[mod.weight]["support"].bool()
        assert mod.weight.grad[support].any() and not mod.weight.grad[~support].any()


def test_sparse_steps_refuses_an_optimizer_without_coarse_steps():
    """backend=native with a plain SGD optimizer: a clear error naming the optimizer and the way out; auto with
    SGD: torch layers, nothing swapped."""
    model = Net()
    with pytest.raises(ValueError, match="SGD has none: use mlbreg.optim.MLLinBreg, or backend='torch'"):
        mlbreg.sparse_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), backend="native")
    steps = mlbreg.sparse_steps(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert steps.backend.name == "torch" and "nothing swapped" in steps.report()


def test_torchvision_model_names():
    """`model=torchvision.<name>` composes, validates and gets a stable run name; a 1-channel data set gets the
    stem rebuilt; unknown names fail with the way to list valid ones; `timm.<name>` goes to timm.create_model."""
    cfg = make_cfg("model=torchvision.resnet18")
    validate(cfg)
    assert run_name(cfg).startswith("digits/torchvision.resnet18/mllinbreg/")  # pinned in test_golden.py
    model = create_model("torchvision.resnet18", 10, (1, 8, 8))
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (7, 7) and model.fc.out_features == 10
    with pytest.raises(
        ConfigError,
        match=r"no classification model 'resnet99' \(did you mean torchvision.resnet50"
        r".*list_models",
    ):
        validate(make_cfg("model=torchvision.resnet99"))
    with pytest.raises(ConfigError, match="does not take inputs of shape"):
        create_model("torchvision.vit_b_16", 10, (3, 8, 8))
    built = {}
    fake = types.SimpleNamespace(
        list_models=lambda: ["tiny"],
        create_model=lambda name, **kw: (
            built.update(name=name, **kw)
            or nn.Sequential(
                nn.Conv2d(kw["in_chans"], 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, kw["num_classes"])
            )
        ),
    )
    sys.modules["timm"] = fake
    try:
        create_model("timm.tiny", 7, (2, 8, 8))
        with pytest.raises(ConfigError, match="timm has no classification model 'tinny'"):
            create_model("timm.tinny", 7, (2, 8, 8))
    finally:
        del sys.modules["timm"]
    assert built == dict(name="tiny", pretrained=False, num_classes=7, in_chans=2)


def test_train_torchvision_resnet18_on_digits(tmp_path):
    """`mlbreg train model=torchvision.resnet18 dataset=digits epochs=1` runs (through the CLI, backend=auto:
    native) and finishes; its run directory carries the model's name."""
    from mlbreg.cli import main

    code = main(
        [
            "train",
            "model=torchvision.resnet18",
            "dataset=digits",
            "epochs=1",
            "batch_size=256",
            f"output_root={tmp_path}",
            "progress=false",
        ]
    )
    assert code == 0
    status = list(tmp_path.glob("digits/torchvision.resnet18/mllinbreg/*/status.json"))
    assert len(status) == 1 and '"backend": "native"' in status[0].read_text()


def test_docs_example_runs(capsys):
    """The example of docs/own-model.md, exactly as written there, runs and prints what the page shows: four
    steps and the report with 17 fused chains."""
    code = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S).group(1)
    exec(compile(code, str(DOCS), "exec"), {"__name__": "docs_example"})
    out = capsys.readouterr().out
    assert re.findall(r"^step (\d): loss \d", out, re.M) == ["0", "1", "2", "3"]
    assert "backend=native: 17 fused conv -> BN -> [add] -> ReLU chains" in out
