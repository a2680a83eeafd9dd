"""Runs that survive: kills, signals, sweeps started again, divergence."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from mlbreg.rundir import RunDir
from mlbreg.train import train

from helpers import make_cfg, signal_at_step

ROOT = Path(__file__).resolve().parents[1]
# backend=torch: bitwise equality needs a fixed choice of layers (backend=auto may pick
# SparseProp layers by timing, which agrees only to fp32 tolerance)
KILL_ARGS = ["model=convnet", "epochs=8", "batch_size=32", "backend=torch"]
METHODS = (
    [["method=mllinbreg", "m=10"]]
    + ([["method=rigl", "sparsity=0.9", "init=erk"]] if (ROOT / "conf/method/rigl.yaml").exists() else [])
    + [["method=set", "sparsity=0.9", "init=erk"]]
)  # random regrowth at steps 100 (before the kill) and 200


def mlbreg(*args, cwd, check=True, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "mlbreg", "train", *args, "progress=false"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=check,
        **kw,
    )


def start(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "mlbreg", "train", *args, "progress=false"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("status.json"))


def without_timing(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in df.columns if c.endswith("_s")])


def assert_same_results(a: Path, b: Path):
    pd.testing.assert_frame_equal(
        without_timing(pd.read_csv(a / "metrics.csv")), without_timing(pd.read_csv(b / "metrics.csv"))
    )
    pd.testing.assert_frame_equal(pd.read_csv(a / "layers.csv"), pd.read_csv(b / "layers.csv"))
    ma, mb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def wait_for_rows(path: Path, rows: int, proc, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) > rows:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    raise TimeoutError(path)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m[0])
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, method):
    args = KILL_ARGS + method
    mlbreg(*args, "output_root=ref", cwd=tmp_path)
    proc = start(*args, "output_root=killed", cwd=tmp_path)
    metrics = None
    while metrics is None:  # the run dir's name is not known in advance
        found = list((tmp_path / "killed").rglob("metrics.csv"))
        metrics = found[0] if found else None
        assert proc.poll() is None
        time.sleep(0.005)
    wait_for_rows(metrics, 3, proc)
    time.sleep(0.05)  # land inside the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = len(pd.read_csv(metrics))
    assert rows < 8, "the run finished before it could be killed"
    assert RunDir(metrics.parent).read_status()["status"] == "running"
    mlbreg(*args, "output_root=killed", cwd=tmp_path)
    (ref,), (resumed,) = run_dirs(tmp_path / "ref"), run_dirs(tmp_path / "killed")
    assert ref.relative_to(tmp_path / "ref") == resumed.relative_to(tmp_path / "killed")
    assert RunDir(resumed).read_status()["status"] == "finished"
    assert_same_results(ref, resumed)
    masks = [torch.load(d / "checkpoint.pt", weights_only=False)["method"].get("rigl", {}).get("masks") for d in (ref, resumed)]
    if masks[0] is not None:  # RigL's and SET's masks: the same updates after the resume
        assert all(torch.equal(a, b) for a, b in zip(*masks))


_signal_at_step = signal_at_step


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_epoch_checkpoints_and_resumes_exactly(tmp_path, monkeypatch, signum):
    overrides = ["model=convnet", "epochs=3", "batch_size=64", "m=5", "backend=torch"]  # 23 steps per epoch
    ref = train(make_cfg(*overrides), tmp_path / "ref")
    _signal_at_step(monkeypatch, 30, signum)  # in the middle of epoch 2
    out = train(make_cfg(*overrides), tmp_path / "run")
    assert out["status"] == "interrupted" and out["step"] == 30
    status = RunDir(tmp_path / "run").read_status()
    assert status["status"] == "interrupted" and "rerun to resume" in status["message"]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["position"] == {"epoch": 1, "batch": 7, "step": 30}
    assert len(pd.read_csv(tmp_path / "run" / "metrics.csv")) == 1
    monkeypatch.undo()
    out = train(make_cfg(*overrides), tmp_path / "run")
    assert out["status"] == "finished" and ref["status"] == "finished"
    assert_same_results(tmp_path / "ref", tmp_path / "run")


def test_finished_run_is_skipped_and_resume_false_reruns(tmp_path):
    cfg = make_cfg("epochs=2")
    train(cfg, tmp_path)
    # every file but the lock (taken and released around the check, empty before and after)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir() if p.is_file() and p.name != ".lock"}
    out = train(cfg, tmp_path)
    assert out["status"] == "finished" and out["skipped"]
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir() if p.is_file() and p.name != ".lock"}
    assert before == after  # not recomputed, not even touched
    assert (tmp_path / ".lock").read_bytes() == b""
    out = train(make_cfg("epochs=2", "resume=false"), tmp_path)
    assert out["status"] == "finished"
    assert (tmp_path / "metrics.csv").stat().st_mtime_ns > before["metrics.csv"][1]
    assert len(pd.read_csv(tmp_path / "metrics.csv")) == 2  # replaced, not appended


def test_sweep_rerun_trains_only_interrupted_and_missing_runs(tmp_path):
    common = ["model=convnet", "epochs=3", "output_root=out", "backend=torch"]
    mlbreg("-m", "seed=0,1", *common, cwd=tmp_path)  # two finished runs
    proc = start("seed=2", *common, cwd=tmp_path)  # one interrupted run
    deadline = time.time() + 120
    while not list((tmp_path / "out").rglob("*seed2*/metrics.csv")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM  # checkpointed, then the shell's code for SIGTERM
    (interrupted,) = [d for d in run_dirs(tmp_path / "out") if "seed2" in d.name]
    assert RunDir(interrupted).read_status()["status"] == "interrupted"

    def files(d):  # the run's results: every file but its lock (taken and released by the rerun)
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in d.iterdir() if p.is_file() and p.name != ".lock"}

    finished = {d: files(d) for d in run_dirs(tmp_path / "out") if "seed2" not in d.name}
    assert len(finished) == 2
    result = mlbreg("-m", "seed=0,1,2,3", *common, cwd=tmp_path)
    dirs = run_dirs(tmp_path / "out")
    assert len(dirs) == 4
    assert all(RunDir(d).read_status()["status"] == "finished" for d in dirs)
    for d, before in finished.items():  # byte-identical and untouched
        assert files(d) == before
    metrics = pd.read_csv(interrupted / "metrics.csv")
    assert metrics.epoch.tolist() == [1, 2, 3], result.stderr


def test_divergence_is_recorded_and_the_sweep_goes_on(tmp_path):
    result = mlbreg("-m", "method=sgd", "lr=1e9,0.1", "epochs=3", "output_root=out", cwd=tmp_path, check=False)
    assert result.returncode == 2  # the sweep ran on, and says that a run did not finish
    statuses = {d.name: RunDir(d).read_status() for d in run_dirs(tmp_path / "out")}
    assert len(statuses) == 2
    (diverged,) = [s for s in statuses.values() if s["status"] == "diverged"]
    assert "non-finite training loss first at step" in diverged["message"]
    assert diverged["epoch"] == 1
    assert sorted(s["status"] for s in statuses.values()) == ["diverged", "finished"]
    assert "run diverged" in result.stderr


def test_sigterm_leaves_a_loadable_checkpoint(tmp_path):
    proc = start("model=convnet", "epochs=50", "output_root=out", cwd=tmp_path)
    deadline = time.time() + 120
    while not list((tmp_path / "out").rglob("metrics.csv")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    (run,) = run_dirs(tmp_path / "out")
    status = RunDir(run).read_status()
    assert status["status"] == "interrupted"
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["position"]["step"] == status["step"] > 0
    assert {"model", "method", "scheduler", "flops", "rng"} <= ckpt.keys()


def test_a_signal_ends_the_sweep_and_the_rerun_finishes_it(tmp_path, monkeypatch, capsys):
    from mlbreg.cli import main

    args = ["train", "-m", "seed=0,1,2", "epochs=2", "progress=false", f"output_root={tmp_path}"]
    _signal_at_step(monkeypatch, 5)  # inside the first job (12 steps per epoch)
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 128 + signal.SIGTERM  # the shell's convention for a signal
    runs = sorted((tmp_path / "digits/mlp/mllinbreg").iterdir())
    assert len(runs) == 1 and "seed0" in runs[0].name  # the jobs after it did not start
    status = RunDir(runs[0]).read_status()
    assert status["status"] == "interrupted" and status["signal"] == signal.SIGTERM
    assert status["device"] == "cpu" and status["backend"] in ("torch", "native", "sparseprop")
    monkeypatch.undo()
    capsys.readouterr()
    assert main(args) == 0  # the rerun resumes seed 0 and trains seeds 1 and 2
    out = capsys.readouterr().out
    assert out.count("mlbreg: finished") == 3 and "resumed at step" in out and "test acc" in out
