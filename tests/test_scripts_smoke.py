"""Smoke tests of the scripts in scripts/ at toy sizes, so that a refactor cannot break one silently
(bench_backends.py and bench_density.py have theirs in test_bench_scripts.py).

Each test runs the real script in a subprocess. The table and figure scripts get toy overrides as their
arguments (passed to every `mlbreg train -m`): scikit-learn's digits and the MLP instead of CIFAR-10 /
TinyImageNet and the paper's networks, 2 epochs (Prune+Fine-Tuning keeps a dense epoch), one seed, λ = 1
and a 90% target (rows that differ only in those collapse into one run). They share one output root:
runs are named by their config, so a run that two scripts share is trained once, and a script whose runs
are all there only reports (as in real use). `mlbreg` is this interpreter with this checkout on
PYTHONPATH (MLBREG points at a wrapper). Plots are drawn where a test checks them (small dpi, no mask
pictures); elsewhere REPORT_ARGS=--no-plots keeps the reports fast.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

TOY = [
    "dataset=digits",
    "model=mlp",
    "epochs=2",
    "seed=0",
    "lam=1",
    "sparsity=0.9",
    "progress=false",
    "num_threads=1",
    "checkpoint_every=0",
]
# ML LinBreg on torch layers: the scripts are under test here, not the native kernels (figure2 keeps them)
TORCH = [*TOY, "backend=torch"]
# two values of λ and of m: the ablation plots need a series with two points
ABLATION = [*TORCH, "lam=0.5,1", "m=10,100"]
PLOTS = "--dpi 30 --masks 0"


def python_env(**extra: str) -> dict[str, str]:
    """The environment of a script: this checkout first on PYTHONPATH, one thread per process."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)


def run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: int = 600, rc: int = 0) -> str:
    """Run `cmd`; check its exit status; return stdout and stderr together."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == rc, f"exit {proc.returncode} (expected {rc}):\n{out[-4000:]}"
    return out


# --------------------------------------------------------------------------- shell scripts


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The output root all table and figure scripts share, and the wrapper MLBREG points at."""
    base = tmp_path_factory.mktemp("scripts_smoke")
    wrapper = base / "mlbreg"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mlbreg "$@"\n')
    wrapper.chmod(0o755)
    return base, python_env(MLBREG=str(wrapper), OUTPUTS=str(base / "outputs"), REPORT_ARGS="--no-plots")


def run_sh(shared, script: str, *args: str, timeout: int = 600, **env: str) -> str:
    """bash scripts/<script> ARGS in the shared output root; every sweep it ran must have succeeded."""
    base, base_env = shared
    out = run(["bash", str(SCRIPTS / script), *args], dict(base_env, **env), base, timeout)
    assert "!! some runs of this sweep failed" not in out, out[-4000:]
    return out


def reports(shared) -> Path:
    return shared[0] / "outputs" / "reports"


def sweeps_run(out: str) -> list[str]:
    """The overrides of each `mlbreg train -m` the script announced, in order."""
    return [line.split(" train -m ", 1)[1] for line in out.splitlines() if line.startswith("== ") and " train -m " in line]


def check_runs(report: Path, n: int, methods: set[str]) -> pd.DataFrame:
    """The report found the runs of its sweeps, every one finished (status.json), `n` of them in the tables
    (the others: duplicates, runs that differ only in keys their method ignores, e.g. LinBreg's m)."""
    runs = pd.read_csv(report / "runs.csv")
    table = runs[["run", "status", "reason"]].to_string()
    included = runs["included"].astype(bool)
    assert included.sum() == n, table
    assert (runs["status"][included] == "finished").all() and (runs["status"][~included] == "duplicate").all(), table
    for path in runs["path"]:
        assert json.loads((Path(path) / "status.json").read_text())["status"] == "finished", path
    assert set(runs["method"]) == methods
    assert (report / "results.md").stat().st_size > 0 and (report / "results.csv").exists()
    return runs


def test_table1_trains_every_row_of_two_architectures_and_writes_table_1_and_its_plots(shared):
    """table1.sh with ARCHS=resnet18 vgg16: one sweep per architecture with the arguments, then one report
    of both (results.{md,csv,tex} and the Figure 1 / 5 / Appendix C plots)."""
    out = run_sh(shared, "table1.sh", *TORCH, ARCHS="resnet18 vgg16", REPORT_ARGS=PLOTS)
    assert sweeps_run(out) == [f"+experiment=table1_{arch} {' '.join(TORCH)}" for arch in ("resnet18", "vgg16")]
    report = reports(shared) / "table1"
    # resnet18: 10 rows, 8 runs (the three ML LinBreg λ are one at lam=1); vgg16's rows are among them
    check_runs(report, 8, {"sgd", "prune_finetune", "gmp", "static", "set", "rigl", "linbreg", "mllinbreg"})
    assert "--sweep +experiment=table1_resnet18" in out and "--sweep +experiment=table1_vgg16" in out
    for name in (
        "results.tex",
        "accuracy_vs_sparsity_digits_mlp.png",
        "training_curves_digits_mlp.png",
        "train_flops_digits_mlp.png",
    ):
        assert (report / name).stat().st_size > 0, name


def test_table2_writes_the_mask_initialization_table(shared):
    """table2.sh: RigL and ML LinBreg from uniform / ER / ERK masks -> mask_init.{md,csv,tex} and results.md."""
    run_sh(shared, "table2.sh", *TORCH)
    report = reports(shared) / "table2"
    runs = check_runs(report, 6, {"rigl", "mllinbreg"})
    assert set(runs["init"]) == {"uniform", "er", "erk"}
    for name in ("mask_init.md", "mask_init.csv", "mask_init.tex"):
        assert (report / name).stat().st_size > 0, name
    assert not (report / "accuracy_vs_sparsity_digits_mlp.png").exists()  # REPORT_ARGS=--no-plots reached it


def test_figure3_sweeps_the_tinyimagenet_preset_with_the_arguments(shared):
    """figure3_tinyimagenet.sh with the dataset and model overridden: its ten rows collapse into four runs,
    all shared with table1.sh's (trained once), and the report lists them."""
    out = run_sh(shared, "figure3_tinyimagenet.sh", *TORCH)
    assert sweeps_run(out) == [f"+experiment=tinyimagenet {' '.join(TORCH)}"]
    check_runs(reports(shared) / "figure3", 4, {"sgd", "prune_finetune", "linbreg", "mllinbreg"})


def test_figure6_runs_its_three_sweeps_per_architecture(shared):
    """figure6_sparsity_range.sh, ARCHS=resnet18: the Table 1 rows, the λ sweep and the pruned SGD sweep, each
    with the arguments after the script's own overrides, and one report of all three."""
    out = run_sh(shared, "figure6_sparsity_range.sh", *TORCH, ARCHS="resnet18")
    sweeps = sweeps_run(out)
    args = " ".join(TORCH)
    assert sweeps == [
        f"+experiment=table1_resnet18 {args}",
        f"+experiment=ablation_lambda model=resnet18 {args}",
        f"+experiment=table1_resnet18 +experiment/row=prune_finetune_sp90 sparsity=0.5,0.7,0.8,0.9,0.95,0.98 {args}",
    ]
    check_runs(
        reports(shared) / "figure6", 8, {"sgd", "prune_finetune", "gmp", "static", "set", "rigl", "linbreg", "mllinbreg"}
    )


def test_reproduce_paper_runs_the_script_chosen_by_scripts_with_the_arguments(shared):
    """reproduce_paper.sh with SCRIPTS=table2: that script alone, with the arguments (its runs exist already:
    only the report is made again). The slow test below runs every script."""
    out = run_sh(shared, "reproduce_paper.sh", *TORCH, SCRIPTS="table2")
    assert sweeps_run(out) == [f"+experiment=table2_mask_init {' '.join(TORCH)}"]
    assert out.count("--out " + str(reports(shared))) == 1
    check_runs(reports(shared) / "table2", 6, {"rigl", "mllinbreg"})


def test_reproduce_paper_refuses_an_unknown_script_before_running_any(shared):
    """A name in SCRIPTS that is not one of the paper's scripts stops reproduce_paper.sh at once (exit 2)."""
    base, env = shared
    out = run(["bash", str(SCRIPTS / "reproduce_paper.sh"), *TORCH], dict(env, SCRIPTS="table2 table9"), base, rc=2)
    assert "unknown script 'table9'" in out and "figure2_cpu_timing" in out
    assert "== " not in out


def test_figure4_trains_both_ablations_and_draws_them(shared):
    """figure4_ablations.sh with two λ and two m: the λ sweep (ML LinBreg and LinBreg) and the m sweep, and a
    report with its ablation plot for each."""
    run_sh(shared, "figure4_ablations.sh", *ABLATION, REPORT_ARGS=PLOTS)
    lam, m = reports(shared) / "figure4_lambda", reports(shared) / "figure4_m"
    # ML LinBreg: 2 λ x 2 m; LinBreg: 2 λ (its runs at m = 10 and 100 are one configuration)
    runs = check_runs(lam, 6, {"linbreg", "mllinbreg"})
    assert set(runs["lam"]) == {0.5, 1.0}
    assert set(check_runs(m, 4, {"mllinbreg"})["m"]) == {10, 100}
    assert (lam / "ablation_lambda_digits_mlp.png").stat().st_size > 0
    assert (m / "ablation_m_digits_mlp.png").stat().st_size > 0


def test_figure7_runs_the_ablations_at_tinyimagenet_scale_with_the_arguments_last(shared):
    """figure7_tinyimagenet_ablations.sh: both ablations with dataset=tinyimagenet model=wrn28_10, then the
    arguments (which win: here digits and the MLP, the runs of figure4's test), and a report of each."""
    out = run_sh(shared, "figure7_tinyimagenet_ablations.sh", *ABLATION)
    args = " ".join(ABLATION)
    assert sweeps_run(out) == [
        f"+experiment=ablation_lambda dataset=tinyimagenet model=wrn28_10 {args}",
        f"+experiment=ablation_m dataset=tinyimagenet model=wrn28_10 {args}",
    ]
    check_runs(reports(shared) / "figure7_lambda", 6, {"linbreg", "mllinbreg"})
    check_runs(reports(shared) / "figure7_m", 4, {"mllinbreg"})


def _cpu_timing_rows() -> list[str]:
    """The preset's rows, or (where SparseProp or the native kernels are missing, which would make the config
    check refuse the whole sweep) those that can run here."""
    from mlbreg.backends import sparseprop_available
    from mlbreg.backends.native import build

    rows = ["sgd", "sgd_bf16", "mllinbreg_lam1_torch"]
    rows += ["mllinbreg_lam1_sparseprop"] if sparseprop_available() else []
    rows += ["mllinbreg_lam1_native", "mllinbreg_lam1_native_bf16"] if build.unavailable_reason() is None else []
    return [] if len(rows) == 6 else ["+experiment/row=" + ",".join(rows)]


def test_figure2_times_every_row_and_draws_the_time_split(shared):
    """figure2_cpu_timing.sh: the CPU timing rows (SGD fp32 / bf16, ML LinBreg on torch, SparseProp and native
    layers) -> cpu_time.{md,csv} and the Figure 2 plot."""
    rows = _cpu_timing_rows()
    run_sh(shared, "figure2_cpu_timing.sh", *TOY, *rows, REPORT_ARGS=PLOTS)
    report = reports(shared) / "figure2"
    runs = check_runs(report, 6 if not rows else rows[0].count(",") + 1, {"sgd", "mllinbreg"})
    assert (runs["device"] == "cpu").all()
    assert (report / "cpu_time.md").stat().st_size > 0 and (report / "cpu_time.csv").exists()
    assert len(pd.read_csv(report / "cpu_time.csv")) == len(runs)
    assert (report / "cpu_time_digits_mlp.png").stat().st_size > 0


def test_reproduce_digits_runs_every_sweep_and_writes_its_four_reports(shared, tmp_path):
    """reproduce_digits.sh (JOBS=1: the joblib launcher in one process) at one seed, λ = 0.03 and a 90% target:
    its nine sweeps succeed (the six baselines, the λ and m ablations, the mask initializations) and its four
    reports list their runs."""
    out = run_sh(
        shared,
        "reproduce_digits.sh",
        "epochs=2",
        "seed=0",
        "lam=0.03",
        "sparsity=0.9",
        "backend=torch",
        OUTPUTS=str(tmp_path),
        JOBS="1",
    )
    sweeps = sweeps_run(out)
    assert len(sweeps) == 9 and all("hydra/launcher=joblib hydra.launcher.n_jobs=1" in s for s in sweeps)
    check_runs(
        tmp_path / "reports" / "digits_methods",
        8,
        {"sgd", "prune_finetune", "gmp", "static", "set", "rigl", "linbreg", "mllinbreg"},
    )
    check_runs(tmp_path / "reports" / "digits_lambda", 2, {"linbreg", "mllinbreg"})
    assert set(check_runs(tmp_path / "reports" / "digits_m", 7, {"mllinbreg"})["m"]) == {1, 5, 10, 25, 50, 100, 200}
    check_runs(tmp_path / "reports" / "digits_mask_init", 6, {"rigl", "mllinbreg"})
    assert (tmp_path / "reports" / "digits_mask_init" / "mask_init.md").stat().st_size > 0


@pytest.mark.slow
def test_reproduce_digits_with_docs_copies_the_readme_tables_and_plots(shared, tmp_path):
    """reproduce_digits.sh as the README runs it (joblib, 2 jobs; every λ and m; plots) with DOCS=...: the
    tables and plots the README shows are copied to DOCS."""
    docs = tmp_path / "docs"
    out = run_sh(
        shared,
        "reproduce_digits.sh",
        "epochs=2",
        "seed=0",
        "sparsity=0.9",
        "backend=torch",
        OUTPUTS=str(tmp_path / "outputs"),
        DOCS=str(docs),
        REPORT_ARGS="--dpi 30",
    )
    assert f"copied the tables and plots to {docs}/" in out
    assert sorted(p.name for p in docs.iterdir()) == sorted(
        [
            "methods.md",
            "ablation_lambda.md",
            "ablation_m.md",
            "mask_init.md",
            "layers.md",
            "accuracy_vs_sparsity_digits_mlp.png",
            "training_curves_digits_mlp.png",
            "ablation_lambda_digits_mlp.png",
            "ablation_m_digits_mlp.png",
            "layer_density_digits_mlp.png",
            "layer_density_epochs_digits_mlp.png",
            "masks_digits_mlp_mllinbreg.png",
        ]
    )


@pytest.mark.slow
def test_reproduce_paper_runs_every_script_at_toy_sizes(shared, tmp_path):
    """reproduce_paper.sh, every script, from an empty output root: each writes its report."""
    out = run_sh(shared, "reproduce_paper.sh", *TORCH, OUTPUTS=str(tmp_path), timeout=1800)
    presets = [s.split()[0] for s in sweeps_run(out)]
    table1 = [f"+experiment=table1_{arch}" for arch in ("resnet18", "vgg16", "wrn28_10")]
    figure6 = [p for arch in table1 for p in (arch, "+experiment=ablation_lambda", arch)]
    assert presets == [
        *table1,
        "+experiment=table2_mask_init",
        "+experiment=ablation_lambda",
        "+experiment=ablation_m",
        *figure6,
        "+experiment=tinyimagenet",
        "+experiment=ablation_lambda",
        "+experiment=ablation_m",
        "+experiment=cpu_timing",
    ]
    for name in (
        "table1",
        "table2",
        "figure4_lambda",
        "figure4_m",
        "figure6",
        "figure3",
        "figure7_lambda",
        "figure7_m",
        "figure2",
    ):
        assert (tmp_path / "reports" / name / "results.md").exists(), name


# --------------------------------------------------------------------------- gpu_check.sh


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_without_a_cuda_gpu_before_writing_anything(tmp_path):
    """gpu_check.sh on a machine without CUDA: exit 1 with a message that says so, and no result folder
    (every part of it measures the GPU; on the CPU it would run CPU benchmarks for minutes)."""
    out = run(
        ["bash", str(SCRIPTS / "gpu_check.sh")],
        python_env(OUT=str(tmp_path / "gpu"), PYTHON=sys.executable, RUNS=str(tmp_path / "runs")),
        ROOT,
        timeout=120,
        rc=1,
    )
    assert "sees no CUDA GPU" in out and "needs a CUDA GPU" in out and "nothing ran" in out
    assert not (tmp_path / "gpu").exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.gpu
def test_gpu_check_full_pass_on_a_gpu(tmp_path):
    """gpu_check.sh on a CUDA machine: every method's training exits 0 and each benchmark writes its table
    (one full pass: many minutes)."""
    out_dir = tmp_path / "gpu"
    run(
        ["bash", str(SCRIPTS / "gpu_check.sh")],
        python_env(OUT=str(out_dir), PYTHON=sys.executable, RUNS=str(tmp_path / "runs")),
        ROOT,
        timeout=3600,
    )
    assert (out_dir / "device.txt").read_text().strip()
    results = [line for line in (out_dir / "methods_cuda.txt").read_text().splitlines() if line.startswith("rc=")]
    assert len(results) == 9 and all(line.startswith("rc=0 ") for line in results), results
    for name in ("bench_optim.txt", "bench_epoch.txt", "bench_epoch_eager.txt", "bench_epoch_bf16.txt"):
        assert "| " in (out_dir / name).read_text(), name


# --------------------------------------------------------------------------- Python scripts


@pytest.mark.parametrize(
    "script, first_line",
    [
        ("bench_epoch.py", "Device loader throughput and epoch time"),
        ("bench_optim.py", "Optimizer step time: LinBreg and ML LinBreg"),
        ("reproduce_gpu_hours.py", "How many GPU-hours each paper preset takes"),
    ],
)
def test_python_script_help(script, first_line, tmp_path):
    """`--help` of each Python script exits 0 and shows its usage and description."""
    out = run([sys.executable, str(SCRIPTS / script), "--help"], python_env(), tmp_path, timeout=120)
    assert out.startswith("usage:") and first_line in out


def test_bench_epoch_toy_run_prints_every_measurement_with_ml_linbreg_on_torch_layers(tmp_path):
    """bench_epoch.py on the CPU at toy sizes (ConvNet, 64 images, one warm-up and one timed epoch) prints
    its table; the ML LinBreg row is torch layers as labelled (MLBREG_NATIVE_ISA=bad: backend=auto would
    try the native kernels and print a note)."""
    out = run(
        [
            sys.executable,
            str(SCRIPTS / "bench_epoch.py"),
            "--device",
            "cpu",
            "--train-size",
            "64",
            "--batch-size",
            "32",
            "--epochs",
            "1",
            "--loader-size",
            "64",
            "--warmup-steps",
            "1",
            "model=convnet",
            "num_threads=1",
        ],
        python_env(MLBREG_NATIVE_ISA="bad"),
        tmp_path,
    )
    assert "overrides: ['model=convnet', 'num_threads=1']" in out
    assert "native kernels" not in out
    for row in (
        "| device loader alone |",
        "| SGD epoch (64 images, batch 32) |",
        "| ML LinBreg epoch (m=100, torch layers) |",
        "| ML LinBreg / SGD epoch |",
        "| loader / model throughput |",
    ):
        assert row in out, row
    ratio = re.search(r"\| ML LinBreg / SGD epoch \| ([0-9.]+)x", out)
    assert ratio and float(ratio.group(1)) > 0


def test_bench_optim_toy_run_prints_every_optimizer_against_sgd(tmp_path):
    """bench_optim.py on the CPU, ConvNet, one timed step: SGD and the eager and compiled LinBreg / ML LinBreg
    rows, each with its ratio to SGD."""
    out = run(
        [sys.executable, str(SCRIPTS / "bench_optim.py"), "--models", "convnet", "--repeats", "1", "--device", "cpu"],
        python_env(),
        tmp_path,
    )
    assert "# optimizer step time, CPU, 1 threads" in out and "convnet (" in out
    rows = re.findall(r"^\| (.+?) \| ([0-9.]+) \| ([0-9.]+)x \|$", out, re.M)
    labels = [label for label, _, _ in rows]
    assert labels == [
        "SGD(foreach, momentum)",
        "LinBreg (l1)",
        "ML LinBreg fine step",
        "ML LinBreg coarse step (density 0.05)",
        "LinBreg (l1), compiled",
        "ML LinBreg fine step, compiled",
        "ML LinBreg coarse step (density 0.05), compiled",
    ]
    assert rows[0][2] == "1.00" and all(float(ms) > 0 for _, ms, _ in rows)


def test_reproduce_gpu_hours_toy_run_writes_its_tables(tmp_path):
    """reproduce_gpu_hours.py on the CPU at toy sizes (the MLP on CIFAR-shaped images, 32 of them): two presets,
    two distinct timings (ablation_m reuses table2's ML LinBreg one), the tables in .md and .csv."""
    out_md = tmp_path / "gpu_hours.md"
    out = run(
        [
            sys.executable,
            str(SCRIPTS / "reproduce_gpu_hours.py"),
            "--presets",
            "table2_mask_init",
            "ablation_m",
            "--device",
            "cpu",
            "--train-size",
            "32",
            "--out",
            str(out_md),
            "model=mlp",
            "seed=0",
            "init=uniform",
            "m=10",
            "backend=torch",
            "num_threads=1",
        ],
        python_env(),
        tmp_path,
    )
    assert out.count("timed cifar10/mlp/") == 2
    assert "table2_mask_init: 2 runs," in out and "ablation_m: 1 runs," in out
    presets = pd.read_csv(tmp_path / "gpu_hours.csv")
    assert list(presets["preset"]) == ["table2_mask_init", "ablation_m"] and list(presets["runs"]) == [2, 1]
    assert (presets["gpu_hours"] >= 0).all()
    per_run = pd.read_csv(tmp_path / "gpu_hours_per_run.csv")
    assert sorted(per_run["method"]) == ["mllinbreg", "rigl"] and (per_run["train_images_per_s"] > 0).all()
    assert "Measured on cpu" in out_md.read_text()
