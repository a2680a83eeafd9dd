"""The research workflow around a run: returned metrics, env.json, the
prune_finetune default, and submitit's timeout signal."""

import json
import os
import signal

import pandas as pd
import pytest
import torch
from hydra.experimental.callback import Callback

from mlbreg.cli import main
from mlbreg.env import COMPARED_FIELDS
from mlbreg.flops import FlopsAccount
from mlbreg.rundir import RunDir
from mlbreg.train import train

from helpers import make_cfg

RETURNS = []


class GrabReturn(Callback):
    """A Hydra callback, as a sweeper or a user's callback sees the job's return value."""

    def on_job_end(self, config, job_return, **kwargs):
        RETURNS.append(job_return.return_value)


def test_hydra_job_returns_the_final_metrics(tmp_path):
    RETURNS.clear()
    code = main(
        [
            "train",
            "epochs=2",
            f"output_root={tmp_path}",
            "progress=false",
            "+hydra.callbacks.grab._target_=test_workflow.GrabReturn",
        ]
    )
    assert code == 0
    (value,) = RETURNS
    (run_dir,) = [p.parent for p in tmp_path.rglob("status.json")]
    last = pd.read_csv(run_dir / "metrics.csv").iloc[-1]
    assert value["status"] == "finished" and value["run_dir"] == str(run_dir)
    assert value["test_acc_pct"] == last["test_acc_pct"] and value["sparsity_pct"] == last["sparsity_pct"]
    assert value["epoch"] == 2


def test_env_json_records_code_libraries_and_machine(tmp_path):
    train(make_cfg("epochs=1"), tmp_path)
    env = json.loads((tmp_path / "env.json").read_text())
    for field in COMPARED_FIELDS + ("packages", "hostname", "started", "cpu_count"):
        assert field in env, field
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["threads"] == 1
    assert env["packages"]["torch"] == torch.__version__.split("+")[0] or env["packages"]["torch"] == torch.__version__
    assert "mlbreg" in env["packages"]
    # this test runs from the project's git checkout
    assert len(env["git_commit"]) == 40 and isinstance(env["git_dirty"], bool)
    assert env["earlier"] == []


def test_env_json_keeps_an_earlier_attempts_environment_when_it_differs(tmp_path):
    cfg = make_cfg("epochs=2", "checkpoint_every=1")
    with pytest.MonkeyPatch.context() as mp:
        _stop_at_step(mp, 15)
        assert train(cfg, tmp_path)["status"] == "interrupted"
    env = json.loads((tmp_path / "env.json").read_text())
    env["torch"] = "0.0.1-older"
    (tmp_path / "env.json").write_text(json.dumps(env))
    assert train(cfg, tmp_path)["status"] == "finished"
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["torch"] == torch.__version__
    assert [e["torch"] for e in env["earlier"]] == ["0.0.1-older"]


def _stop_at_step(mp, step, signum=signal.SIGTERM):
    """Fault injection: deliver `signum` to this process while step `step` runs."""
    if step is None:
        return
    original = FlopsAccount.add_step
    count = {"n": 0}

    def add_step(self, kind, batch, *structure):
        count["n"] += 1
        if count["n"] == step:
            os.kill(os.getpid(), signum)
        return original(self, kind, batch, *structure)

    mp.setattr(FlopsAccount, "add_step", add_step)


def test_prune_finetune_default_is_a_fraction_so_short_runs_work(tmp_path):
    out = train(make_cfg("method=prune_finetune", "sparsity=0.9", "epochs=6"), tmp_path)
    assert out["status"] == "finished"
    rows = pd.read_csv(tmp_path / "metrics.csv")
    # 0.1 of 6 epochs rounds to 1 fine-tuning epoch: dense for 5 epochs (pruned after the
    # 5th epoch's row), 90% (exactly round(0.9 N) zeros) in the 6th
    assert len(rows) == 6 and (rows["sparsity_pct"].iloc[:5] < 1).all()
    assert rows["sparsity_pct"].iloc[5] == pytest.approx(90.0, abs=0.01)


def test_prune_finetune_absolute_epochs_still_work(tmp_path):
    train(make_cfg("method=prune_finetune", "sparsity=0.9", "epochs=4", "method.finetune_epochs=2"), tmp_path)
    rows = pd.read_csv(tmp_path / "metrics.csv")
    assert (rows["sparsity_pct"].iloc[:2] < 1).all()
    assert rows["sparsity_pct"].iloc[2:].to_numpy() == pytest.approx([90.0, 90.0], abs=0.01)


def test_sigusr2_checkpoints_mid_epoch_like_sigterm(tmp_path, monkeypatch):
    cfg = make_cfg("epochs=3", "m=5")  # digits: 12 steps per epoch
    _stop_at_step(monkeypatch, 17, signal.SIGUSR2)
    out = train(cfg, tmp_path)
    assert out["status"] == "interrupted" and out["signal"] == signal.SIGUSR2 and out["step"] == 17
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["position"] == {"epoch": 1, "batch": 5, "step": 17}
    monkeypatch.undo()
    assert train(cfg, tmp_path)["status"] == "finished"


def test_sigusr2_goes_on_to_submitits_handler_after_the_checkpoint(tmp_path, monkeypatch):
    """submitit installs a SIGUSR2 handler that requeues the Slurm job and exits: it must
    still run, but only once the step's checkpoint is on disk."""
    seen = []

    def submitit_like(signum, frame):
        ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
        seen.append((signum, ckpt["position"]["step"], RunDir(tmp_path).read_status()["status"]))
        raise SystemExit(-1)  # what submitit does after requeueing

    previous = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        _stop_at_step(monkeypatch, 17, signal.SIGUSR2)
        with pytest.raises(SystemExit):
            train(make_cfg("epochs=3", "m=5"), tmp_path)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [(signal.SIGUSR2, 17, "interrupted")]


def _tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_logger_writes_the_csv_rows_and_a_resume_purges_the_rest(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    cfg = make_cfg("epochs=4", "checkpoint_every=2", "logger=tensorboard")  # digits: 12 steps per epoch
    original = FlopsAccount.add_step
    count = {"n": 0}

    def crash_at_step_40(self, kind, batch, *structure):
        count["n"] += 1
        if count["n"] == 40:  # epoch 4: epoch 3's row (step 36) is logged, the checkpoint is at step 24
            raise RuntimeError("node lost")
        return original(self, kind, batch, *structure)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FlopsAccount, "add_step", crash_at_step_40)
        with pytest.raises(RuntimeError, match="node lost"):
            train(cfg, tmp_path)
    assert [s for s, _ in _tensorboard_scalars(tmp_path / "tensorboard")["metrics/train_loss"]] == [12, 24, 36]
    assert train(cfg, tmp_path)["status"] == "finished"  # resumes at step 24
    rows = pd.read_csv(tmp_path / "metrics.csv")
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    assert rows["step"].tolist() == [12, 24, 36, 48]
    for column in ("test_acc_pct", "train_loss", "sparsity_pct", "model_bytes_sparse"):
        assert scalars[f"metrics/{column}"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in zip(rows["step"], rows[column])], (
            column
        )


def test_logger_tensorboard_is_not_part_of_the_run_identity():
    from mlbreg.config import run_name

    assert run_name(make_cfg("logger=tensorboard")) == run_name(make_cfg())


def test_bad_logger_names_the_valid_ones():
    from mlbreg.config import ConfigError, validate

    with pytest.raises(ConfigError, match="invalid logger='wandb'.*csv, tensorboard"):
        validate(make_cfg("logger=wandb"))
