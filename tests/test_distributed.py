"""DDP on CPU (gloo, 2 processes) equals one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASES = [
    ["method=mllinbreg", "m=5", "lam=0.03"],
    ["method=rigl", "sparsity=0.9", "method.delta_t=5"],
    ["method=set", "sparsity=0.9", "method.delta_t=5"],
]  # SET: the same random regrowth on every rank


def worker(out: Path, *args, nproc: int = 1, **env_vars):
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_vars)
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=localhost:0",
        ]
        if nproc > 1
        else [sys.executable]
    )
    subprocess.run(
        [*launcher, str(HERE / "ddp_worker.py"), str(out), *args], env=env, check=True, cwd=ROOT, capture_output=True, text=True
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_ddp_two_ranks_match_one_process(tmp_path, case):
    common = ["model=mlp", "epochs=2", "batch_size=128", *case]  # 1437 samples: a last batch of 29 (14 + 15)
    worker(tmp_path / "one", *common)
    worker(tmp_path / "ddp", *common, "distributed=true", nproc=2)
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=False)
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for key, value in one["model"].items():
        torch.testing.assert_close(ranks[0]["model"][key], value, rtol=1e-5, atol=1e-6)
        assert torch.equal(ranks[0]["model"][key], ranks[1]["model"][key])  # ranks never drift apart
    states = [one["method"]["optimizer"]["state"]] + [r["method"]["optimizer"]["state"] for r in ranks]
    compared = set()
    for idx, state in states[0].items():
        for key in ("v", "support", "momentum_buffer"):
            if key in state:
                torch.testing.assert_close(states[1][idx][key], state[key], rtol=1e-5, atol=1e-6)
                assert torch.equal(states[1][idx][key], states[2][idx][key])
                compared.add(key)
    assert compared >= ({"v", "support", "momentum_buffer"} if "mllinbreg" in case[0] else {"momentum_buffer"})
    if "rigl" in one["method"]:  # RigL and SET
        # masks changed by the same mask updates on both ranks, as in one process
        assert one["method"]["rigl"]["updates_done"] == ranks[0]["method"]["rigl"]["updates_done"] >= 3
        for a, b, c in zip(one["method"]["rigl"]["masks"], *(r["method"]["rigl"]["masks"] for r in ranks)):
            assert torch.equal(b, c) and torch.equal(a, b)
    # only rank 0 wrote the run's files, once
    metrics = (tmp_path / "ddp" / "run" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 3


def test_ddp_run_stopped_by_a_signal_resumes_to_the_same_result(tmp_path):
    common = ["model=mlp", "epochs=2", "batch_size=128", "method=mllinbreg", "m=5", "distributed=true", "stop_check_every=4"]
    worker(tmp_path / "ref", *common, nproc=2)
    # rank 0 alone gets SIGTERM during step 6; the ranks agree at step 8 (a multiple of 4)
    worker(tmp_path / "cut", *common, nproc=2, MLBREG_TEST_SIGNAL_AT_STEP="6")
    status = json.loads((tmp_path / "cut" / "run" / "status.json").read_text())
    assert status["status"] == "interrupted" and status["step"] == 8
    cut = [torch.load(tmp_path / "cut" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for key, value in cut[0]["model"].items():
        assert torch.equal(cut[1]["model"][key], value)  # both ranks stopped at the same step
    worker(tmp_path / "cut", *common, nproc=2)  # the rerun resumes inside epoch 1
    assert json.loads((tmp_path / "cut" / "run" / "status.json").read_text())["status"] == "finished"
    ref, resumed = (torch.load(tmp_path / d / "rank0.pt", weights_only=False) for d in ("ref", "cut"))
    assert ref["steps_trained"] == 24 and resumed["steps_trained"] == 24 - 8  # 12 steps per epoch
    for key, value in ref["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=1e-6, atol=1e-7)
    rows = [pd.read_csv(tmp_path / d / "run" / "metrics.csv") for d in ("ref", "cut")]
    cols = ["epoch", "step", "train_loss", "train_acc_pct", "test_acc_pct", "sparsity_pct", "train_flops_vs_sgd"]
    pd.testing.assert_frame_equal(rows[1][cols], rows[0][cols], rtol=1e-6, atol=1e-7)
