"""prune_finetune (docs/algorithms.md §5): dense SGD, one-shot global magnitude pruning, fine-tuning."""

import pandas as pd
import pytest
import torch
from torch import nn

from mlbreg.config import ConfigError, validate
from mlbreg.methods import build_method
from mlbreg.models import create_model, prunable_modules
from mlbreg.sparsity import finetune_split, global_magnitude_masks
from mlbreg.train import train

from helpers import make_cfg


def test_global_magnitude_hand_case_with_ties():
    a = torch.tensor([[3.0, -1.0], [1.0, 2.0]])
    b = torch.tensor([0.5, -1.0, 4.0])
    # 7 weights, sparsity 3/7: prune 0.5, then two of the three |w| = 1 ties, in layer
    # order then flat index: a[0, 1] and a[1, 0]; b[1] (also 1) is kept
    ma, mb = global_magnitude_masks([a, b], 3 / 7)
    assert ma.tolist() == [[True, False], [False, True]]
    assert mb.tolist() == [False, True, True]


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_global_magnitude_is_exact_and_global(sparsity):
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(64, 32, generator=g) * 3, torch.randn(16, 8, 3, 3, generator=g), torch.randn(10, 16, generator=g) * 0.1]
    masks = global_magnitude_masks(ws, sparsity)
    n = sum(w.numel() for w in ws)
    assert sum(int((~m).sum()) for m in masks) == round(sparsity * n)
    pruned = torch.cat([w[~m].abs() for w, m in zip(ws, masks)])
    kept = torch.cat([w[m].abs() for w, m in zip(ws, masks)])
    assert pruned.max() <= kept.min()
    # global, not per layer: the small-scale last layer loses more than the others
    assert (~masks[2]).float().mean() > (~masks[0]).float().mean()


def test_finetune_split():
    assert finetune_split(200, 20) == (180, 20)
    assert finetune_split(30, 0.1) == (27, 3)
    assert finetune_split(5, 0.01) == (4, 1)  # at least one fine-tuning epoch
    assert finetune_split(7, 20, from_checkpoint="model.pt") == (0, 7)
    for bad in (20, 0, -1, 1.5, 0.99):
        with pytest.raises(ValueError, match="finetune_epochs"):
            finetune_split(10, bad)


def _step(model, method, x, y):
    method.optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    method.step()


def test_method_prunes_at_the_boundary_and_keeps_the_mask():
    torch.manual_seed(0)
    model = create_model("mlp", 10, (1, 8, 8), hidden=[32, 16])
    method = build_method("prune_finetune", model, lr=0.05, momentum=0.9, sparsity=0.8, epochs=4, finetune_epochs=2)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    weights = [m.weight for _, m in prunable_modules(model)]
    n = sum(w.numel() for w in weights)
    for epoch in (1, 2):
        assert method.step_kind() == "dense"
        _step(model, method, x, y)
        method.end_epoch(epoch)
    assert method.step_kind() == "sparse" and method.pruned_at_epoch == 2
    nnz = sum(int(torch.count_nonzero(w)) for w in weights)
    assert nnz == n - round(0.8 * n)
    state = method.state_dict()
    for _ in range(5):
        _step(model, method, x, y)
        assert sum(int(torch.count_nonzero(w)) for w in weights) == nnz
        for w, m in zip(weights, method.masks):
            assert torch.all(w[~m] == 0) and torch.all(method.optimizer.state[w]["momentum_buffer"][~m] == 0)
    # the phase and the mask come back from a state_dict
    other = build_method("prune_finetune", model, lr=0.05, momentum=0.9, sparsity=0.8, epochs=4, finetune_epochs=2)
    assert other.step_kind() == "dense"
    other.load_state_dict(state)
    assert other.step_kind() == "sparse" and other.pruned_at_epoch == 2
    assert all(torch.equal(a, b) for a, b in zip(other.masks, method.masks))


def test_prune_finetune_on_digits(tmp_path):
    cfg = make_cfg("method=prune_finetune", "sparsity=0.9", "epochs=12", "method.finetune_epochs=4")
    outcome = train(cfg, tmp_path)
    assert outcome["status"] == "finished"
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    dense, tuned = metrics.iloc[:8], metrics.iloc[8:]
    assert (dense.sparsity_pct == 0).all()
    assert dense.train_flops_vs_sgd.tolist() == pytest.approx([1.0] * 8)
    n = int(metrics.prunable_params.iloc[0])
    assert (tuned.nonzeros == n - round(0.9 * n)).all()  # the exact target, kept through fine-tuning
    assert tuned.coarse_steps.iloc[-1] == 4 * 12 and tuned.fine_steps.iloc[-1] == 8 * 12
    # 3·f_S per fine-tuning step: the cumulative ratio falls below 1 and keeps falling
    assert (tuned.train_flops_vs_sgd.diff().dropna() < 0).all() and tuned.train_flops_vs_sgd.iloc[0] < 1.0
    f_ratio = tuned.inference_flops_vs_dense.iloc[-1]
    assert tuned.train_flops_vs_sgd.iloc[-1] == pytest.approx((8 * 12 + f_ratio * 4 * 12) / (12 * 12), rel=0.02)
    assert metrics.test_acc_pct.iloc[-1] >= 93.0


def test_from_checkpoint_prunes_a_dense_model_at_once(tmp_path):
    dense_dir = tmp_path / "dense"
    assert train(make_cfg("method=sgd", "epochs=10"), dense_dir)["status"] == "finished"
    dense_state = torch.load(dense_dir / "model.pt")
    names = [n for n, _ in prunable_modules(create_model("mlp", 10, (1, 8, 8), hidden=[256, 128]))]
    dense_w = [dense_state[f"{n}.weight"] for n in names]
    accs = {}
    for sparsity, source in ((0.8, dense_dir), (0.95, dense_dir / "model.pt")):
        run_dir = tmp_path / f"sp{sparsity}"
        cfg = make_cfg(
            "method=prune_finetune", f"sparsity={sparsity}", "epochs=2", "lr=0.01", f"method.from_checkpoint={source}"
        )
        assert train(cfg, run_dir)["status"] == "finished"
        metrics = pd.read_csv(run_dir / "metrics.csv")
        n = int(metrics.prunable_params.iloc[0])
        assert (metrics.nonzeros == n - round(sparsity * n)).all()  # sparse from the first step on
        assert metrics.fine_steps.iloc[-1] == 0
        accs[sparsity] = metrics.test_acc_pct.iloc[-1]
        # the pruned weights are the globally smallest of the dense model
        final = torch.load(run_dir / "model.pt")
        kept = [final[f"{name}.weight"] != 0 for name in names]
        pruned_mag = torch.cat([w[~m].abs() for w, m in zip(dense_w, kept)])
        kept_mag = torch.cat([w[m].abs() for w, m in zip(dense_w, kept)])
        assert pruned_mag.max() <= kept_mag.min()
    assert accs[0.8] >= 90.0


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["method=prune_finetune"], "sparsity"),
        (["method=rigl"], "sparsity"),
        (["method=rigl", "sparsity=1.0"], "sparsity"),
        (["method=prune_finetune", "sparsity=0.9", "epochs=20", "method.finetune_epochs=20"], "method.finetune_epochs"),
        (["method=prune_finetune", "sparsity=0.9", "method.finetune_epochs=1.5"], "method.finetune_epochs"),
        (["method=prune_finetune", "sparsity=0.9", "method.from_checkpoint=/nonexistent/model.pt"], "method.from_checkpoint"),
        (["method=rigl", "sparsity=0.9", "method.delta_t=0"], "method.delta_t"),
        (["method=rigl", "sparsity=0.9", "method.alpha=1.5"], "method.alpha"),
        (["method=rigl", "sparsity=0.9", "method.end_fraction=0"], "method.end_fraction"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"invalid {key}="):
        validate(make_cfg(*overrides))


def test_good_configs_validate():
    validate(make_cfg("method=prune_finetune", "sparsity=0.9", "epochs=20", "method.finetune_epochs=0.1"))
    validate(make_cfg("method=rigl", "sparsity=0.95", "init=erk"))
