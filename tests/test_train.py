"""Whole tiny trainings on scikit-learn's digits, through the real config and loop."""

import pandas as pd
import pytest
import torch

from mlbreg.config import run_name
from mlbreg.loop import LAYER_COLUMNS, METRIC_COLUMNS
from mlbreg.train import train

from helpers import make_cfg


def run(tmp_path, *overrides):
    cfg = make_cfg(*overrides)
    outcome = train(cfg, tmp_path)
    return cfg, outcome, pd.read_csv(tmp_path / "metrics.csv")


def test_mllinbreg_on_digits_is_accurate_and_sparse(tmp_path):
    """The default run (ML LinBreg, l1, λ = 0.03, m = 100, 1% uniform init, 200 epochs)."""
    cfg, outcome, metrics = run(tmp_path)
    assert outcome["status"] == "finished"
    last = metrics.iloc[-1]
    assert last.test_acc_pct >= 93.0
    assert last.sparsity_pct >= 90.0
    # one fine step every m = 100 steps: the FLOPs are a small fraction of SGD's
    assert last.fine_steps == -(-last.step // 100)
    assert last.train_flops_vs_sgd < 0.1
    assert (tmp_path / "model.pt").exists() and (tmp_path / "summary.csv").exists()
    summary = pd.read_csv(tmp_path / "summary.csv").iloc[0]
    assert summary.method == "mllinbreg" and summary.lam == 0.03 and summary.test_acc_pct == last.test_acc_pct


def test_sgd_on_digits_reaches_its_usual_accuracy(tmp_path):
    _, outcome, metrics = run(tmp_path, "method=sgd", "epochs=100")
    last = metrics.iloc[-1]
    assert last.test_acc_pct >= 96.0
    assert last.sparsity_pct == 0.0
    assert last.train_flops_vs_sgd == pytest.approx(1.0)


def test_linbreg_on_digits_costs_a_full_gradient_per_step(tmp_path):
    _, outcome, metrics = run(tmp_path, "method=linbreg", "epochs=100", "lam=0.1")
    last = metrics.iloc[-1]
    assert last.test_acc_pct >= 93.0 and last.sparsity_pct >= 90.0
    assert last.coarse_steps == 0
    # 2·f_S + f_D per step with f_S << f_D: a bit over a third of SGD's 3·f_D
    assert 1 / 3 < last.train_flops_vs_sgd < 0.5


def test_files_and_columns(tmp_path):
    _, _, metrics = run(tmp_path, "epochs=3", "model=convnet", "init=erk", "init.density=0.1")
    assert list(metrics.columns) == METRIC_COLUMNS
    assert metrics.epoch.tolist() == [1, 2, 3]
    layers = pd.read_csv(tmp_path / "layers.csv")
    assert list(layers.columns) == LAYER_COLUMNS
    assert set(layers.epoch) == {1, 2, 3}
    # the per-layer rows add up to the model-level sparsity
    last = layers[layers.epoch == 3]
    assert 100 * (1 - last.nonzeros.sum() / last.numel.sum()) == pytest.approx(metrics.sparsity_pct.iloc[-1])
    assert (tmp_path / "config.yaml").exists()


def test_flops_account_matches_hand_computation(tmp_path):
    """ML LinBreg with m = 2 on a 1-epoch run: alternating full_grad / sparse steps."""
    from mlbreg.data import load_dataset
    from mlbreg.flops import dense_layer_flops
    from mlbreg.models import create_model

    cfg, _, metrics = run(tmp_path, "epochs=1", "m=2", "lam=1000", "batch_size=1437")
    # λ huge and one step per epoch: the weights never change from the 1% init, so f_S is constant
    data = load_dataset("digits")
    model = create_model("mlp", 10, data.in_shape, hidden=[256, 128])
    f_dense = sum(dense_layer_flops(model, data.in_shape).values())
    layers = pd.read_csv(tmp_path / "layers.csv")
    flops = dense_layer_flops(model, data.in_shape)
    f_sparse = sum(flops[row.layer] * row.density for row in layers.itertuples())
    n = len(data.train.y)
    expected = (2 * f_sparse + f_dense) * n  # the one step is a fine step
    assert metrics.train_gflops.iloc[0] * 1e9 == pytest.approx(expected, rel=1e-9)
    assert metrics.train_flops_vs_sgd.iloc[0] == pytest.approx(expected / (3 * f_dense * n), rel=1e-9)


def test_run_name_is_determined_by_the_identifying_config():
    a = make_cfg("lam=0.1", "seed=1")
    assert run_name(a) == run_name(make_cfg("lam=0.1", "seed=1", "device=cpu", "resume=false"))
    assert run_name(a) != run_name(make_cfg("lam=0.1", "seed=2"))
    assert run_name(a) != run_name(make_cfg("lam=0.1", "seed=1", "lr=0.05"))  # not in the slug, in the hash
    assert run_name(a).startswith("digits/mlp/mllinbreg/l1-lam0.1_m100_uniform0.01_seed1_")


def test_channels_last_auto_resolves_by_precision_and_keeps_run_names():
    """channels_last=auto (the default) is on with bf16 and off with fp32, and names a run as
    channels_last=false (the default it replaced) did; an explicit true is another run."""
    from mlbreg.config import use_channels_last

    assert not use_channels_last(make_cfg()) and use_channels_last(make_cfg("precision=bf16"))
    assert not use_channels_last(make_cfg("precision=bf16", "channels_last=false"))
    assert use_channels_last(make_cfg("channels_last=true"))
    for precision in ("fp32", "bf16"):
        auto = run_name(make_cfg(f"precision={precision}"))
        assert auto == run_name(make_cfg(f"precision={precision}", "channels_last=false"))
        assert auto != run_name(make_cfg(f"precision={precision}", "channels_last=true"))


def test_a_key_added_later_keeps_old_run_names_at_its_default(monkeypatch):
    import mlbreg.config as config

    before = run_name(make_cfg("lam=0.1"))  # a config tree without the new keys
    monkeypatch.setattr(config, "LATER_KEYS", {**config.LATER_KEYS, "new_knob": 0.5, "method.new_option": "off"})
    assert run_name(make_cfg("lam=0.1", "+new_knob=0.5", "+method.new_option=off")) == before
    assert run_name(make_cfg("lam=0.1", "+new_knob=0.7", "+method.new_option=off")) != before
    assert run_name(make_cfg("lam=0.1", "+new_knob=0.5", "+method.new_option=on")) != before


def test_same_seed_same_numbers(tmp_path):
    _, _, a = run(tmp_path / "a", "epochs=4", "model=convnet", "backend=torch")
    _, _, b = run(tmp_path / "b", "epochs=4", "model=convnet", "backend=torch")
    timing = [c for c in a.columns if c.endswith("_s")]
    pd.testing.assert_frame_equal(a.drop(columns=timing), b.drop(columns=timing))
    ma, mb = torch.load(tmp_path / "a" / "model.pt"), torch.load(tmp_path / "b" / "model.pt")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def _bf16_run(tmp_path, epochs):
    _, outcome, metrics = run(tmp_path, "precision=bf16", "model=convnet", f"epochs={epochs}", "init.density=0.05")
    last = metrics.iloc[-1]
    assert outcome["status"] == "finished"
    state = torch.load(tmp_path / "model.pt")
    weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() in (2, 4)]
    assert all(w.dtype == torch.float32 for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert 100 * zeros / sum(w.numel() for w in weights) == pytest.approx(last.sparsity_pct)
    return last


def test_bf16_autocast_runs_and_sparsity_comes_from_fp32_weights(tmp_path):
    _bf16_run(tmp_path, epochs=2)


@pytest.mark.slow  # bf16 convs are emulated (slow) on CPUs without AVX-512 BF16: ~3 min on a 2-core EPYC
def test_bf16_autocast_trains_to_accuracy(tmp_path):
    assert _bf16_run(tmp_path, epochs=30).test_acc_pct >= 85.0


def test_native_bf16_trains_to_the_fp32_accuracy_band(tmp_path):
    """backend=native precision=bf16 (fine steps dense bf16 + channels_last, coarse steps on the native
    kernels) on the conv net: the same accuracy band and sparsity as the fp32 native run, every layer
    native in the coarse steps (forced: the band must not depend on the timed choice)."""
    import mlbreg.backends.native.backend as native_backend
    from mlbreg.backends.native import unavailable_reason

    if unavailable_reason():
        pytest.skip(unavailable_reason())
    original = native_backend.NativeBackend.__init__

    def forced(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "force": True})

    native_backend.NativeBackend.__init__ = forced
    try:
        common = ("backend=native", "model=convnet", "epochs=15", "m=10", "lam=0.003", "init.density=0.1")
        _, _, fp32 = run(tmp_path / "fp32", *common)
        _, outcome, bf16 = run(tmp_path / "bf16", *common, "precision=bf16")
    finally:
        native_backend.NativeBackend.__init__ = original
    a, b = fp32.iloc[-1], bf16.iloc[-1]
    assert outcome["status"] == "finished"
    assert a.test_acc_pct >= 90.0 and b.test_acc_pct >= 90.0
    assert abs(a.test_acc_pct - b.test_acc_pct) <= 3.0
    assert abs(a.sparsity_pct - b.sparsity_pct) <= 5.0


def test_channels_last_gives_the_same_run(tmp_path):
    _, _, a = run(tmp_path / "a", "model=convnet", "epochs=2", "m=5", "backend=torch")
    _, _, b = run(tmp_path / "b", "model=convnet", "epochs=2", "m=5", "backend=torch", "channels_last=true")
    cols = ["train_loss", "test_acc_pct", "sparsity_pct"]
    pd.testing.assert_frame_equal(a[cols], b[cols], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["mllinbreg", "linbreg"])
def test_compiled_optimizer_gives_the_same_run(tmp_path, method):
    """compile_optimizer=true: the LinBreg update through torch.compile, the same numbers."""
    _, _, a = run(tmp_path / "a", f"method={method}", "epochs=3", "m=5", "backend=torch", "compile_optimizer=false")
    _, _, b = run(tmp_path / "b", f"method={method}", "epochs=3", "m=5", "backend=torch", "compile_optimizer=true")
    cols = ["train_loss", "test_acc_pct", "sparsity_pct", "train_flops_vs_sgd"]
    pd.testing.assert_frame_equal(a[cols], b[cols], rtol=1e-4, atol=1e-4)
    assert a.sparsity_pct.iloc[-1] > 50


@pytest.mark.slow
def test_compiled_forward_gives_the_same_run(tmp_path):
    """compile=true (torch.compile of the forward; ~40 s of compilation on CPU)."""
    _, _, a = run(tmp_path / "a", "model=convnet", "epochs=2", "m=5", "backend=torch")
    _, _, b = run(tmp_path / "b", "model=convnet", "epochs=2", "m=5", "backend=torch", "compile=true")
    cols = ["train_loss", "test_acc_pct", "sparsity_pct"]
    pd.testing.assert_frame_equal(a[cols], b[cols], rtol=1e-3, atol=1e-3)


class _StrictLoader:
    """Wraps the training loader: from the second epoch on (every compiled variant exists
    by then), the body of each training step runs with CUDA's sync debug mode on "error",
    so any host-device synchronization inside a step raises."""

    def __init__(self, loader):
        self.loader, self.epoch = loader, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        strict = self.epoch >= 1
        for batch in self.loader:
            if strict:
                torch.cuda.set_sync_debug_mode("error")
            try:
                yield batch  # the loop body, one training step, runs here
            finally:
                torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["mllinbreg", "linbreg", "sgd"])
def test_cuda_training_steps_never_synchronize(tmp_path, monkeypatch, method):
    import mlbreg.build as train_module  # build() calls make_loader

    real = train_module.make_loader

    def make_loader(**kwargs):
        loader = real(**kwargs)
        return _StrictLoader(loader) if kwargs["shuffle"] else loader

    monkeypatch.setattr(train_module, "make_loader", make_loader)
    _, outcome, metrics = run(tmp_path, "device=cuda", f"method={method}", "epochs=3", "m=5", "lam=0.1")
    assert outcome["status"] == "finished" and len(metrics) == 3
