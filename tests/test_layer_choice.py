"""The timed layer choices of the CPU sparse backends are reproducible: keyed by a fixed bin of support
sizes, timed once per machine (the machine's record, backends/choice_store.py) and restored from a
checkpoint, so two launches of one command, and a killed + resumed run, compute the same numbers."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from mlbreg.backends.choice import LayerChoice
from mlbreg.backends.choice_store import ChoiceStore, default_store
from mlbreg.backends.native import build as native_build

from helpers import make_cfg, signal_at_step

pytestmark = pytest.mark.skipif(
    native_build.unavailable_reason() is not None, reason="the native kernels are not available here"
)

RUN = ["model=convnet", "epochs=2", "batch_size=64", "m=5", "device=cpu", "checkpoint_every=0"]


def test_store_times_once_and_concurrent_callers_wait_for_that_timing(tmp_path):
    """Two callers of one key (threads, each with its own open file: flock excludes them as it excludes
    two processes): the first times, the second waits for it and reads its entry without timing."""
    path = tmp_path / "record.json"
    calls, results = [], {}

    def slow_timing(name):
        def time_now():
            calls.append(name)
            time.sleep(0.3)
            return dict(mode="native", why=f"timed by {name}")

        return time_now

    def caller(name):
        results[name] = ChoiceStore(path).get_or_time("k", slow_timing(name))

    threads = [threading.Thread(target=caller, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert calls == ["a"]
    assert results["a"] == (dict(mode="native", why="timed by a"), True)
    assert results["b"] == (dict(mode="native", why="timed by a"), False)
    assert json.loads(path.read_text()) == {"k": dict(mode="native", why="timed by a")}


def test_unreadable_store_is_set_aside_with_a_note(tmp_path, capsys):
    """A record that is not a JSON object is moved to *.bad (never executed, never silently reused)."""
    path = tmp_path / "record.json"
    path.write_text("[1, 2")
    entry, timed = ChoiceStore(path).get_or_time("k", lambda: dict(mode=None))
    assert timed and entry == dict(mode=None)
    assert path.with_suffix(".bad").read_text() == "[1, 2"
    assert "unreadable" in capsys.readouterr().err and json.loads(path.read_text()) == {"k": dict(mode=None)}


def test_store_location_and_off(monkeypatch, tmp_path):
    """$MLBREG_CHOICE_CACHE names the folder of the record; `off` disables it."""
    monkeypatch.setenv("MLBREG_CHOICE_CACHE", str(tmp_path))
    store = default_store()
    assert store.path.parent == tmp_path and torch.__version__.replace("+", "_") in store.path.name
    monkeypatch.setenv("MLBREG_CHOICE_CACHE", "off")
    assert default_store() is None


class _Layer:
    """The attributes of a SwapLayer a LayerChoice key reads."""

    def __init__(self, nnz):
        self.module = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.kind, self.in_shape, self.in_grad, self.nnz, self.name = "conv", (4, 8, 8), True, nnz, "c"


def test_bins_depend_on_the_support_size_only():
    """The bin of a support size is fixed (log grid of width 1 + bucket), whatever was timed before: sizes
    within one bin share a choice, a size two bins away does not."""
    choice = LayerChoice(bucket=0.1, context="ctx")
    key = {n: choice.key(_Layer(n), 16) for n in (1000, 1020, 1300)}
    assert key[1000] == key[1020] != key[1300]
    assert key[1000].startswith("ctx | threads ") and "conv 4->8 3x3 s1 p1 in 4x8x8 grad=1" in key[1000]
    timed = []

    def time_layer(layer):
        timed.append(layer.nnz)
        return "native", "timed", {}

    for n in (1020, 1000, 1300, 1020):
        choice.choose(_Layer(n), 16, None, time_layer)
    assert timed == [1020, 1300]


def test_record_is_obeyed_by_a_later_backend(tmp_path):
    """A second backend on the same machine record makes the recorded choices without timing, even where
    they contradict what it would time (the record's entries are planted the other way round)."""
    from test_backend_native import sparse_model

    from mlbreg.backends.native.backend import NativeBackend

    store = ChoiceStore(tmp_path / "record.json")
    first = NativeBackend(
        sparse_model(density=0.05), batch_size=16, in_shape=(2, 16, 16), repeats=1, warmup=0, choice_store=store
    )
    first.before_step("sparse")
    assert first.timing_seconds > 0
    assert all(r["decided_by"].startswith("timed in this run, recorded in") for r in first.summary())
    _plant_opposite(store.path)
    second = NativeBackend(
        sparse_model(density=0.05),
        batch_size=16,
        in_shape=(2, 16, 16),
        repeats=1,
        warmup=0,
        choice_store=store,
        min_speedup=1.05,
    )
    second.before_step("sparse")
    assert second.timing_seconds == 0
    timed = {r["layer"]: r["choice"] for r in first.summary() if r["decided_by"] != "ineligible"}
    again = {r["layer"]: r for r in second.summary() if r["layer"] in timed}
    assert len(timed) >= 2 and all(r["decided_by"] == f"the machine's record {store.path}" for r in again.values())
    assert all(again[name]["choice"] != choice for name, choice in timed.items()), (timed, again)


def _plant_opposite(path: Path, keys=None) -> None:
    """Rewrite the record's entries (those of `keys`; None: all) to the opposite choice, with timings that
    make it clear-cut (the native backend settles its choices from the timings)."""
    entries = json.loads(path.read_text())
    for key, entry in entries.items():
        if keys is None or key in keys:
            native = not entry["mode"]
            entry.update(mode="native" if native else None, why="planted")
            entry["timings"].update(
                dense_ms=100.0 if native else 1.0, native_ms=1.0 if native else 100.0, dense_ctx_ms=100.0 if native else 1.0
            )
    path.write_text(json.dumps(entries))


def _same_numbers(a: Path, b: Path) -> None:
    from test_resume import assert_same_results

    assert_same_results(a, b)


def _burn_cpu(n=2):
    """Processes that keep the cores busy (another user's job on the machine)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


@pytest.mark.parametrize("backend", ["native", "auto"])
def test_two_launches_identical_also_under_load(tmp_path, monkeypatch, backend):
    """`mlbreg train` launched twice with one seed on a conv model gives identical rows, layers and weights;
    the second launch runs while two other processes load both cores and takes every layer choice
    from the machine's record (env.json says so)."""
    monkeypatch.setenv("MLBREG_CHOICE_CACHE", str(tmp_path / "record"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "mlbreg", "train", *RUN, "epochs=1", f"backend={backend}", "progress=false"]
    subprocess.run([*cmd, "output_root=first"], cwd=tmp_path, env=env, check=True, capture_output=True)
    burners = _burn_cpu()
    try:
        subprocess.run([*cmd, "output_root=second"], cwd=tmp_path, env=env, check=True, capture_output=True)
    finally:
        for p in burners:
            p.kill()
    (first,), (second,) = [[p.parent for p in (tmp_path / d).rglob("status.json")] for d in ("first", "second")]
    _same_numbers(first, second)
    for run, decided in ((first, "timed in this run, recorded in"), (second, "the machine's record")):
        env_json = json.loads((run / "env.json").read_text())
        timed = [c for c in env_json["layer_choices"] if c["decided_by"] != "ineligible"]
        assert timed and all(c["decided_by"].startswith(decided) for c in timed), env_json["layer_choices"]
        assert env_json["layer_choice_record"].startswith(str(tmp_path / "record"))


def test_killed_and_resumed_native_run_with_timed_choices_is_identical(tmp_path, monkeypatch):
    """A native run with timed (not forced) layer choices, stopped by SIGTERM inside a coarse cycle and
    resumed, equals the uninterrupted run bit for bit. The resume runs on a machine record planted with the
    opposite choices: only the choices restored from the checkpoint give the same numbers."""
    from mlbreg.flops import FlopsAccount
    from mlbreg.train import train

    record = tmp_path / "record"
    monkeypatch.setenv("MLBREG_CHOICE_CACHE", str(record))
    overrides = [*RUN, "epochs=3", "backend=native"]
    ref = train(make_cfg(*overrides), tmp_path / "ref")
    original = signal_at_step(monkeypatch, 33)  # a coarse step of epoch 2 (23 steps per epoch)
    assert train(make_cfg(*overrides), tmp_path / "run")["status"] == "interrupted"
    monkeypatch.setattr(FlopsAccount, "add_step", original)
    planted = tmp_path / "planted"
    shutil.copytree(record, planted)
    (path,) = planted.glob("*.json")
    restored = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["backend"]["decisions"]
    assert restored
    _plant_opposite(path, keys=set(restored))
    monkeypatch.setenv("MLBREG_CHOICE_CACHE", str(planted))
    out = train(make_cfg(*overrides), tmp_path / "run")
    assert out["status"] == "finished" and ref["status"] == "finished"
    _same_numbers(tmp_path / "ref", tmp_path / "run")
    choices = json.loads((tmp_path / "run" / "env.json").read_text())["layer_choices"]
    assert any(c["decided_by"] == "restored from the run's checkpoint" for c in choices), choices
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics["coarse_steps"].iloc[-1] > 0
