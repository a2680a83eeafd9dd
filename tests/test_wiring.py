"""Wiring: what a config key asks for reaches the training step of a real `mlbreg.train` run
(the learning-rate schedule, channels_last, the compiled LinBreg update, bf16 autocast), and
the resume refusals that protect a run directory.

The runs are tiny (digits for one to three epochs, or 64 synthetic 3x8x8 images); each test
watches the run from inside, through forward hooks, an optimizer step hook or a spy, rather
than through its end result, which would be the same with the key ignored.
"""

import math
import signal

import pandas as pd
import pytest
import torch
from torch import nn

import mlbreg.loop as loop
from mlbreg.cli import main
from mlbreg.data import load_dataset
from mlbreg.rundir import CHECKPOINT_FORMAT, CheckpointError, RunDir
from mlbreg.train import train

from helpers import make_cfg, signal_at_step

# a conv net on 64 random 3x8x8 images, batches of 32: two training steps in one epoch. Three
# input channels: a 1-channel NCHW batch is also channels_last-contiguous, a 3-channel one is not
TINY_CONV = (
    "dataset=synthetic",
    "dataset.shape=[3,8,8]",
    "dataset.train_size=64",
    "dataset.test_size=32",
    "batch_size=32",
    "model=convnet",
    "epochs=1",
    "backend=torch",
)
TINY_STEPS = 2


def train_watching(tmp_path, monkeypatch, watch, *overrides):
    """Train `overrides` in tmp_path with `watch(model, method)` called on the parts the run builds
    (before the run converts or wraps the model); returns (outcome, metrics.csv)."""
    real_build = loop.build

    def build(cfg, device):
        parts = real_build(cfg, device)
        watch(parts.model, parts.method)
        return parts

    monkeypatch.setattr(loop, "build", build)
    outcome = train(make_cfg(*overrides), tmp_path)
    assert outcome["status"] == "finished"
    return outcome, pd.read_csv(tmp_path / "metrics.csv")


def record_layers(records):
    """A `watch` that appends, for every Conv2d / Linear forward in training mode (evaluation is not
    a training step), what the layer saw: its kind, input and output dtype and memory format."""

    def is_cl(t):
        return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)

    def hook(mod, args, out):
        if mod.training:
            x = args[0]
            records.append(
                dict(
                    kind=type(mod).__name__,
                    x_dtype=x.dtype,
                    out_dtype=out.dtype,
                    w_dtype=mod.weight.dtype,
                    x_cl=is_cl(x),
                    out_cl=is_cl(out),
                    w_cl=is_cl(mod.weight),
                )
            )

    def watch(model, method):
        for mod in model.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.register_forward_hook(hook)

    return watch


# -- the learning-rate schedule ---------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["cosine", "constant"])
def test_lr_column_and_every_step_follow_the_configured_schedule(tmp_path, monkeypatch, scheduler):
    """scheduler=cosine anneals lr to 0 over all steps, per step: step k (from 0) of T runs at
    0.5·lr·(1 + cos(πk/T)), and the epoch row's `lr` is that formula at the row's step (the rate the
    next step gets). scheduler=constant keeps lr. Computed here from the data set's size, not the run's."""
    lr0, epochs, batch = 0.1, 3, 128
    per_epoch = math.ceil(len(load_dataset("digits").train.y) / batch)  # 1437 images: 12 steps
    total = epochs * per_epoch
    seen = []

    def watch(model, method):
        method.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append([g["lr"] for g in opt.param_groups]))

    _, metrics = train_watching(
        tmp_path,
        monkeypatch,
        watch,
        f"epochs={epochs}",
        f"batch_size={batch}",
        f"lr={lr0}",
        f"scheduler={scheduler}",
        "backend=torch",
    )

    def expected(step):
        return 0.5 * lr0 * (1 + math.cos(math.pi * step / total)) if scheduler == "cosine" else lr0

    assert metrics.step.tolist() == [per_epoch * e for e in range(1, epochs + 1)]
    assert metrics.lr.tolist() == pytest.approx([expected(s) for s in metrics.step], rel=1e-6, abs=1e-12)
    assert len(seen) == total
    for k, lrs in enumerate(seen):  # every param group (weights, biases) at the same rate
        assert lrs == pytest.approx([expected(k)] * len(lrs), rel=1e-6), f"step {k}"
    if scheduler == "cosine":
        assert metrics.lr.iloc[-1] == pytest.approx(0, abs=1e-12) and seen[0][0] == lr0


# -- channels_last, bf16 ----------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_reaches_the_activations_of_a_training_step(tmp_path, monkeypatch, channels_last):
    """channels_last=true: inside the training steps every conv gets its input and weight in
    channels_last memory format and hands on a channels_last output; channels_last=false: none of
    them is (3 input channels, so an NCHW batch is not channels_last by accident)."""
    records = []
    train_watching(tmp_path, monkeypatch, record_layers(records), *TINY_CONV, f"channels_last={channels_last}")
    convs = [r for r in records if r["kind"] == "Conv2d"]
    assert len(convs) == 3 * TINY_STEPS  # three convs per step
    for key in ("x_cl", "w_cl", "out_cl"):
        assert [r[key] for r in convs] == [channels_last] * len(convs), key


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_bf16_autocast_reaches_the_layers_of_a_training_step(tmp_path, monkeypatch, precision):
    """precision=bf16: every conv and linear layer of a training step computes in bf16 (autocast)
    on fp32 weights; precision=fp32: every one computes in fp32."""
    records = []
    train_watching(tmp_path, monkeypatch, record_layers(records), *TINY_CONV, f"precision={precision}")
    assert sorted({r["kind"] for r in records}) == ["Conv2d", "Linear"] and len(records) == 4 * TINY_STEPS
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert {r["out_dtype"] for r in records} == {dtype}
    assert {r["w_dtype"] for r in records} == {torch.float32}  # the weights stay fp32


# -- the compiled LinBreg update --------------------------------------------------------------


@pytest.mark.parametrize("compile_optimizer", [True, False])
def test_compile_optimizer_runs_the_update_through_torch_compile(tmp_path, monkeypatch, compile_optimizer):
    """compile_optimizer=true: the optimizer compiles its update once and every step after the
    first (which creates the momentum buffers, eagerly) runs the compiled function, once per param
    group (prunable weights, the rest), coarse steps included; false: torch.compile is never called."""
    real_compile = torch.compile
    spy = dict(compiles=0, calls=0)

    def spying_compile(fn, *args, **kwargs):
        spy["compiles"] += 1
        compiled = real_compile(fn, *args, **kwargs)

        def counted(*a, **kw):
            spy["calls"] += 1
            return compiled(*a, **kw)

        return counted

    monkeypatch.setattr(torch, "compile", spying_compile)
    groups = []
    _, metrics = train_watching(
        tmp_path,
        monkeypatch,
        lambda model, method: groups.append(len(method.optimizer.param_groups)),
        "epochs=1",
        "m=5",
        "backend=torch",
        f"compile_optimizer={compile_optimizer}",
    )
    steps = int(metrics.step.iloc[-1])
    assert steps == 12 and groups == [2] and metrics.coarse_steps.iloc[-1] > 0
    if compile_optimizer:
        assert spy == dict(compiles=1, calls=2 * (steps - 1))
    else:
        assert spy == dict(compiles=0, calls=0)


# -- refusals that leave the run directory as it was ------------------------------------------


def files(run):
    """Every file of the run (bytes, mtime), but its lock (taken and released around the attempt)
    and Hydra's record of the latest command line (.hydra/, written by Hydra before any job)."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir() if p.is_file() and p.name != ".lock"}


interrupt_at_step = signal_at_step


def test_a_checkpoint_of_another_config_is_refused_and_left_alone(tmp_path, capsys):
    """A run directory whose checkpoint another config wrote (here: another λ, pointed at the same
    directory with hydra.run.dir) is refused with the run keys and the way out: exit code 2, one
    line of mlbreg's, no traceback; no file of the run changes."""
    run = tmp_path / "run"
    common = ["epochs=2", "backend=torch", f"hydra.run.dir={run}", "progress=false"]
    assert main(["train", *common]) == 0
    before = files(run)
    key = RunDir(run).read_status()["run_key"]
    capsys.readouterr()
    assert main(["train", *common, "lam=0.05"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.splitlines()[-1]  # after Hydra's "Error executing job with overrides: [...]"
    assert last.startswith(
        f"mlbreg: checkpoint {run / 'checkpoint.pt'} belongs to a different config or mlbreg "
        f"version (run key {key!r}, expected "
    )
    assert last.endswith("Start fresh with resume=false.")
    assert files(run) == before
    # the same refusal from the library call, for the same reason
    with pytest.raises(CheckpointError, match="belongs to a different config"):
        train(make_cfg("epochs=2", "backend=torch", "lam=0.05"), run)
    assert files(run) == before


@pytest.mark.parametrize("written", [None, 1, 3], ids=["no-format", "older", "newer"])
def test_a_checkpoint_of_another_format_is_refused_and_left_alone(tmp_path, monkeypatch, capsys, written):
    """An interrupted run whose checkpoint carries another layout's format number (or none: an older
    mlbreg's, or a hand-edited file) is refused on resume by the one upgrade function, naming the file, the
    format and `resume=false`: exit code 2, one line, no traceback; no file of the run changes."""
    run = tmp_path / "run"
    common = ["epochs=2", "m=5", "method.criterion=adaptive", "backend=torch", f"hydra.run.dir={run}", "progress=false"]
    interrupt_at_step(monkeypatch, 15)  # in epoch 2 (12 steps per epoch)
    with pytest.raises(SystemExit) as stop:
        main(["train", *common])
    assert stop.value.code == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert RunDir(run).read_status()["status"] == "interrupted"
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT == 2
    if written is None:
        del ckpt["format"]
    else:
        ckpt["format"] = written
    torch.save(ckpt, run / "checkpoint.pt")
    before = files(run)
    capsys.readouterr()
    assert main(["train", *common]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    age = "a newer" if written == 3 else "an older"
    assert err.splitlines()[-1] == (
        f"mlbreg: checkpoint {run / 'checkpoint.pt'} has format {written or 1}, written by "
        f"{age} mlbreg; this one reads format 2 only. Start this run fresh with "
        "resume=false, or resume it with the mlbreg that wrote it."
    )
    assert files(run) == before
    assert RunDir(run).read_status()["status"] == "interrupted"
