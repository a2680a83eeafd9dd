"""No silent gaps: rows lost before a checkpoint stop the resume, the report names runs that lack
epochs, status.json follows the checkpoints, an all-zero model gets a note, and the report
orders numeric keys by value."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

import mlbreg.loop as loop_module
from mlbreg.cli import main
from mlbreg.config import run_name
from mlbreg.report.collect import collect
from mlbreg.report.command import main as report_main
from mlbreg.rundir import CheckpointError, RunDir
from mlbreg.train import train

from helpers import make_cfg

# digits, MLP: 12 steps per epoch; a signal at step 30 stops inside epoch 3, checkpointed after epoch 2
COMMON = ["epochs=4", "backend=torch", "seed=5"]
FILES = ("metrics.csv", "layers.csv", "status.json", "checkpoint.pt")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run stopped by SIGTERM inside epoch 3: its checkpoint holds epochs 1-2, its CSVs their rows."""
    root = tmp_path_factory.mktemp("interrupted")
    cfg = make_cfg(*COMMON)
    path = root / run_name(cfg)
    original, calls = loop_module.FlopsAccount.add_step, {"n": 0}

    def add_step(self, *args):
        calls["n"] += 1
        if calls["n"] == 30:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop_module.FlopsAccount, "add_step", add_step)
        outcome = train(cfg, path)
    assert outcome["status"] == "interrupted"
    assert torch.load(path / "checkpoint.pt", weights_only=False)["position"]["epoch"] == 2
    return root, path


def copy_run(interrupted, tmp_path):
    root, path = interrupted
    shutil.copytree(root, tmp_path / "root")
    return tmp_path / "root", tmp_path / "root" / path.relative_to(root)


def lines(path):
    return path.read_text().splitlines(keepends=True)


def cut_half_a_row(run):  # epoch 2's row half-written (a crash mid-write, then the checkpoint was kept)
    rows = lines(run / "metrics.csv")
    (run / "metrics.csv").write_text("".join(rows[:2]) + rows[2][: len(rows[2]) // 2])


def cut_half_the_file(run):  # half the file gone (a copy cut short)
    text = (run / "metrics.csv").read_text()
    (run / "metrics.csv").write_text(text[: len(text) // 2])


def drop_a_layer(run):  # layers.csv: epoch 2 lacks its last layer
    (run / "layers.csv").write_text("".join(lines(run / "layers.csv")[:-1]))


DAMAGE = [
    (cut_half_a_row, "metrics.csv", "epoch(s) 2 of the 2"),
    (cut_half_the_file, "metrics.csv", "epoch(s) 1-2 of the 2"),
    (drop_a_layer, "layers.csv", "epoch(s) 2 of the 2"),
]


@pytest.mark.parametrize("damage,name,epochs", DAMAGE, ids=[d[0].__name__ for d in DAMAGE])
def test_rows_lost_before_the_checkpoint_refuse_the_resume(interrupted, tmp_path, damage, name, epochs):
    """A CSV that lacks rows up to the checkpoint's epoch is refused with the file, the missing epochs
    and `resume=false`, and no file of the run changes; resume=false then retrains it."""
    _, run = copy_run(interrupted, tmp_path)
    damage(run)
    before = {f: (run / f).read_bytes() for f in FILES}
    with pytest.raises(CheckpointError) as err:
        train(make_cfg(*COMMON), run)
    message = str(err.value)
    assert f"{run / name} lacks the rows of {epochs} before the checkpoint" in message
    assert "resume=false" in message and "\n" not in message
    assert {f: (run / f).read_bytes() for f in FILES} == before
    if damage is cut_half_a_row:
        assert train(make_cfg(*COMMON, "resume=false"), run)["status"] == "finished"
        assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1, 2, 3, 4]


def test_the_refusal_is_one_line_and_exit_2(interrupted, tmp_path, capsys):
    """From the command line the refusal is one `mlbreg:` line on stderr (no traceback) and exit code 2."""
    root, run = copy_run(interrupted, tmp_path)
    cut_half_the_file(run)
    assert main(["train", *COMMON, f"output_root={root}", "progress=false"]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("mlbreg:")]
    assert line.startswith(f"mlbreg: {run / 'metrics.csv'} lacks the rows of epoch(s) 1-2") and "Traceback" not in err


def test_a_half_written_row_beyond_the_checkpoint_is_dropped_and_retrained(interrupted, tmp_path):
    """A row of epoch 3 cut short by a kill (after the checkpoint of epoch 2) is no gap: it is dropped
    and the resumed run writes every epoch once."""
    _, run = copy_run(interrupted, tmp_path)
    with open(run / "metrics.csv", "a") as f:
        f.write("3,30,0.07,0.5")
    with open(run / "layers.csv", "a") as f:
        f.write("3,net.0,linear,256x6")
    assert train(make_cfg(*COMMON), run)["status"] == "finished"
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1, 2, 3, 4]
    layers = pd.read_csv(run / "layers.csv")
    assert layers.groupby("epoch").size().tolist() == [3, 3, 3, 3]


def test_a_killed_runs_status_names_its_last_checkpoint(tmp_path, capsys):
    """After SIGKILL, status.json says running at the epoch and step of the last checkpoint (not epoch 0),
    and `mlbreg eval` and the report name that epoch."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlbreg", "train", "epochs=300", "backend=torch", "output_root=out", "progress=false"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while True:
        found = list((tmp_path / "out").rglob("metrics.csv"))
        if found and len(lines(found[0])) > 4:
            break
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = found[0].parent
    status = RunDir(run).read_status()
    position = torch.load(run / "checkpoint.pt", weights_only=False)["position"]
    assert status["status"] == "running" and status["epoch"] >= 3
    assert (status["epoch"], status["step"]) == (position["epoch"], position["step"])
    assert main(["eval", str(run)]) == 2
    assert f"is running after epoch {status['epoch']} (step {status['step']})" in capsys.readouterr().err
    (row,) = collect([tmp_path / "out"]).runs.to_dict("records")
    assert "killed?" in row["reason"] and f"from its checkpoint after epoch {status['epoch']}" in row["reason"]


def test_an_all_zero_model_gets_a_note_naming_lambda(tmp_path, capsys):
    """lam=1e9 prunes every weight: the final line, status.json and the report say so and name λ;
    a run with weights left gets no note."""
    args = ["epochs=1", "backend=torch", f"output_root={tmp_path}", "progress=false"]
    assert main(["train", "lam=1e9", *args]) == 0
    out = capsys.readouterr().out
    note = "every prunable weight is zero, so the model predicts one class for every input; lam=1e+09 is too strong"
    assert "sparsity 100.00%" in out and f"; note: {note}" in out
    (zero,) = [p.parent for p in tmp_path.rglob("status.json") if "lam1e+09" in str(p)]
    assert note in RunDir(zero).read_status()["message"]
    assert main(["train", "lam=0.03", *args]) == 0
    assert "note:" not in capsys.readouterr().out
    assert report_main([str(tmp_path), "--out", str(tmp_path / "report"), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert f"note: {'/'.join(zero.parts[-4:])}: {note}" in printed and printed.count("note:") == 1
    assert "## Notes (1)" in (tmp_path / "report" / "report.md").read_text()
    runs = pd.read_csv(tmp_path / "report" / "runs.csv").set_index("lam")
    assert note in runs.at[1e9, "note"] and pd.isna(runs.at[0.03, "note"]) and runs["included"].all()


def fake_run(root, *overrides, epochs_written):
    """A finished run directory as `mlbreg train` lays it out, with hand-written metrics rows."""
    cfg = make_cfg(*overrides)
    path = root / run_name(cfg)
    path.mkdir(parents=True)
    OmegaConf.save(cfg, path / "config.yaml", resolve=True)
    (path / "status.json").write_text(json.dumps(dict(status="finished", epoch=cfg.epochs)))
    rows = [
        dict(epoch=e, test_acc_pct=90.0 + e / 1000, sparsity_pct=95.0, nonzeros=100, prunable_params=2000)
        for e in epochs_written
    ]
    pd.DataFrame(rows).to_csv(path / "metrics.csv", index=False)
    return path


def test_the_report_names_a_finished_run_with_a_gap(tmp_path, capsys):
    """A finished run whose metrics.csv lacks middle epochs (its last row is there) is excluded, and the
    report names it and the missing epochs; a complete one stays."""
    gap = fake_run(tmp_path, "seed=1", "epochs=12", epochs_written=[1, 2, 3, 4, 9, 10, 11, 12])
    fake_run(tmp_path, "seed=2", "epochs=12", epochs_written=range(1, 13))
    assert report_main([str(tmp_path), "--out", str(tmp_path / "report"), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    name = "/".join(gap.parts[-4:])
    (line,) = [line for line in printed.splitlines() if name in line and "[finished]" in line]  # excluded
    assert "metrics.csv has 8 of 12 epochs (lacks 5-8)" in line and "resume=false" in line
    runs = pd.read_csv(tmp_path / "report" / "runs.csv").set_index("seed")
    assert runs.at[1, "missing_epochs"] == "5-8" and not runs.at[1, "included"] and runs.at[2, "included"]


def test_the_report_orders_numeric_settings_by_value(tmp_path):
    """Configurations that differ in epochs come in the order 5, 20, 200, not as text (20, 200, 5)."""
    for epochs in (20, 200, 5):
        fake_run(tmp_path, f"epochs={epochs}", epochs_written=range(1, epochs + 1))
    assert report_main([str(tmp_path), "--out", str(tmp_path / "report"), "--no-plots"]) == 0
    settings = pd.read_csv(tmp_path / "report" / "results.csv")["Setting"].tolist()
    assert [s.split("epochs=")[1] for s in settings] == ["5", "20", "200"]
