"""`mlbreg report`'s per-layer outputs, mask pictures, model sizes and environment notes.

A tiny real sweep (ML LinBreg and RigL, two seeds each, a 64-32-16-10 MLP on digits, two
epochs) trained in this process; every expected number is recomputed here from the run
directories' own files (layers.csv, metrics.csv, model.pt) with plain pandas and torch.
"""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from mlbreg.config import run_name
from mlbreg.report.aggregate import aggregate
from mlbreg.report.collect import collect
from mlbreg.report.command import main
from mlbreg.report.masks import mask_image, mask_runs
from mlbreg.report.tables import human_bytes
from mlbreg.train import train

from helpers import make_cfg

EPOCHS = 2
METHODS = {"mllinbreg": ["method=mllinbreg", "lam=0.03"], "rigl": ["method=rigl", "sparsity=0.9"]}
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("layers_sweep")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for overrides in METHODS.values():
            for seed in SEEDS:
                # backend=torch: no native kernel build in this file's time budget
                cfg = make_cfg(
                    "dataset=digits",
                    "model=mlp",
                    "model.hidden=[32,16]",
                    f"epochs={EPOCHS}",
                    "checkpoint_every=0",
                    "backend=torch",
                    f"seed={seed}",
                    *overrides,
                )
                outcome = train(cfg, root / run_name(cfg))
                assert outcome["status"] == "finished"
    finally:
        torch.set_num_threads(threads)
    return root


def run_dirs(root, method=None):
    dirs = sorted(p.parent for p in root.rglob("status.json"))
    return [d for d in dirs if method is None or d.parts[-2] == method]


@pytest.fixture
def copy(sweep, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(sweep, root)
    return root


def test_per_layer_plots_and_mask_pictures_are_written(sweep, tmp_path):
    assert main([str(sweep), "--out", str(tmp_path)]) == 0
    for name in ("layer_density_digits_mlp", "layer_density_epochs_digits_mlp"):
        for suffix in (".png", ".pdf"):
            assert (tmp_path / f"{name}{suffix}").stat().st_size > 1000, name
    masks = sorted(tmp_path.glob("masks_digits_mlp_*.png"))
    assert [p.name.split("_")[3] for p in masks] == ["mllinbreg", "rigl"]  # one per configuration
    assert all("seed0" in p.name and p.stat().st_size > 1000 for p in masks)
    assert all(p.with_suffix(".pdf").stat().st_size > 1000 for p in masks)
    report = (tmp_path / "report.md").read_text()
    assert "![layer_density_digits_mlp](layer_density_digits_mlp.png)" in report
    assert "## Per-layer density (final epoch)" in report
    assert main([str(sweep), "--out", str(tmp_path / "none"), "--masks", "0"]) == 0
    assert not list((tmp_path / "none").glob("masks_*"))


def test_layers_table_is_the_mean_of_the_runs_layers_csv(sweep, tmp_path):
    assert main([str(sweep), "--out", str(tmp_path), "--no-plots"]) == 0
    table = pd.read_csv(tmp_path / "layers.csv")
    markdown = (tmp_path / "layers.md").read_text()
    assert len(table) == len(METHODS) * 3  # three prunable layers per configuration
    for method in METHODS:
        frames = [pd.read_csv(d / "layers.csv") for d in run_dirs(sweep, method)]
        final = pd.concat([f[f["epoch"] == EPOCHS] for f in frames])
        assert len(final) == len(SEEDS) * 3
        mine = table[table["method"] == method]
        assert list(mine["layer"]) == list(frames[0]["layer"][:3])  # the model's layer order
        for layer, rows in final.groupby("layer"):
            row = mine[mine["layer"] == layer].iloc[0]
            assert row["n"] == len(SEEDS) and row["epoch"] == EPOCHS and row["numel"] == rows["numel"].iloc[0]
            assert row["density_mean"] == pytest.approx(rows["density"].mean())
            assert row["density_std"] == pytest.approx(np.std(rows["density"], ddof=1), abs=1e-12)
            assert row["nonzeros_mean"] == pytest.approx(rows["nonzeros"].mean())
            shown = f"{100 * rows['density'].mean():.2f} ± {100 * np.std(rows['density'], ddof=1):.2f}"
            line = next(
                x
                for x in markdown.splitlines()
                if f" {layer} " in x and (" ML LinBreg " if method == "mllinbreg" else " RigL ") in x
            )
            assert shown in line


def test_mask_picture_is_the_zero_pattern_of_model_pt(sweep):
    collection = collect([sweep])
    drawn, notes = mask_runs(collection, aggregate(collection.runs), limit=4)
    assert notes == [] and len(drawn) == len(METHODS)
    for item in drawn:
        state = torch.load(f"{item.path}/model.pt", map_location="cpu", weights_only=True)
        weights = {k[: -len(".weight")]: v for k, v in state.items() if k.endswith(".weight")}
        assert [m.layer for m in item.masks] == list(weights)
        for mask in item.masks:
            w = weights[mask.layer]
            assert mask.kind == "linear" and mask.block == (1, 1) and mask.shape == tuple(w.shape)
            np.testing.assert_array_equal(mask.image, (w != 0).numpy().astype(float))
            assert mask.empty == int((w == 0).sum()) and mask.density == pytest.approx(float((w != 0).float().mean()))
    # the drawn run of each configuration is its lowest seed
    assert all("_seed0_" in item.path for item in drawn)


def test_conv_kernels_and_downsampled_layers():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, 3, 3, generator=g)
    w[1, 2] = 0  # empty kernels
    w[4, :] = 0
    w[0, 0, :2] = 0  # a kernel with 3 of 9 non-zeros left
    mask = mask_image("conv", w)
    assert mask.kind == "conv" and mask.image.shape == (6, 5) and mask.block == (1, 1)
    counts = (w != 0).flatten(2).sum(-1).numpy()
    np.testing.assert_array_equal(mask.image == 0, counts == 0)
    np.testing.assert_allclose(mask.image * 9, counts)
    assert mask.empty == 6 and mask.cells == 30
    # 601 x 10 at 256 cells per side: blocks of 3 rows, the last block holds one real row
    lin = torch.zeros(601, 10)
    lin[0, 3] = lin[600, 7] = lin[300:303, 0] = 1.0
    small = mask_image("fc", lin, max_side=256)
    assert small.block == (3, 1) and small.image.shape == (201, 10)
    expected = np.zeros((201, 10))
    expected[0, 3], expected[200, 7], expected[100, 0] = 1 / 3, 1.0, 1.0
    np.testing.assert_allclose(small.image, expected)


def test_model_sizes_are_the_metrics_values(sweep, tmp_path):
    assert main([str(sweep), "--out", str(tmp_path), "--no-plots"]) == 0
    agg = pd.read_csv(tmp_path / "aggregate.csv")
    results = pd.read_csv(tmp_path / "results.csv", keep_default_na=False)
    tex = (tmp_path / "results.tex").read_text()
    for method in METHODS:
        final = pd.DataFrame([pd.read_csv(d / "metrics.csv").iloc[-1] for d in run_dirs(sweep, method)])
        row = agg[agg["method"] == method].iloc[0]
        dense, sparse = final["model_bytes_dense"].mean(), final["model_bytes_sparse"].mean()
        assert row["model_bytes_dense_mean"] == dense and row["model_bytes_sparse_mean"] == pytest.approx(sparse)
        assert sparse < dense
        cell = f"{human_bytes(dense)} / {human_bytes(sparse)}"
        label = {"mllinbreg": "ML LinBreg", "rigl": "RigL"}[method]
        assert list(results.loc[results["Method"] == label, "Model size (dense / compressed)"]) == [cell]
        assert cell in tex
    assert [human_bytes(v) for v in (512, 84_000, 84_349, 1_234_567, 999_999, 3.2e9, np.nan)] == [
        "512 B",
        "84 kB",
        "84.3 kB",
        "1.23 MB",
        "1 MB",
        "3.2 GB",
        "",
    ]


def normalize_envs(root):
    """One env.json content for every run (commits landing between the fixture's runs must not count)."""
    dirs = run_dirs(root)
    env = json.loads((dirs[0] / "env.json").read_text())
    for d in dirs:
        (d / "env.json").write_text(json.dumps(env))
    return env, dirs


def test_differing_environments_are_listed(copy, tmp_path, capsys):
    env, dirs = normalize_envs(copy)
    assert main([str(copy), "--out", str(tmp_path / "same"), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "environments differ" not in printed and "env.json" not in printed
    assert "## Environments" not in (tmp_path / "same" / "report.md").read_text()

    odd = dirs[1]
    (odd / "env.json").write_text(json.dumps(dict(env, torch="9.9.9")))
    assert main([str(copy), "--out", str(tmp_path / "differ"), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    name = "/".join(odd.parts[-4:])
    line = f"environments differ: torch {env['torch']} (3 runs) vs 9.9.9 (1 run: {name})"
    assert line in printed.splitlines()
    assert f"- {line}" in (tmp_path / "differ" / "report.md").read_text()
    assert printed.count("environments differ") == 1  # only the field that differs


def test_runs_without_layers_model_or_env_do_not_break_the_report(copy, tmp_path, capsys):
    normalize_envs(copy)
    ml = run_dirs(copy, "mllinbreg")
    rigl = run_dirs(copy, "rigl")
    (ml[0] / "layers.csv").unlink()
    (ml[1] / "env.json").unlink()
    for d in rigl:  # a configuration with no model.pt at all, and from before the size columns
        (d / "model.pt").unlink()
        metrics = pd.read_csv(d / "metrics.csv")
        metrics.drop(columns=["model_bytes_dense", "model_bytes_sparse"]).to_csv(d / "metrics.csv", index=False)
    out = tmp_path / "report"
    assert main([str(copy), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 runs, 4 included" in printed
    assert f"no env.json: 1 run: {'/'.join(ml[1].parts[-4:])} (not compared)" in printed
    layers = pd.read_csv(out / "layers.csv")
    assert set(layers.loc[layers["method"] == "mllinbreg", "n"]) == {1}  # the seed that has layers.csv
    assert set(layers.loc[layers["method"] == "rigl", "n"]) == {2}
    results = pd.read_csv(out / "results.csv", keep_default_na=False).set_index("Method")
    assert results.at["RigL", "Model size (dense / compressed)"] == ""
    assert results.at["ML LinBreg", "Model size (dense / compressed)"] != ""
    assert [p.name.split("_")[3] for p in out.glob("masks_*.png")] == ["mllinbreg"]
    assert "no mask picture for RigL target=90% (digits/mlp): none of its runs has model.pt" in (out / "report.md").read_text()
    assert (out / "layer_density_digits_mlp.png").stat().st_size > 1000
    # runs from before layers.csv and the size columns altogether: the old report, no new column
    for d in ml + rigl:
        (d / "layers.csv").unlink(missing_ok=True)
        metrics = pd.read_csv(d / "metrics.csv")
        metrics.drop(columns=["model_bytes_dense", "model_bytes_sparse"], errors="ignore").to_csv(
            d / "metrics.csv", index=False
        )
    assert main([str(copy), "--out", str(tmp_path / "old")]) == 0
    assert "Model size (dense / compressed)" not in pd.read_csv(tmp_path / "old" / "results.csv").columns
    assert not (tmp_path / "old" / "layers.csv").exists()
    assert not list((tmp_path / "old").glob("layer_density*"))
