"""No file mlbreg reads can run code: checkpoints, model files and caches load tensors-only.

Each test plants a crafted file (a pickled object whose `__reduce__` creates a marker file, as
a shared `model.pt` or run archive could hold) where mlbreg reads one, runs the real command,
and checks that the marker was never created and that the refusal is one line naming the file.
"""

import logging
import pathlib
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch

import mlbreg
from mlbreg.cli import main
from mlbreg.data import DataNotFoundError, load_dataset, sources
from mlbreg.export import ExportError
from mlbreg.models import create_model
from mlbreg.rundir import RunDir
from mlbreg.safe_load import TensorFileError, load_tensors
from mlbreg.sparsity import load_dense_weights

RUN_ARGS = ["model=mlp", "model.hidden=[16]", "epochs=1", "batch_size=256", "backend=torch", "progress=false"]


class Payload:
    """Unpickling this calls Path.touch(marker): code run from a file."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def plant(path: pathlib.Path, marker: pathlib.Path, how: str = "torch.save") -> None:
    """Write the payload to `path`, as torch.save writes a file (zip) or as a bare pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "torch.save":
        torch.save({"model": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


def mlbreg_lines(err: str) -> list[str]:
    """The stderr lines of mlbreg's own (Hydra's "Error executing job with overrides" aside)."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith("Error executing job")]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 1-epoch run (config.yaml, status.json, checkpoint.pt, model.pt), trained once."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *RUN_ARGS, f"hydra.run.dir={run}"]) == 0
    return run


@pytest.fixture
def run(finished_run, tmp_path):
    """A copy of the finished run for one test to tamper with."""
    return pathlib.Path(shutil.copytree(finished_run, tmp_path / "run"))


@pytest.fixture
def marker(tmp_path):
    """The file the payload creates when it is unpickled."""
    return tmp_path / "CODE_RAN"


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_resume_refuses_a_crafted_checkpoint(run, marker, capsys, how):
    """An interrupted run whose checkpoint.pt is a crafted pickle: the relaunch refuses it with one
    line (the file, why, resume=false), exit code 2, and leaves the file where it is."""
    RunDir(run).write_status("interrupted", run_key=RunDir(run).read_status()["run_key"])
    plant(run / "checkpoint.pt", marker, how)
    capsys.readouterr()
    assert main(["train", *RUN_ARGS, f"hydra.run.dir={run}"]) == 2
    assert not marker.exists(), "code from the file ran"
    lines = mlbreg_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"mlbreg: cannot read checkpoint {run / 'checkpoint.pt'}: ")
    assert "resume=false" in lines[0]
    if how == "torch.save":
        assert "holds a Python object" in lines[0] and "runs no code" in lines[0]
    assert (run / "checkpoint.pt").exists()


def test_a_checkpoint_of_the_older_format_is_refused_with_the_way_out(run, capsys):
    """A checkpoint as mlbreg wrote them before it loaded tensors-only (numpy's RNG state as a numpy
    array) is refused, not unpickled: one line naming the file, the older format and resume=false;
    resume=false then trains the run fresh."""
    RunDir(run).write_status("interrupted", run_key=RunDir(run).read_status()["run_key"])
    ckpt = load_tensors(run / "checkpoint.pt")
    assert isinstance(ckpt["rng"]["numpy"][1], list)  # the current format: plain values
    ckpt["rng"]["numpy"] = np.random.get_state()  # the older one: an ndarray
    torch.save(ckpt, run / "checkpoint.pt")
    capsys.readouterr()
    assert main(["train", *RUN_ARGS, f"hydra.run.dir={run}"]) == 2
    lines = mlbreg_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"mlbreg: cannot read checkpoint {run / 'checkpoint.pt'}: it holds a Python object (numpy.")
    assert "an mlbreg before 2026-12-06 stored numpy's RNG state so" in lines[0] and "resume=false" in lines[0]
    assert main(["train", *RUN_ARGS, f"hydra.run.dir={run}", "resume=false"]) == 0


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_from_checkpoint_refuses_a_crafted_file(tmp_path, marker, capsys, how):
    """method.from_checkpoint=FILE (prune + fine-tune of a model someone shared) with a crafted
    file: one line naming the file, exit code 2, no run trained."""
    file = tmp_path / "shared" / "model.pt"
    plant(file, marker, how)
    capsys.readouterr()
    code = main(
        [
            "train",
            "method=prune_finetune",
            "sparsity=0.9",
            f"method.from_checkpoint={file}",
            *RUN_ARGS,
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert code == 2
    assert not marker.exists(), "code from the file ran"
    lines = mlbreg_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"mlbreg: cannot read method.from_checkpoint file {file}: ")
    assert not (tmp_path / "run" / "model.pt").exists()


def test_from_checkpoint_takes_a_state_dict_plain_or_under_model_or_state_dict(finished_run, tmp_path):
    """A plain state_dict, a run's checkpoint.pt (under "model") and a model zoo's {"state_dict": ...}
    all load; a file holding no state_dict is refused with one line naming it."""
    state = load_tensors(finished_run / "model.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "zoo.pt")
    torch.save({"weights": [1.0, 2.0]}, tmp_path / "other.pt")
    for source in (finished_run / "model.pt", finished_run / "checkpoint.pt", tmp_path / "zoo.pt", finished_run):
        model = create_model("mlp", 10, (1, 8, 8), hidden=[16])
        load_dense_weights(model, source)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError) as err:
        load_dense_weights(create_model("mlp", 10, (1, 8, 8), hidden=[16]), tmp_path / "other.pt")
    assert str(err.value).startswith(f"method.from_checkpoint: {tmp_path / 'other.pt'} holds no state_dict")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("command", [["export"], ["eval"], ["bench"]])
def test_commands_refuse_a_crafted_model_pt(run, marker, capsys, command):
    """`mlbreg export / eval / bench RUN` on a finished run whose model.pt is crafted: one line
    naming the file and the way out, exit code 2."""
    plant(run / "model.pt", marker)
    capsys.readouterr()
    assert main([command[0], str(run), *command[1:]]) == 2
    assert not marker.exists(), "code from the file ran"
    lines = mlbreg_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"mlbreg {command[0]}: cannot read model file {run / 'model.pt'}: it holds a Python object")
    assert lines[0].endswith("train the run again (resume=false) to rewrite it")


def test_load_refuses_a_crafted_model_pt(run, marker):
    """mlbreg.load(RUN) (the library's entry point) on a crafted model.pt: an ExportError, one line."""
    plant(run / "model.pt", marker)
    with pytest.raises(ExportError, match="cannot read model file .* holds a Python object") as err:
        mlbreg.load(run)
    assert not marker.exists(), "code from the file ran"
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("where", ["file", "run"])
def test_eval_refuses_a_crafted_exported_file(run, marker, capsys, where):
    """An exported file (read as safetensors: no pickle at all) that is a crafted pickle, passed
    as a file or found in the run directory: one line naming it, exit code 2."""
    file = run.parent / "shared.safetensors" if where == "file" else run / "model.safetensors"
    plant(file, marker)
    capsys.readouterr()
    assert main(["eval", str(file if where == "file" else run)]) == 2
    assert not marker.exists(), "code from the file ran"
    lines = mlbreg_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"mlbreg eval: cannot read {file} as a safetensors file"), lines


def test_report_draws_no_mask_from_a_crafted_model_pt(run, marker, tmp_path):
    """`mlbreg report` over a run whose model.pt is crafted: the report is written, without that
    mask picture, and its notes say why in one line naming the file."""
    plant(run / "model.pt", marker)
    assert main(["report", str(run), "--out", str(tmp_path / "report"), "--dpi", "20"]) == 0
    assert not marker.exists(), "code from the file ran"
    notes = [line for line in (tmp_path / "report" / "report.md").read_text().splitlines() if "cannot read" in line]
    assert len(notes) == 1 and f"cannot read model file {run / 'model.pt'}: it holds a Python object" in notes[0]


def _tiny_imagenet(root: pathlib.Path) -> None:
    from PIL import Image

    base = root / "tiny-imagenet-200"
    (base / "train" / "n01" / "images").mkdir(parents=True)
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("n01\n")
    Image.new("RGB", (64, 64), (10, 20, 30)).save(base / "train" / "n01" / "images" / "n01_0.JPEG")
    Image.new("RGB", (64, 64), (40, 50, 60)).save(base / "val" / "images" / "val_0.JPEG")
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01\t0\t0\t63\t63\n")


def test_a_crafted_data_cache_is_rebuilt_not_unpickled(tmp_path, marker, caplog):
    """TinyImageNet's decoded cache replaced by a crafted file: the data set loads (the cache is
    rebuilt from the images) and the one-line warning names the file."""
    _tiny_imagenet(tmp_path)
    first = load_dataset("tinyimagenet", root=tmp_path)
    cache = tmp_path / "tiny-imagenet-200" / sources._TINY_CACHE
    plant(cache, marker)
    with caplog.at_level(logging.WARNING, logger="mlbreg.data.cache"):
        again = load_dataset("tinyimagenet", root=tmp_path)
    assert not marker.exists(), "code from the file ran"
    assert torch.equal(again.train.x, first.train.x) and torch.equal(again.test.y, first.test.y)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith(f"ignoring cannot read cache {cache}: it holds a Python object")
    assert isinstance(load_tensors(cache), dict)  # rewritten as tensors and plain values


def test_crafted_cifar_batches_are_not_unpickled(tmp_path, marker):
    """CIFAR-10's files are pickles by format: torchvision unpickles them only once each file's md5
    matches the official one, so crafted ones are refused as corrupted (one line, where to get them)."""
    for name in sources._CIFAR_FILES:
        plant(tmp_path / "cifar-10-batches-py" / name, marker, "pickle")
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("cifar10", root=tmp_path)
    assert not marker.exists(), "code from the file ran"
    assert str(err.value).startswith("CIFAR-10 not found or corrupted") and "\n" not in str(err.value)


def test_load_tensors_names_the_file_in_one_line(tmp_path, marker):
    """The one reader: tensors and plain values load; a crafted file (torch's format or a bare
    pickle), a garbled one and an empty one each give one line naming the file, and no warning."""
    plain = {"w": torch.ones(2), "rng": (3, (1, 2), None), "choices": {"k": dict(nnz=3, mode=None, why="x")}}
    torch.save(plain, tmp_path / "ok.pt")
    assert load_tensors(tmp_path / "ok.pt")["choices"] == plain["choices"]
    plant(tmp_path / "crafted.pt", marker)
    plant(tmp_path / "pickled.pt", marker, "pickle")
    (tmp_path / "garbled.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("crafted.pt", "pickled.pt", "garbled.pt", "empty.pt"):
        with pytest.raises(TensorFileError) as err, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_tensors(tmp_path / name, "model file")
        assert not caught, [str(w.message) for w in caught]  # torch's warnings would add lines
        assert not marker.exists(), "code from the file ran"
        assert str(err.value).startswith(f"cannot read model file {tmp_path / name}: ")
        assert "\n" not in str(err.value) and "weights_only" not in str(err.value)
