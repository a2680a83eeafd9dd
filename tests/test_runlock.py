"""Two launchers on one run directory: one trains, the other says so and exits 0;
stale locks are taken over; writes never share a temporary file; rows are never doubled."""

import csv
import errno
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd

import mlbreg.runlock as runlock
from mlbreg.config import run_name
from mlbreg.report.command import main as report_main
from mlbreg.rundir import CsvLog, atomic_write_bytes
from mlbreg.runlock import RunLock
from mlbreg.train import train

from helpers import make_cfg

ROOT = Path(__file__).resolve().parents[1]
# long enough that the second launcher starts while the first trains (digits: ~0.1 s per epoch)
BUSY = ["epochs=80", "backend=torch", "checkpoint_every=5", "seed=8"]
TIMING = ["epoch_s", "forward_s", "backward_s", "optimizer_s", "swap_s", "eval_s"]


def launch(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "mlbreg", "train", *args, "progress=false"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def epochs_of(run: Path) -> list[int]:
    with open(run / "metrics.csv", newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def the_run(root: Path) -> Path:
    (run,) = {p.parent for p in root.rglob("status.json")}
    return run


def test_two_processes_started_at_once_train_once(tmp_path):
    procs = [launch(*BUSY, "output_root=out", cwd=tmp_path) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in results] == [0, 0], results
    said = [out for _, out, _ in results]
    trained = [s for s in said if "mlbreg: finished " in s]
    skipped = [s for s in said if "already running on" in s]
    assert len(trained) == 1 and len(skipped) == 1, said
    line = skipped[0].strip()
    assert line.count("\n") == 0 and line.endswith("; skipped")
    assert f"on {socket.gethostname()} pid " in line and " since " in line
    run = the_run(tmp_path / "out")
    assert epochs_of(run) == list(range(1, 81))
    assert (run / ".lock").read_bytes() == b""  # released
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    # the same command again: finished, skipped, with its numbers, and nothing else happens
    again = launch(*BUSY, "output_root=out", cwd=tmp_path)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and out.startswith("mlbreg: finished, skipped: ") and "test acc" in out, out
    assert "resuming" not in err


def test_a_joblib_sweep_with_the_same_job_twice_trains_it_once(tmp_path):
    proc = launch(
        "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *BUSY[:-1], "seed=8,8", "output_root=out", cwd=tmp_path
    )
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err
    assert out.count("mlbreg: finished ") == 1 and out.count("already running on") == 1, out
    assert epochs_of(the_run(tmp_path / "out")) == list(range(1, 81))


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    cfg = make_cfg("epochs=2", "backend=torch")
    run = tmp_path / run_name(cfg)
    run.mkdir(parents=True)
    stale = dict(host=socket.gethostname(), pid=dead_pid(), started="2026-01-01T00:00:00Z", mode="flock")
    (run / ".lock").write_text(json.dumps(stale))
    assert train(cfg, run)["status"] == "finished"
    assert f"took over the lock left by {socket.gethostname()} pid {stale['pid']}" in capsys.readouterr().err
    assert epochs_of(run) == [1, 2]


def test_a_held_lock_skips_and_waits(tmp_path):
    cfg = make_cfg("epochs=2", "backend=torch")
    run = tmp_path / run_name(cfg)
    holder = RunLock(run)
    assert holder.acquire() is None
    out = train(cfg, run)
    assert out["status"] == "busy" and out["skipped"] and out["busy"]["pid"] == os.getpid()
    assert not (run / "metrics.csv").exists()
    timer = threading.Timer(0.5, holder.release)
    timer.start()
    waited = train(make_cfg("epochs=2", "backend=torch", "wait_for_lock=true"), run)  # blocks until released
    timer.join()
    assert waited["status"] == "finished" and epochs_of(run) == [1, 2]


def test_without_os_locks_a_lease_file_excludes_and_goes_stale(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    first, second = RunLock(tmp_path, stale_after=60), RunLock(tmp_path, stale_after=60)
    assert first.acquire() is None and (tmp_path / ".lock.lease").exists()
    assert second.acquire()["pid"] == os.getpid()  # a live holder on this host
    first.release()
    assert second.acquire() is None
    second.release()
    # a lease of a process that is gone (this host), and one whose heartbeat stopped (another host)
    for holder, age in ((dict(host=socket.gethostname(), pid=dead_pid()), 0), (dict(host="node-7", pid=1), 3600)):
        (tmp_path / ".lock.lease").write_text(json.dumps(dict(holder, started="then", mode="lease")))
        os.utime(tmp_path / ".lock.lease", (os.path.getmtime(tmp_path) - age,) * 2)
        lock = RunLock(tmp_path, stale_after=60)
        assert lock.acquire() is None and lock.taken_over["pid"] == holder["pid"]
        lock.release()
    (tmp_path / ".lock.lease").write_text(json.dumps(dict(host="node-7", pid=1, started="now", mode="lease")))
    assert RunLock(tmp_path, stale_after=60).acquire()["host"] == "node-7"  # fresh heartbeat elsewhere


def test_a_kill_between_the_row_and_the_checkpoint_resumes_to_the_same_rows(tmp_path):
    common = ["epochs=4", "backend=torch", "checkpoint_every=1", "seed=3"]
    killer = (
        "import os, sys; import mlbreg.rundir as r; n = {'k': 0}; save = r.RunDir.save_checkpoint\n"
        "def crash(self, state):\n"
        "    n['k'] += 1\n"
        "    if n['k'] == 2: os._exit(9)   # epoch 2's row is written, its checkpoint is not\n"
        "    save(self, state)\n"
        "r.RunDir.save_checkpoint = crash\n"
        "from mlbreg.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["train", *common, "output_root=out", "progress=false"]
    died = subprocess.run([sys.executable, "-c", killer, *args], cwd=tmp_path, env=env, capture_output=True)
    assert died.returncode == 9
    run = the_run(tmp_path / "out")
    assert epochs_of(run) == [1, 2]  # a row the checkpoint does not cover
    subprocess.run([sys.executable, "-m", "mlbreg", *args], cwd=tmp_path, env=env, check=True, capture_output=True)
    reference = tmp_path / "reference"
    train(make_cfg(*common), reference)
    resumed, clean = (pd.read_csv(d / "metrics.csv").drop(columns=TIMING) for d in (run, reference))
    assert resumed["epoch"].tolist() == [1, 2, 3, 4]
    pd.testing.assert_frame_equal(resumed, clean)


def test_csv_rows_of_one_key_are_kept_once_and_a_cut_line_is_dropped(tmp_path):
    path = tmp_path / "layers.csv"
    path.write_text("epoch,layer,density\r\n1,a,0.5\r\n1,b,0.4\r\n1,a,0.6\r\n2,a,0.7\r\n3,a,0.")
    CsvLog(path, ["epoch", "layer", "density"], key=("epoch", "layer")).keep_epochs_up_to(3)
    rows = list(csv.DictReader(path.open(newline="")))
    assert [(r["epoch"], r["layer"], r["density"]) for r in rows] == [("1", "b", "0.4"), ("1", "a", "0.6"), ("2", "a", "0.7")]


def test_two_writers_of_one_file_never_collide(tmp_path):
    target, errors = tmp_path / "checkpoint.pt", []

    def writer(tag):
        try:
            for i in range(200):
                atomic_write_bytes(target, lambda f, i=i: f.write(f"{tag}{i}".encode() * 100))
        except Exception as err:  # noqa: BLE001 - the test collects what a writer hit
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    text = target.read_text()
    assert text in {f"{tag}199" * 100 for tag in "ab"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_the_report_reads_a_run_being_written_consistently(tmp_path, capsys):
    cfg = make_cfg("epochs=3", "backend=torch")
    done = tmp_path / "runs" / run_name(cfg)
    train(cfg, done)
    live = tmp_path / "runs" / run_name(make_cfg("epochs=3", "backend=torch", "seed=1"))
    train(make_cfg("epochs=3", "backend=torch", "seed=1"), live)
    # `live` looks like a run being written: status running, a row half appended, its lock held
    status = json.loads((live / "status.json").read_text())
    (live / "status.json").write_text(json.dumps(dict(status, status="running")))
    with open(live / "metrics.csv", "a") as f:
        f.write("4,400,0.1,0.12")
    lock = RunLock(live)
    assert lock.acquire() is None
    assert report_main([str(tmp_path / "runs"), "--out", str(tmp_path / "r"), "--no-plots"]) == 0
    runs = pd.read_csv(tmp_path / "r" / "runs.csv")
    by_seed = runs.set_index("seed")
    assert by_seed.at[0, "included"] and by_seed.at[1, "status"] == "running" and not by_seed.at[1, "included"]
    assert by_seed.at[1, "epochs_done"] == 3  # the half row is not an epoch
    lock.release()
    # the holder is gone (a killed run): the report says so instead of "running" forever
    (live / ".lock").write_text(json.dumps(dict(host=socket.gethostname(), pid=dead_pid(), started="then")))
    assert report_main([str(tmp_path / "runs"), "--out", str(tmp_path / "r2"), "--no-plots"]) == 0
    assert "no process holds its lock (killed?)" in (tmp_path / "r2" / "excluded.csv").read_text()


def test_pid_alive():
    assert runlock.pid_alive(os.getpid()) and not runlock.pid_alive(dead_pid())
