"""The paper presets (conf/experiment/) and the sweep launchers.

Every preset composes to the paper's setup and expands into the runs it promises, each one
distinct (a run that two rows share would be trained twice). Shrunk to digits, an MLP, two
epochs and a two-point grid, presets run through `mlbreg train -m` with the joblib launcher
(2 processes) and with submitit_local: two presets by default, every preset with `-m slow`.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mlbreg.config import run_name, validate
from mlbreg.hydra_glue import preset_override, register_resolvers, sweep_jobs
from mlbreg.paths import config_dir

register_resolvers()
CONF = Path(config_dir())

# the fixed-sparsity baselines of Table 1's presets
BASELINES = ("prune_finetune", "gmp", "static", "set", "rigl")
# preset -> (dataset, model, epochs, number of runs of the full sweep, methods it trains)
PRESETS = {
    "table1_resnet18": ("cifar10", "resnet18", 200, 30, {"sgd", *BASELINES, "linbreg", "mllinbreg"}),
    "table1_vgg16": ("cifar10", "vgg16", 200, 24, {"sgd", *BASELINES, "linbreg", "mllinbreg"}),
    "table1_wrn28_10": ("cifar10", "wrn28_10", 200, 24, {"sgd", *BASELINES, "linbreg", "mllinbreg"}),
    "table2_mask_init": ("cifar10", "resnet18", 200, 18, {"rigl", "mllinbreg"}),
    "ablation_lambda": ("cifar10", "resnet18", 200, 36, {"linbreg", "mllinbreg"}),
    "ablation_m": ("cifar10", "resnet18", 200, 18, {"mllinbreg"}),
    "tinyimagenet": ("tinyimagenet", "wrn28_10", 200, 60, {"sgd", "prune_finetune", "linbreg", "mllinbreg"}),
    "cpu_timing": ("cifar10", "resnet18", 10, 6, {"sgd", "mllinbreg"}),
}
# each preset shrunk: digits, an MLP, 2 epochs, one seed and a two-point grid
SHRUNK = {
    "table1_resnet18": ["+experiment/row=prune_finetune_sp95,rigl_sp95"],
    "table1_vgg16": ["+experiment/row=sgd,linbreg_lam1"],
    "table1_wrn28_10": ["+experiment/row=sgd,mllinbreg_lam1"],
    "table2_mask_init": ["+experiment/row=mllinbreg_lam1", "init=er,erk"],
    "ablation_lambda": ["method=mllinbreg", "lam=0.01,0.1"],
    "ablation_m": ["m=1,10"],
    "tinyimagenet": ["model=mlp", "+experiment/row=sgd,prune_finetune_sp90"],
    "cpu_timing": ["+experiment/row=sgd,mllinbreg_lam1"],
}
SMALL = ["dataset=digits", "model=mlp", "epochs=2", "seed=0", "progress=false", "num_threads=1", "checkpoint_every=0"]


def sweep_params(name: str) -> dict:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[preset_override(name)], return_hydra_config=True)
    return dict(cfg.hydra.sweeper.params or {})


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_to_the_paper_setup(name):
    dataset, model, epochs, _, _ = PRESETS[name]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[preset_override(name)], return_hydra_config=True)
    assert (cfg.dataset.name, cfg.model.name, cfg.epochs) == (dataset, model, epochs)
    assert (cfg.lr, cfg.scheduler, cfg.momentum, cfg.batch_size, cfg.regularizer.name) == (0.1, "cosine", 0.9, 128, "l1")
    params = dict(cfg.hydra.sweeper.params)
    assert params["seed"] == ("0" if name == "cpu_timing" else "0,1,2")
    if name == "ablation_m":
        assert params["m"].split(",")[0] == "1" and "100" in params["m"].split(",")
    else:
        assert cfg.m == 100


@pytest.mark.parametrize("name", PRESETS)
def test_preset_expands_into_distinct_valid_runs(name):
    _, _, _, runs, methods = PRESETS[name]
    jobs = sweep_jobs([preset_override(name)])
    names = [run_name(cfg) for _, cfg in jobs]
    assert len(jobs) == runs
    assert len(set(names)) == len(names), "two jobs of one preset are the same run"
    assert {cfg.method.name for _, cfg in jobs} == methods
    for _, cfg in jobs:
        validate(cfg, environment=False)  # values only: this machine need not have CUDA
        if cfg.method.name in BASELINES:
            assert 0 < cfg.sparsity < 1
        if cfg.method.name in ("rigl", "set", "static") and name != "table2_mask_init":
            assert cfg.init.scheme == "erk" and cfg.sparsity == 0.95  # the paper's RigL mask and target
    if name.startswith("table1"):  # GMP at the target of the architecture's Prune+Fine-Tuning row
        targets = {cfg.method.name: cfg.sparsity for _, cfg in jobs if "pru" in cfg.method.name or cfg.method.name == "gmp"}
        assert targets["gmp"] == targets["prune_finetune"] == (0.92 if name == "table1_vgg16" else 0.95)


def test_cpu_timing_compares_with_the_best_dense_path():
    """Figure 2's rows: SGD in fp32 and in bf16 + channels_last (the fastest dense CPU training), ML LinBreg
    on torch layers, SparseProp and the native kernels (fp32 and bf16)."""
    from mlbreg.config import use_channels_last

    jobs = sweep_jobs([preset_override("cpu_timing")])
    rows = {(cfg.method.name, cfg.backend, cfg.precision, use_channels_last(cfg)) for _, cfg in jobs}
    assert rows == {
        ("sgd", "auto", "fp32", False),
        ("sgd", "auto", "bf16", True),
        ("mllinbreg", "torch", "fp32", False),
        ("mllinbreg", "sparseprop", "fp32", False),
        ("mllinbreg", "native", "fp32", False),
        ("mllinbreg", "native", "bf16", True),
    }


def test_table2_sweeps_every_mask_scheme_for_both_methods():
    jobs = sweep_jobs([preset_override("table2_mask_init")])
    pairs = {(cfg.method.name, cfg.init.scheme) for _, cfg in jobs}
    assert pairs == {(m, s) for m in ("rigl", "mllinbreg") for s in ("uniform", "er", "erk")}


def test_row_values_survive_the_preset_and_command_line_wins():
    """A row's λ is not reset by its preset; a command-line override beats both."""
    jobs = sweep_jobs([preset_override("table1_resnet18"), "+experiment/row=mllinbreg_lam2,linbreg_lam0.5"])
    assert sorted((cfg.method.name, cfg.lam) for _, cfg in jobs) == [("linbreg", 0.5)] * 3 + [("mllinbreg", 2.0)] * 3
    jobs = sweep_jobs([preset_override("table1_resnet18"), "+experiment/row=mllinbreg_lam2", "lam=0.7", "seed=0"])
    assert [cfg.lam for _, cfg in jobs] == [0.7]


def test_presets_are_appended_with_plus_experiment():
    """The issue's command line: `mlbreg train -m +experiment=NAME`."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=table1_vgg16"])
    assert cfg.model.name == "vgg16"


def test_slurm_launcher_preset_sets_gpus_time_memory_partition():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                preset_override("table1_resnet18"),
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.timeout_min=90",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node) == ("gpu", 90, 1)
    assert launcher.mem_gb > 0 and launcher.max_num_timeout > 0


# -- shrunk sweeps through the real launchers -------------------------------------------------


def run_sweep(name: str, out: Path, launcher: list[str]) -> list[dict]:
    overrides = [preset_override(name), *SMALL, *SHRUNK[name], f"output_root={out}", *launcher]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mlbreg", "train", "-m", *overrides], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    statuses = [OmegaConf.to_container(OmegaConf.load(p)) for p in sorted(out.rglob("status.json"))]
    expected = sweep_jobs([preset_override(name), *SMALL, *SHRUNK[name]])
    assert len(expected) == 2
    for _, cfg in expected:
        assert (out / run_name(cfg) / "status.json").exists(), f"{run_name(cfg)} did not run"
    return statuses


def check_finished(statuses: list[dict]) -> None:
    assert len(statuses) == 2
    assert [s["status"] for s in statuses] == ["finished", "finished"], statuses


def test_joblib_runs_a_preset_in_two_processes(tmp_path):
    statuses = run_sweep("table1_resnet18", tmp_path, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])
    check_finished(statuses)


def test_submitit_local_runs_a_preset(tmp_path):
    statuses = run_sweep("ablation_m", tmp_path, ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"])
    check_finished(statuses)
    assert (tmp_path / ".submitit").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_runs_shrunk_through_joblib(name, tmp_path):
    check_finished(run_sweep(name, tmp_path, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]))


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_runs_shrunk_through_submitit_local(name, tmp_path):
    check_finished(run_sweep(name, tmp_path, ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]))
