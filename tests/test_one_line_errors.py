"""Failures end in one line, never a traceback: a folder that cannot be written, a full disk,
files of a run that mlbreg did not write, a device that is not there, a stop signal while a
launcher starts up; and nothing a finished run holds is lost or overwritten.

Tests may run as root, where `chmod 0o555` does not stop writes: a read-only filesystem is
simulated by fault injection (`read_only`: every write under a folder fails with EROFS, as on
a read-only mount), a real one is used where `unshare` can mount one, and a path through a
regular file (ENOTDIR) fails for root too. The chmod case runs for other users only.
"""

import builtins
import contextlib
import errno
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from mlbreg.cli import main
from mlbreg.rundir import RunDir

from helpers import signal_at_step

ROOT = Path(__file__).resolve().parents[1]
# 12 steps per epoch on digits; one thread: the resumed runs are compared bitwise with `finished`
RUN = ["epochs=3", "backend=torch", "num_threads=1", "progress=false"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> SHA-256), but the run locks (taken and released
    around an attempt) and Hydra's notes of the latest command line (.hydra/)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock" and ".hydra" not in p.parts
    }


def one_line(err: str) -> str:
    """mlbreg's last line of stderr, after checking that there is no traceback."""
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def results(run: Path):
    """What a run computed: metrics.csv (without wall-clock columns), layers.csv and model.pt."""
    metrics = pd.read_csv(run / "metrics.csv")
    model = torch.load(run / "model.pt", weights_only=True)
    return metrics.drop(columns=[c for c in metrics if c.endswith("_s")]), pd.read_csv(run / "layers.csv"), model


def assert_same_results(a: Path, b: Path):
    (ma, la, wa), (mb, lb, wb) = results(a), results(b)
    pd.testing.assert_frame_equal(ma, mb)
    pd.testing.assert_frame_equal(la, lb)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


stop_at_step = signal_at_step


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run (the reference of the resumed runs below); copy it before changing it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *RUN, f"hydra.run.dir={run}"]) == 0
    return run


@pytest.fixture(scope="module")
def stopped_in_the_loop(tmp_path_factory) -> tuple[Path, int, str]:
    """The same run stopped by SIGTERM in its second epoch (a checkpoint at step 18, one row):
    the run directory, the exit code, stderr."""
    run = tmp_path_factory.mktemp("interrupted") / "run"
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        stop_at_step(mp, 18)
        with pytest.raises(SystemExit) as stop:
            main(["train", *RUN, f"hydra.run.dir={run}"])
    return run, stop.value.code, err.getvalue()


@pytest.fixture
def interrupted(stopped_in_the_loop) -> Path:
    return stopped_in_the_loop[0]


def test_sigterm_in_the_training_loop_still_checkpoints(stopped_in_the_loop):
    """SIGTERM inside the training loop, with the command's own startup handler around it: the
    loop's StopGuard checkpoints and the command exits 143 saying the run was interrupted (the
    startup handler neither steals the signal nor gets it handed on)."""
    run, code, err = stopped_in_the_loop
    assert code == 128 + signal.SIGTERM
    assert one_line(err).startswith("mlbreg: run interrupted: stopped by signal 15 at step 18; rerun to resume")
    assert "before training started" not in err
    assert RunDir(run).read_status()["status"] == "interrupted"
    assert torch.load(run / "checkpoint.pt", weights_only=False)["position"] == {"epoch": 1, "batch": 6, "step": 18}


def copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run", symlinks=True))


@pytest.fixture
def read_only(monkeypatch):
    """Fault injection: `read_only(folder)` makes every write under `folder` fail with EROFS, as on
    a read-only mount (creating, opening for writing, renaming, removing; mkdir of an existing
    folder says it exists). Reads are untouched."""
    roots: list[str] = []

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        path = os.path.abspath(os.fsdecode(path))
        return any(path == r or path.startswith(r + os.sep) for r in roots)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def fake_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if inside(path):
            if os.path.exists(path):  # as the kernel: "exists" and "no parent" before "read-only"
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(path))
            if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fsdecode(path))
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def refusing(real):
        def call(path, *args, **kwargs):
            if inside(path):
                refuse(path)
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    for name in ("replace", "rename", "unlink", "rmdir", "truncate"):
        monkeypatch.setattr(os, name, refusing(getattr(os, name)))
    return lambda folder: roots.append(os.path.abspath(folder))


# -- a place that cannot be written ------------------------------------------------------------


def _unwritable(kind: str, tmp_path: Path, read_only) -> tuple[Path, str]:
    """(a folder mlbreg cannot write under, the cause its message must name)."""
    if kind == "file in the way":  # fails for root too
        (tmp_path / "a_file").write_text("")
        return tmp_path / "a_file" / "out", "Not a directory [ENOTDIR]"
    folder = tmp_path / "ro"
    folder.mkdir()
    if kind == "read-only filesystem":
        read_only(folder)
        return folder / "out", "Read-only file system [EROFS]"
    if IS_ROOT:
        pytest.skip("root writes into a 0o555 folder; the read-only filesystem case covers it")
    folder.chmod(0o555)
    return folder / "out", "Permission denied [EACCES]"


COMMANDS = {
    "train": lambda out, run: ["train", *RUN, f"output_root={out}"],
    "train -m": lambda out, run: ["train", "-m", *RUN, "seed=0,1", f"output_root={out}"],
    "tune": lambda out, run: ["tune", "--target-sparsity", "0.5", *RUN, f"output_root={out}"],
    "report --out": lambda out, run: ["report", str(run), "--out", str(out / "report"), "--no-plots"],
    "export --out": lambda out, run: ["export", str(run), "--out", str(out / "model.safetensors")],
}


@pytest.mark.parametrize("kind", ["file in the way", "read-only filesystem", "read-only folder (chmod 0o555)"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_output_place_that_cannot_be_written_is_one_line(command, kind, finished, tmp_path, read_only, capsys):
    """train, train -m, tune, report --out and export --out into a place that cannot be written:
    exit code 2 and one line naming the path and the cause (and where to write instead), no
    traceback; the finished run they read is unchanged and nothing is written."""
    out, cause = _unwritable(kind, tmp_path, read_only)
    before = digest(finished)
    capsys.readouterr()
    try:
        code = main(COMMANDS[command](out, finished))
    finally:
        if out.parent.name == "ro":
            out.parent.chmod(0o755)
    err = capsys.readouterr().err
    line = one_line(err)
    assert code == 2, err
    assert line.startswith(f"mlbreg {command.split()[0]}: ") and f": {cause}; " in line, line
    assert str(out) in line and ("--out PATH" if "--out" in command else "output_root=DIR") in line, line
    assert digest(finished) == before
    assert not out.exists() or not any(out.rglob("*"))


# -- a finished run on a read-only archive -----------------------------------------------------


def test_a_finished_run_on_a_read_only_archive_is_skipped(finished, tmp_path, read_only, capsys):
    """Relaunching a finished run whose folder is read-only says "finished, skipped" (exit 0): Hydra
    writes no notes into a run that is skipped, the lock is not needed where nothing can be written;
    an unfinished run there is one line naming the cause (exit 2); no file changes."""
    run = copy(finished, tmp_path)
    shutil.rmtree(run / ".hydra")  # Hydra's notes would be written first (and fail) if at all
    before = digest(run)
    read_only(tmp_path)
    capsys.readouterr()
    assert main(["train", *RUN, f"hydra.run.dir={run}"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"mlbreg: finished, skipped: {run}: test acc "), captured
    assert "Traceback" not in captured.err and not (run / ".hydra").exists()
    assert main(["train", *RUN, "lam=0.05", f"hydra.run.dir={run}"]) == 2  # not this run: it would train
    assert one_line(capsys.readouterr().err).startswith(f"mlbreg train: {run}/.hydra: Read-only file system [EROFS]; ")
    assert digest(run) == before


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _unshare_works(),
    reason="needs `unshare -rm` (user and mount namespaces) for a real read-only mount",
)
def test_a_real_read_only_mount(finished, tmp_path):
    """On a real read-only bind mount (EROFS from the kernel): the finished run relaunched is
    skipped (exit 0), a new run there is one line naming the path (exit 2), no traceback, no file changes."""
    archive = tmp_path / "archive"
    run = copy(finished, archive)
    before = digest(run)
    python = f"{sys.executable} -m mlbreg train {' '.join(RUN)}"
    script = (
        f"mount --bind {archive} {archive} && mount -o remount,bind,ro {archive} || exit 99\n"
        f"{python} hydra.run.dir={run}; echo rc=$?\n{python} output_root={archive}; echo rc=$?\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "rc=0\n" in done.stdout and "rc=2\n" in done.stdout, (done.stdout, done.stderr)
    assert f"mlbreg: finished, skipped: {run}: test acc " in done.stdout
    line = one_line(done.stderr)
    assert line.startswith(f"mlbreg train: {archive}/digits") and ": Read-only file system [EROFS]; " in line
    assert digest(run) == before


# -- a full disk mid-run -----------------------------------------------------------------------


def test_a_full_disk_mid_run_is_one_line_and_resumes_identically(finished, tmp_path, monkeypatch, capsys):
    """The disk fills up while the second epoch's checkpoint is written (fault injection: torch.save
    raises its RuntimeError over an OSError ENOSPC, as it does on a full disk): exit code 2, one
    line and status.json naming "No space left on device" (not torch's secondary error), the first
    checkpoint intact; after that, the same command resumes to the uninterrupted run's results."""
    run = tmp_path / "run"
    real_save, calls, kept = torch.save, [], {}

    def full_disk(obj, f, *args, **kwargs):
        if ".checkpoint.pt." in str(getattr(f, "name", "")):
            calls.append(1)
            if len(calls) == 2:
                kept["checkpoint"] = (run / "checkpoint.pt").read_bytes()
                f.write(b"half a checkpoint")
                try:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                except OSError:  # torch's writer: its own error, the OSError as its context
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(["train", *RUN, f"hydra.run.dir={run}"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"mlbreg train: {run / 'checkpoint.pt'}: No space left on device [ENOSPC]; free some space"), line
    status = RunDir(run).read_status()
    assert status["status"] == "failed" and status["message"] == line.split(": ", 1)[1]  # the same words
    assert (run / "checkpoint.pt").read_bytes() == kept["checkpoint"]
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []
    monkeypatch.undo()
    assert main(["train", *RUN, f"hydra.run.dir={run}"]) == 0
    assert f"resuming {run} at epoch 2, step 12" in capsys.readouterr().err
    assert_same_results(finished, run)


# -- files of a run that mlbreg did not write --------------------------------------------------


def test_a_garbage_line_in_metrics_csv_is_dropped_with_a_note(interrupted, finished, tmp_path, capsys):
    """A line that is not a row, appended to an interrupted run's metrics.csv: the resume drops it
    and says so on one line naming the file, then finishes as the uninterrupted run did; a
    finished run with such a line is still skipped, and `mlbreg report` reads it."""
    run = copy(interrupted, tmp_path)
    with open(run / "metrics.csv", "a") as f:
        f.write("garbage\n")
    capsys.readouterr()
    assert main(["train", *RUN, f"hydra.run.dir={run}"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"mlbreg: note: {run / 'metrics.csv'}: dropped line 3, which is not a row of the file" in err
    assert_same_results(finished, run)
    with open(run / "metrics.csv", "a") as f:
        f.write("1,2\n")
    assert main(["train", *RUN, f"hydra.run.dir={run}"]) == 0
    assert "finished, skipped" in capsys.readouterr().out
    assert main(["report", str(run), "--out", str(tmp_path / "report"), "--no-plots"]) == 0
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("content", ["[1]", '"x"', "not json"])
def test_a_status_json_that_is_not_a_status_is_one_line(content, interrupted, tmp_path, capsys):
    """status.json replaced by valid JSON that is not an object (or by no JSON at all): train says
    which file and what to do (exit 2) and changes no file, as a resume could not tell whether the
    run had finished; report lists the run as unreadable, export and eval refuse it in one line."""
    run = copy(interrupted, tmp_path)
    (run / "status.json").write_text(content)
    before = digest(run)
    capsys.readouterr()
    assert main(["train", *RUN, f"hydra.run.dir={run}"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"mlbreg: {run / 'status.json'} is not a run status (")
    assert "Restore the file" in line and "resume=false" in line
    assert digest(run) == before
    assert main(["report", str(run), "--out", str(tmp_path / "report"), "--no-plots"]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "[unreadable]" in out.out
    for command in (["export", str(run)], ["eval", str(run)]):
        assert main(command) == 2
        assert "no readable status.json" in one_line(capsys.readouterr().err)
    assert digest(run) == before


# -- a device that is not there ----------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_eval_on_a_missing_device_is_one_line(finished, capsys):
    """`mlbreg eval RUN --device cuda` without a GPU fails as `mlbreg train device=cuda` does: one
    line naming the option and the way out, exit code 2; an unknown device lists the valid ones."""
    capsys.readouterr()
    assert main(["eval", str(finished), "--device", "cuda"]) == 2
    assert one_line(capsys.readouterr().err) == (
        "mlbreg eval: invalid --device='cuda': CUDA is not available on this machine; use --device cpu"
    )
    assert main(["eval", str(finished), "--device", "tpu"]) == 2
    assert one_line(capsys.readouterr().err) == "mlbreg eval: invalid --device='tpu': valid: auto, cpu, cuda (or cuda:N)"
    assert main(["eval", str(finished), "--device", "auto"]) == 0  # auto: the CPU here
    assert "on cpu" in capsys.readouterr().out


# -- a stop signal while a relaunch starts up ----------------------------------------------------


def _catches(pid: int, signum: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        caught = next(line for line in f if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signum - 1)))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/PID/status")
def test_sigterm_while_a_relaunch_starts_up_is_one_line(interrupted, tmp_path):
    """SIGTERM to a relaunch of an interrupted run as soon as mlbreg handles it (long before the
    training loop: Python is still importing): exit code 143 and one line saying it stopped before
    training started and nothing was lost; the checkpoint and the rows are untouched."""
    run = copy(interrupted, tmp_path)
    before = digest(run)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlbreg", "train", *RUN, f"hydra.run.dir={run}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline and not _catches(proc.pid, signal.SIGTERM):
        time.sleep(0.002)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert one_line(err) == (
        "mlbreg train: stopped by SIGTERM before training started; nothing was lost (run the "
        "same command again to start or resume)"
    )
    assert digest(run) == before
