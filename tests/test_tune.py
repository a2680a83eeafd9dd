"""mlbreg tune: λ for a target sparsity."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from mlbreg.cli import main
from mlbreg.config import run_name
from mlbreg.rundir import RunDir
from mlbreg.tune import probe_config, search, tune

from helpers import make_cfg

# digits, 5 epochs of 12 steps; backend=torch: probes are then bit-reproducible
TUNE_ARGS = ["epochs=5", "backend=torch"]


def logistic(a, b, ceiling=1.0):
    """A sparsity curve: ceiling * sigmoid(a log λ + b), the shape LinBreg's runs follow."""
    return lambda lam: ceiling / (1 + math.exp(-(a * math.log(lam) + b)))


TARGETS = (0.5, 0.9, 0.95, 0.99)
# the probes the search takes on each curve, per target in TARGETS (of the 12 allowed): bracketing
# by secant-sized steps and regula falsi. Bisection with plain x4 bracketing would need
# 5, 7, 5, 5 / 12+, 8, 5, 2 / 12+, 7, 12, 9 / 7, 4, 6, 10 on these (12+: not reached in 12)
PROBES = {
    (1.0, 3.0, 0.03): (3, 7, 3, 3),
    (0.3, 4.0, 1.0): (5, 5, 3, 2),
    (3.0, -2.0, 1e-3): (6, 5, 5, 5),
    (0.25, 2.0, 0.03): (3, 3, 4, 5),
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("a, b, lam0", list(PROBES))
def test_search_reaches_the_target_within_a_few_probes(target, a, b, lam0):
    """On logistic sparsity curves the search reaches every target within the tolerance, never
    probes a λ twice, is deterministic, and takes no more probes than it does today (PROBES)."""
    calls = []
    f = logistic(a, b)

    def probe(lam):
        calls.append(lam)
        return f(lam)

    found = search(probe, lam0, target, tolerance=0.005, max_probes=12, lam_min=1e-12, lam_max=1e12)
    assert found["reached"], found
    assert abs(found["sparsity"] - target) <= 0.005 and found["sparsity"] == f(found["lam"])
    assert len(calls) == len(set(calls))  # no λ probed twice
    assert len(calls) <= PROBES[(a, b, lam0)][TARGETS.index(target)]
    assert search(lambda lam: f(lam), lam0, target, lam_min=1e-12, lam_max=1e12) == found  # deterministic


def test_search_reports_a_saturating_curve_as_unreachable_with_the_closest_probe():
    f = logistic(1.0, 3.0, ceiling=0.9)  # never sparser than 90%
    found = search(f, 0.03, 0.95, max_probes=12)
    assert not found["reached"] and ("out of reach" in found["reason"] or "exceed" in found["reason"])
    assert found["sparsity"] == max(s for _, s in found["probes"])


def test_search_stops_on_a_jump_across_the_target():
    found = search(lambda lam: 0.9 if lam < 0.1 else 0.99, 0.03, 0.95, max_probes=40)
    assert not found["reached"] and len(found["probes"]) < 40
    assert {s for _, s in found["probes"]} == {0.9, 0.99}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    cfg = make_cfg(*TUNE_ARGS, f"output_root={root}")
    lines = []
    return root, tune(cfg, 0.95, root / "tune", max_probes=8, echo=lines.append), lines


def test_tune_on_digits_lands_within_half_a_point_of_the_target(reference):
    root, result, lines = reference
    # 4 probes today (λ = 0.03, 0.0075, 1.172e-4, 2.93e-5: the third a secant-sized step of 64x);
    # plain x4 steps need 6 of the 8 allowed
    assert result["status"] == "finished" and result["probes"] <= 4
    assert abs(result["sparsity_pct"] - 95.0) <= 0.5
    # the chosen probe is an ordinary run, where `mlbreg train lam=<λ>` puts it
    cfg = make_cfg(*TUNE_ARGS, f"output_root={root}", f"lam={result['lam']}")
    assert result["run_dir"] == str(root / run_name(cfg))
    assert RunDir(result["run_dir"]).read_status()["status"] == "finished"
    last = pd.read_csv(f"{result['run_dir']}/metrics.csv").iloc[-1]
    assert last["sparsity_pct"] == result["sparsity_pct"] and last["test_acc_pct"] == result["test_acc_pct"]
    rows = pd.read_csv(root / "tune" / "tune.csv")
    assert len(rows) == len(lines) == result["probes"] and rows["lam"].iloc[-1] == result["lam"]
    assert all(line.startswith("mlbreg tune: probe ") and "sparsity" in line for line in lines)
    assert json.loads((root / "tune" / "result.json").read_text()) == result


def test_a_killed_tune_resumes_and_reuses_its_finished_probes(reference, tmp_path):
    _, ref, _ = reference
    ref_rows = pd.read_csv(reference[0] / "tune" / "tune.csv")
    assert len(ref_rows) >= 3, "the kill needs a tune of several probes"
    args = [
        sys.executable,
        "-m",
        "mlbreg",
        "tune",
        "--target-sparsity",
        "0.95",
        "--max-probes",
        "8",
        *TUNE_ARGS,
        "output_root=out",
        "progress=false",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(len(p.read_text().splitlines()) >= 3 for p in (tmp_path / "out").rglob("tune.csv")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (tune_csv,) = (tmp_path / "out").rglob("tune.csv")
    done = len(pd.read_csv(tune_csv))
    assert done < len(ref_rows), "the tune finished before it could be killed"
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    rows = pd.read_csv(tune_csv)
    assert rows["lam"].tolist() == ref_rows["lam"].tolist()  # the same search, to the last probe
    assert rows["sparsity_pct"].tolist() == ref_rows["sparsity_pct"].tolist()
    assert rows["reused"].iloc[:done].all() and not rows["reused"].iloc[done + 1 :].any()
    assert f"λ={ref['lam']:g} gives sparsity" in again.stdout


def test_tune_sweeps_one_tune_per_job_and_reports_unreachable(tmp_path, capsys):
    code = main(
        [
            "tune",
            "--target-sparsity",
            "0.95",
            "--max-probes",
            "1",
            "-m",
            "seed=0,1",
            *TUNE_ARGS,
            f"output_root={tmp_path}",
            "progress=false",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2  # neither job reached the target
    assert err.count("target sparsity 95% not reached: no probe within ±0.5 pp after 1 probes") == 2
    assert "Closest: λ=0.03" in err
    results = sorted(tmp_path.rglob("result.json"))
    assert [json.loads(p.read_text())["status"] for p in results] == ["unreachable", "unreachable"]
    assert {p.parent.name.split("_")[1] for p in results} == {"seed0", "seed1"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--target-sparsity", "1.5"], "invalid --target-sparsity 1.5: must be in (0, 1)"),
        (["--target-sparsity", "0.9", "--tolerance", "0"], "invalid --tolerance 0"),
    ],
)
def test_bad_tune_options_name_the_value(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(["tune", *argv])
    assert message in capsys.readouterr().err


def test_tune_refuses_a_method_without_lambda(tmp_path, capsys):
    code = main(["tune", "--target-sparsity", "0.9", "method=rigl", "sparsity=0.9", f"output_root={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "invalid method=rigl for mlbreg tune" in err and "mlbreg train sparsity=" in err


def test_probe_config_changes_only_lam():
    cfg = make_cfg("lam=0.5")
    probe = probe_config(cfg, 0.125)
    assert probe.lam == 0.125 and cfg.lam == 0.5
    assert run_name(probe) == run_name(make_cfg("lam=0.125"))
