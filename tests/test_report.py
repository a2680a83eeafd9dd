"""`mlbreg report`: run directories -> tables that match a hand computation, and every plot.

The runs are real (tiny digits trainings in this process, laid out as a sweep lays them out:
<root>/<run name>); the hand computation reads each run's metrics.csv with plain pandas.
"""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from mlbreg.config import run_name
from mlbreg.report.collect import collect
from mlbreg.report.command import main
from mlbreg.train import train

from helpers import make_cfg

EPOCHS = 3
# (overrides, seeds): two λ with three seeds, an m and an init variant (two seeds), dense SGD
GRID = [
    (["lam=0.03"], [0, 1, 2]),
    (["lam=0.1"], [0, 1, 2]),
    (["lam=0.03", "m=10"], [0, 1]),
    (["lam=0.03", "init=er"], [0, 1]),
    (["method=sgd"], [0, 1]),
]
PLOTS = ["accuracy_vs_sparsity", "ablation_lambda", "ablation_m", "training_curves", "train_flops", "cpu_time"]


def train_run(root, *overrides):
    cfg = make_cfg("dataset=digits", "model=mlp", f"epochs={EPOCHS}", "checkpoint_every=0", *overrides)
    path = root / run_name(cfg)
    outcome = train(cfg, path)
    return path, outcome


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (conftest's one-thread fixture is per test, this one is per module)
    try:
        for overrides, seeds in GRID:
            for seed in seeds:
                path, outcome = train_run(root, *overrides, f"seed={seed}")
                assert outcome["status"] == "finished"
    finally:
        torch.set_num_threads(threads)
    return root


def final_rows(root, method: str, lam: float | None = None, m: int = 100, init: str = "uniform") -> pd.DataFrame:
    """Hand computation: the last metrics.csv row of every matching run, read with plain pandas."""
    rows = []
    for config in root.rglob("config.yaml"):
        if config.parent.name == ".hydra":
            continue
        text = config.read_text()
        if f"name: {method}\n" not in text or (lam is not None and f"lam: {lam}\n" not in text):
            continue
        if method == "mllinbreg" and (f"\nm: {m}\n" not in text or f"scheme: {init}\n" not in text):
            continue
        status = json.loads((config.parent / "status.json").read_text())["status"]
        if status == "finished":
            rows.append(pd.read_csv(config.parent / "metrics.csv").iloc[-1])
    return pd.DataFrame(rows)


def test_collect_gives_one_row_per_run_and_one_per_epoch(sweep):
    collection = collect([sweep])
    runs, metrics = collection.runs, collection.metrics
    assert len(runs) == sum(len(seeds) for _, seeds in GRID) == 12
    assert runs["included"].all() and (runs["status"] == "finished").all()
    assert len(metrics) == 12 * EPOCHS
    assert {"run", "epoch", "test_acc_pct", "sparsity_pct", "train_loss", "config_id"} <= set(metrics.columns)
    for col in ("dataset", "model", "method", "lam", "m", "init", "seed", "test_acc_pct", "time_forward_s"):
        assert col in runs


def test_tables_match_a_hand_computation(sweep, tmp_path):
    assert main([str(sweep), "--out", str(tmp_path), "--no-plots"]) == 0
    agg = pd.read_csv(tmp_path / "aggregate.csv")
    results_md = (tmp_path / "results.md").read_text()
    results_csv = pd.read_csv(tmp_path / "results.csv")
    for lam in (0.03, 0.1):
        hand = final_rows(sweep, "mllinbreg", lam)
        assert len(hand) == 3
        row = agg[(agg["method"] == "mllinbreg") & (agg["lam"] == lam) & (agg["m"] == 100) & (agg["init"] == "uniform")]
        assert len(row) == 1
        row = row.iloc[0]
        assert row["n"] == 3
        for col in ("test_acc_pct", "sparsity_pct", "train_flops_vs_sgd"):
            assert row[f"{col}_mean"] == pytest.approx(hand[col].mean())
            assert row[f"{col}_std"] == pytest.approx(np.std(hand[col], ddof=1))
        acc = f"{hand['test_acc_pct'].mean():.2f} ± {np.std(hand['test_acc_pct'], ddof=1):.2f}"
        sparsity = f"{hand['sparsity_pct'].mean():.2f} ± {np.std(hand['sparsity_pct'], ddof=1):.2f}"
        assert acc in results_md and sparsity in results_md
        line = results_csv[
            results_csv["Setting"].str.startswith(f"λ={lam:g},")
            & results_csv["Setting"].str.contains("m=100")
            & results_csv["Setting"].str.contains("init=uniform")
        ]
        assert list(line["Test acc (%)"]) == [acc] and list(line["n"]) == [3]
    sgd = final_rows(sweep, "sgd")
    row = agg[agg["method"] == "sgd"].iloc[0]
    assert row["n"] == 2 and row["test_acc_pct_mean"] == pytest.approx(sgd["test_acc_pct"].mean())
    assert row["train_flops_vs_sgd_mean"] == pytest.approx(1.0)
    # Table 2 comes out because ML LinBreg ran with two mask schemes
    mask = pd.read_csv(tmp_path / "mask_init.csv")
    assert set(mask["Mask initialization"]) == {"Uniform", "ER"}
    assert "\\begin{tabular}" in (tmp_path / "results.tex").read_text()


def test_every_plot_exists_as_png_and_pdf(sweep, tmp_path, capsys):
    assert main([str(sweep), "--out", str(tmp_path)]) == 0
    for name in PLOTS:
        for suffix in (".png", ".pdf"):
            path = tmp_path / f"{name}_digits_mlp{suffix}"
            assert path.exists() and path.stat().st_size > 1000, path
    assert (tmp_path / "training_curves_digits_mlp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![ablation_m_digits_mlp](ablation_m_digits_mlp.png)" in (tmp_path / "report.md").read_text()
    assert "12 runs, 12 included" in capsys.readouterr().out


def test_diverged_and_unfinished_runs_are_named_and_left_out(sweep, tmp_path, capsys):
    root = tmp_path / "runs"
    shutil.copytree(sweep, root)
    lam_runs = sorted(
        p.parent for p in root.rglob("config.yaml") if "lam0.1_m100_uniform" in str(p) and p.parent.name != ".hydra"
    )
    unfinished, truncated = lam_runs[0], lam_runs[1]
    # killed during epoch 2: status running, one epoch in metrics.csv, a half-written line
    status = json.loads((unfinished / "status.json").read_text())
    (unfinished / "status.json").write_text(json.dumps(dict(status, status="running")))
    lines = (unfinished / "metrics.csv").read_text().splitlines()
    (unfinished / "metrics.csv").write_text("\n".join(lines[:2] + [lines[2][:20]]) + "\n")
    # says finished but lost its last rows
    (truncated / "metrics.csv").write_text("\n".join((truncated / "metrics.csv").read_text().splitlines()[:2]) + "\n")
    # a real divergence: an absurd learning rate makes the loss non-finite
    diverged, outcome = train_run(root, "method=sgd", "lr=1e12", "seed=7")
    assert outcome["status"] == "diverged"

    out = tmp_path / "report"
    assert main([str(root), "--out", str(out), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    for path, status in ((unfinished, "running"), (truncated, "finished"), (diverged, "diverged")):
        name = "/".join(path.parts[-4:])
        assert name in printed and f"[{status}]" in printed.split(name)[1].splitlines()[0]
    assert "metrics.csv has 1 of 3 epochs" in printed
    excluded = pd.read_csv(out / "excluded.csv")
    assert set(excluded["status"]) == {"running", "finished", "diverged"} and len(excluded) == 3
    # the means are over the remaining runs only
    agg = pd.read_csv(out / "aggregate.csv")
    kept = pd.read_csv(lam_runs[2] / "metrics.csv").iloc[-1]
    row = agg[(agg["method"] == "mllinbreg") & (agg["lam"] == 0.1)].iloc[0]
    assert row["n"] == 1 and row["test_acc_pct_mean"] == pytest.approx(kept["test_acc_pct"])
    # the diverged run's configuration (lr=1e12) has no finished run: no row; plain SGD keeps its 2 seeds
    assert list(agg[agg["method"] == "sgd"]["n"]) == [2]


def test_sgd_rerun_at_another_lambda_is_one_configuration(sweep, tmp_path):
    """λ does not reach SGD: the same seed at another λ is the same computation, counted once."""
    root = tmp_path / "runs"
    shutil.copytree(sweep, root)
    train_run(root, "method=sgd", "lam=0.5", "seed=0")
    runs = collect([root]).runs
    duplicate = runs[runs["status"] == "duplicate"]
    assert len(duplicate) == 1 and "same configuration and seed" in duplicate["reason"].iloc[0]
    out = tmp_path / "report"
    assert main([str(root), "--out", str(out), "--no-plots"]) == 0
    agg = pd.read_csv(out / "aggregate.csv")
    assert list(agg[agg["method"] == "sgd"]["n"]) == [2]


def test_sweep_selection_keeps_its_runs_and_lists_the_missing_ones(sweep, tmp_path, capsys):
    selection = f"method=mllinbreg lam=0.03,0.1 seed=0,1,2,3 dataset=digits model=mlp epochs={EPOCHS}"
    assert main([str(sweep), "--sweep", selection, "--out", str(tmp_path), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "8 runs, 6 included" in printed and "6 other runs" in printed
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert sorted(runs[runs["status"] == "missing"]["run"].str.extract(r"(seed\d)")[0]) == ["seed3", "seed3"]


def test_no_runs_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err
    assert main([str(tmp_path / "nope")]) == 2


def test_a_failed_run_never_makes_a_finished_one_a_duplicate():
    import pandas as pd

    from mlbreg.report.configs import mark_duplicates as _mark_duplicates

    runs = pd.DataFrame(
        dict(
            run=["a_failed", "b", "c"],
            included=[False, True, True],
            config_id=["x"] * 3,
            seed=[0, 0, 0],
            reason=["failed", "", ""],
            status=["failed", "finished", "finished"],
        )
    )
    out = _mark_duplicates(runs).set_index("run")
    assert out.at["b", "included"] and out.at["b", "status"] == "finished"  # the first finished run counts
    assert not out.at["c", "included"] and out.at["c", "status"] == "duplicate" and "as b" in out.at["c", "reason"]
    assert out.at["a_failed", "status"] == "failed"
