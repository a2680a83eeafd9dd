"""`mlbreg bench`'s timing rounds: the stopping rule, the order, the spread and its warning (pure
logic on injected timing series, no timed assertions), and real runs of the command on a tiny run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlbreg import bench_rounds
from mlbreg.bench_rounds import RoundOptions, decide, round_order, run_rounds, stat, time_call, warning_lines
from mlbreg.cli import main
from mlbreg.train import train

from helpers import make_cfg

ROOT = Path(__file__).resolve().parents[1]
OPTS = RoundOptions(min_rounds=3, max_rounds=15, max_seconds=60.0, max_spread=0.10)


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _series_measure(series: dict, clock: FakeClock | None = None, step: float = 0.0):
    """measure(label, b) returning the next value of series[(label, b)] (its last one once used up)."""
    calls: dict = {}

    def measure(label, b):
        i = calls[(label, b)] = calls.get((label, b), -1) + 1
        values = series[(label, b)]
        if clock is not None:
            clock.now += step
        return values[min(i, len(values) - 1)]

    return measure


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 1-epoch digits MLP run (torch backend for a fast training; bench builds its own)."""
    threads = torch.get_num_threads()
    path = tmp_path_factory.mktemp("bench_run")
    try:
        outcome = train(make_cfg("num_threads=1", "epochs=1", "backend=torch", "model.hidden=[32]"), path)
    finally:
        torch.set_num_threads(threads)
    assert outcome["status"] == "finished"
    return path


def test_decide_waits_for_min_rounds_then_stops_on_small_spreads():
    """Below min_rounds decide always continues; with every spread <= max_spread it stops, naming why;
    one spread above it keeps the loop going."""
    steady = {("dense", 1): [1.00, 1.01, 0.99], ("native", 1): [2.0, 2.02, 1.98]}
    assert decide({k: v[:2] for k, v in steady.items()}, 2, 0.0, OPTS) is None
    assert "every spread <= 10%" in decide(steady, 3, 0.0, OPTS)
    noisy = {**steady, ("native", 1): [2.0, 6.0, 2.1]}
    assert decide(noisy, 3, 0.0, OPTS) is None


def test_rounds_stop_early_when_spreads_are_small():
    """Steady series: the loop stops after exactly min_rounds; one disturbed round (10x) keeps it going
    until the median and the quartiles no longer see it (5 rounds), and the median ignores it."""
    steady = {("dense", 1): [1e-3], ("native", 1): [2e-3]}
    per_round, reason = run_rounds(_series_measure(steady), ["dense", "native"], [1], OPTS, clock=FakeClock())
    assert [len(v) for v in per_round.values()] == [3, 3] and "every spread" in reason
    disturbed = {**steady, ("dense", 1): [1e-3, 10e-3, 1e-3]}
    per_round, reason = run_rounds(_series_measure(disturbed), ["dense", "native"], [1], OPTS, clock=FakeClock())
    assert len(per_round[("dense", 1)]) == 5 and "after 5 rounds" in reason
    assert stat(per_round[("dense", 1)]).median == 1e-3


def test_rounds_stop_at_the_caps_when_spreads_stay_large():
    """A series alternating 1 ms / 3 ms never settles: the loop stops at max_rounds; with a clock
    passing 10 s per timing it stops at the time cap, but never before min_rounds."""
    noisy = {("dense", 1): [1e-3, 3e-3] * 20, ("native", 1): [2e-3]}
    per_round, reason = run_rounds(_series_measure(noisy), ["dense", "native"], [1], OPTS, clock=FakeClock())
    assert len(per_round[("dense", 1)]) == 15 and "cap of 15 rounds" in reason
    clock = FakeClock()
    opts = RoundOptions(min_rounds=3, max_rounds=15, max_seconds=25.0, max_spread=0.10)
    per_round, reason = run_rounds(_series_measure(noisy, clock, step=10.0), ["dense", "native"], [1], opts, clock)
    assert len(per_round[("dense", 1)]) == 3 and "cap of 25 s" in reason


def test_order_rotates_so_no_backend_always_follows_another():
    """Every (round, batch size) group times each backend once, every backend leads some group, and
    within the groups none always runs right after the same other backend (a plain rotation would
    keep B after A)."""
    labels = ["dense", "native", "sparseprop"]
    stream = []

    def measure(label, b):
        stream.append((label, b))
        return 1e-3

    opts = RoundOptions(min_rounds=6, max_rounds=6)
    run_rounds(measure, labels, [1, 128], opts, clock=FakeClock())
    groups = [stream[i : i + 3] for i in range(0, len(stream), 3)]
    assert len(groups) == 12 and all(sorted(lab for lab, _ in g) == labels for g in groups)
    assert all(len({b for _, b in g}) == 1 for g in groups)
    assert {g[0][0] for g in groups} == set(labels)
    for label in labels:
        before = {g[i - 1][0] for g in groups for i in range(1, 3) if g[i][0] == label}
        assert len(before) == 2, (label, before)
    assert round_order(labels, 0) != round_order(labels, 1) and round_order([], 3) == []


def test_warning_names_every_timing_whose_spread_is_large():
    """An injected series with a large spread gets a WARNING line naming it, its spread and the
    threshold, and telling to rerun with more rounds; a steady one gets none."""
    stats = {("dense", 1): stat([0.29e-3, 0.30e-3, 12.4e-3, 0.28e-3]), ("native", 1): stat([1e-3, 1.01e-3, 0.99e-3])}
    lines = warning_lines(stats, 0.10)
    assert len(lines) == 1, lines
    assert lines[0].startswith("WARNING: dense batch 1: spread ") and "above 10%" in lines[0]
    assert "machine was busy" in lines[0] and "more rounds" in lines[0]
    assert stat([5e-3]).iqr == 0.0 and stat([1.0, 3.0, 2.0]).iqr == 1.0


def test_warm_up_calls_are_not_timed():
    """Slow first calls (a thread pool waking up: 3 x 5 ms) fall in the untimed warm-up, which lasts
    `warmup` seconds, not one call; the result is the steady per-call time. The fake function
    advances a fake clock by its cost."""
    clock = FakeClock()
    costs = iter([5e-3] * 3 + [1e-4] * 100000)

    def fn():
        clock.now += next(costs)

    assert time_call(fn, min_run_time=0.01, warmup=0.02, clock=clock) == pytest.approx(1e-4)


def test_bench_warns_on_an_injected_noisy_series(tiny_run, monkeypatch, capsys):
    """The command's output with injected per-round times (the real round loop and stopping rule):
    the spread column, a '!' and a WARNING line for the noisy timing only, its median over rounds
    unmoved by the disturbed round."""
    series = {("dense", 1): [0.29e-3, 12.39e-3, 0.30e-3], ("native", 1): [0.70e-3, 0.71e-3, 0.69e-3]}
    real_run_rounds = bench_rounds.run_rounds
    monkeypatch.setattr(
        bench_rounds,
        "run_rounds",
        lambda measure, labels, batch_sizes, opts: real_run_rounds(_series_measure(series), labels, batch_sizes, opts),
    )
    assert (
        main(["bench", str(tiny_run), "--batch-sizes", "1", "--threads", "1", "--backends", "native", "--max-rounds", "3"]) == 0
    )
    out = capsys.readouterr().out
    assert "3 interleaved rounds (cap of 3 rounds reached" in out
    rows = {c[0]: c for c in (line.split() for line in out.splitlines()) if c[1:2] == ["1"]}
    assert rows["dense"][2] == "0.3000" and rows["dense"][4].endswith("!")
    assert rows["native"][2] == "0.7000" and rows["native"][4] == "1.4%" and rows["native"][5] == "2.33x"
    warnings = [line for line in out.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "WARNING: dense batch 1: spread" in warnings[0]


def test_threads_are_set_once_and_not_during_the_timing(tiny_run, monkeypatch, capsys):
    """Real timings: torch.set_num_threads is never called between the first and the last timing
    (building the sparse models may call it before), and once after them (restoring the caller's)."""
    events = []
    real_set, real_time_call = torch.set_num_threads, bench_rounds.time_call
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (events.append("set"), real_set(n)))
    monkeypatch.setattr(
        bench_rounds, "time_call", lambda fn, t: (events.append("time"), real_time_call(fn, t, warmup=0.001))[1]
    )
    assert (
        main(
            [
                "bench",
                str(tiny_run),
                "--batch-sizes",
                "1",
                "--threads",
                "1",
                "--min-run-time",
                "0.002",
                "--backends",
                "native",
                "--rounds",
                "2",
            ]
        )
        == 0
    )
    timed = [i for i, e in enumerate(events) if e == "time"]
    assert len(timed) == 4 and "set" not in events[timed[0] : timed[-1]]
    assert events[timed[-1] + 1 :] == ["set"]  # after the timings: only the restore at the end


def test_round_options_are_checked(tiny_run, capsys):
    """One round has no spread, and a cap below the minimum cannot hold: both are refused (exit 2)."""
    for args in (["--rounds", "1"], ["--min-rounds", "5", "--max-rounds", "4"], ["--max-spread", "0"]):
        assert main(["bench", str(tiny_run), *args]) == 2
        assert "mlbreg bench: " in capsys.readouterr().err


def test_python_m_mlbreg_bench_on_a_tiny_run(tiny_run):
    """`python -m mlbreg bench` on a real digits run: exit 0, the new columns, the rounds line and a
    row for every backend that runs here at both batch sizes (or its "not run" line)."""
    from mlbreg.backends import sparseprop_available
    from mlbreg.backends.native import unavailable_reason

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlbreg",
            "bench",
            str(tiny_run),
            "--batch-sizes",
            "1,2",
            "--threads",
            "1",
            "--min-run-time",
            "0.01",
            "--max-rounds",
            "3",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    header = next(line for line in out.splitlines() if line.split()[:2] == ["backend", "batch"])
    assert header.split()[2:7] == ["median", "ms", "IQR", "ms", "spread"]
    assert "interleaved rounds (" in out and "spread: IQR / median (warning above 10%)" in out
    rows = {(c[0], c[1]): c for c in (line.split() for line in out.splitlines()) if len(c) > 6}
    available = {"native": unavailable_reason() is None, "sparseprop": sparseprop_available()}
    for name in ["dense"] + [n for n, ok in available.items() if ok]:
        for b in ("1", "2"):
            assert rows[(name, b)][4].rstrip("!").endswith("%"), out
    for name in (n for n, ok in available.items() if not ok):
        assert f"{name}: not run: " in out
    for (name, b), cols in rows.items():
        if name in available and cols[4].endswith("!"):
            assert f"WARNING: {name} batch {b}: spread" in out
