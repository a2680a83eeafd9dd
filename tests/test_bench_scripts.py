"""Smoke tests of the CPU benchmark scripts at toy sizes: they run, print every runner and the ratios
against the best dense path, and write their plot (a refactor cannot break them silently)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mlbreg.backends.native import build as native_build

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    native_build.unavailable_reason() is not None, reason="the native kernels are not available here"
)


def run_script(name: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_bench_backends_toy_run_has_every_runner_and_the_best_dense_ratios():
    out = run_script(
        "bench_backends.py",
        "--model",
        "convnet",
        "--batch-size",
        "8",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--densities",
        "0.1",
        "--schemes",
        "uniform",
        "--repeats",
        "1",
        "--no-sparseprop",
        "--train-size",
        "64",
        "--threads",
        "1",
    )
    assert native_build.cpu_model() in out and "native kernels:" in out and " path," in out
    for label in (
        "SGD fp32 ",
        "SGD fp32 channels_last",
        "SGD bf16 channels_last",
        "ML LinBreg, torch layers",
        "ML LinBreg, native ",
        "ML LinBreg, native bf16",
    ):
        assert label in out, label
    assert "best dense step:" in out and "times faster:" in out
    assert "native coarse step split:" in out and "useful" in out
    summary = out.split("Summary:")[1].splitlines()
    assert summary[1].startswith("profile") and summary[2].startswith("uniform")


def test_bench_density_toy_run_prints_break_even_and_writes_the_plot(tmp_path):
    png = tmp_path / "density.png"
    out = run_script(
        "bench_density.py",
        "--batch-size",
        "8",
        "--densities",
        "0.05",
        "0.5",
        "--repeats",
        "1",
        "--layers",
        "1",
        "3",
        "--threads",
        "1",
        "--plot",
        str(png),
        "--bf16",
    )
    assert "sparse activations bf16" in out
    assert out.count("break-even density:") == 2
    assert "64->64 3x3 32x32" in out and "64->128 1x1 s2 32x32" in out
    assert out.count("vs best dense") >= 4
    assert png.stat().st_size > 10_000


def test_bench_density_rejects_a_bad_density():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_density.py"), "--densities", "1.5"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "density 1.5 is not in (0, 1]" in proc.stderr
