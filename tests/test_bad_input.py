"""Bad input fails early with a message naming the key, the value and what is allowed."""

import pytest
import torch

from mlbreg.cli import main
from mlbreg.rundir import RunDir
from mlbreg.train import train

from helpers import make_cfg

CASES = [
    # (overrides, words the message must contain)
    (["model=foo"], ["model/foo", "mlp", "resnet18", "wrn28_10"]),
    (["dataset=imagenet"], ["dataset/imagenet", "cifar10", "digits"]),
    (["method=adam"], ["method/adam", "mllinbreg", "sgd"]),
    (["regularizer=l2"], ["regularizer/l2", "group", "l1"]),
    (["init=random"], ["init/random", "erk", "uniform"]),
    (["lam=-1"], ["lam=-1", ">= 0"]),
    (["m=0"], ["m=0", "integer >= 1"]),
    (["m=2.5"], ["m=2.5", "integer >= 1"]),
    (["init.density=0"], ["init.density=0", "(0, 1]"]),
    (["init.density=1.5"], ["init.density=1.5", "(0, 1]"]),
    (["batch_size=0"], ["batch_size=0", "integer >= 1"]),
    (["epochs=-3"], ["epochs=-3", "integer >= 1"]),
    (["lr=0"], ["lr=0", "> 0"]),
    (["momentum=1.0"], ["momentum=1.0", "[0, 1)"]),
    (["device=tpu"], ["device='tpu'", "auto, cpu, cuda"]),
    (["backend=mkl"], ["backend='mkl'", "torch", "sparseprop"]),
    (["method=sgd", "backend=sparseprop"], ["backend='sparseprop'", "method=sgd", "backend=torch"]),
    (["backend=sparseprop", "compile=true"], ["compile=True", "torch layers only"]),
    (["compile_optimizer=maybe"], ["compile_optimizer='maybe'", "auto, true, false"]),
    (["method.criterion=sometimes"], ["method.criterion='sometimes'", "fixed, adaptive"]),
    (["lam=abc"], ["lam='abc'", "must be a number"]),
    (
        ["dataset=cifar10", "dataset.root=/nonexistent/data"],
        ["/nonexistent/data/cifar-10-batches-py", "cifar-10-python.tar.gz", "dataset.download=true"],
    ),
    (
        ["dataset=tinyimagenet", "dataset.root=/nonexistent/data"],
        ["/nonexistent/data/tiny-imagenet-200", "val_annotations.txt"],
    ),
    (["dataset=mnist", "dataset.root=/nonexistent/data"], ["/nonexistent/data/MNIST/raw", "train-images-idx3-ubyte"]),
    # typos: Hydra's "use +lamda=0.1" advice would train with the default λ
    (["lamda=0.1"], ["unknown key 'lamda'", "did you mean lam?"]),
    (["+lamda=0.1"], ["unknown key 'lamda'", "did you mean lam?"]),
    (["+epoch=3"], ["unknown key 'epoch'", "did you mean epochs?"]),
    (["method.detla=2"], ["unknown key 'method.detla'", "did you mean method.delta?"]),
    (["+method.delta_t=5"], ["unknown key 'method.delta_t'", "valid: criterion"]),  # a rigl key, not ML LinBreg's
    (["method=rigl"], ["sparsity=null", "method=rigl needs a target sparsity"]),
    (["seed=1.5"], ["seed=1.5", "integer >= 0"]),
    (["lam=nan"], ["lam=nan", "finite"]),
    (["lr=inf"], ["lr=inf", "finite"]),
    (["num_threads=-2"], ["num_threads=-2", "integer >= 1"]),
    (["eval_batch_size=0"], ["eval_batch_size=0", "integer >= 1"]),
    (["resume=maybe"], ["resume='maybe'", "true or false"]),
    (["method.kappa=-1"], ["method.kappa=-1", "[0, 1]"]),
    (["method.dampening=2"], ["method.dampening=2", "[0, 1]"]),
    (["dataset=foo"], ["dataset/foo", "cifar10"]),
]


@pytest.mark.parametrize("overrides,words", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_gives_one_clear_message_and_no_files(tmp_path, capsys, overrides, words):
    code = main(["train", *overrides, f"output_root={tmp_path}/out", "progress=false"])
    err = capsys.readouterr().err
    assert code == 2
    assert "\nmlbreg: " in "\n" + err and "Traceback" not in err
    for word in words:
        assert word in err
    # bad input (missing data included) fails before Hydra creates the run directory
    assert not (tmp_path / "out").exists()


def test_a_sweep_with_a_bad_job_starts_none_and_names_it(tmp_path, capsys):
    code = main(["train", "-m", "lam=0.1,-1,0.2", "m=0,5", "epochs=1", f"output_root={tmp_path}/out", "progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "4 of 6 jobs of the sweep are invalid, so none was started" in err
    # one line per distinct error, with the jobs (by their overrides) it applies to
    assert "invalid lam=-1: must be >= 0  (2 jobs, e.g. [lam=-1 m=0" in err
    assert "invalid m=0: must be an integer >= 1 (m = 1 is LinBreg)  (2 jobs, e.g. [lam=0.1 m=0" in err
    assert main(["train", "-m", "lam=0.1,-1", "epochs=1", f"output_root={tmp_path}/out"]) == 2
    assert "1 of 2 jobs" in capsys.readouterr().err
    assert not list((tmp_path / "out").rglob("metrics.csv"))  # no job ran


def test_hydra_flags_after_overrides_get_the_right_order(tmp_path, capsys):
    assert main(["train", "lam=1,2", "-m", f"output_root={tmp_path}/out"]) == 2
    err = capsys.readouterr().err
    assert "Hydra flags go before the overrides: mlbreg train -m lam=1,2" in err
    assert not (tmp_path / "out").exists()
    assert main(["train", "lam=1", "--cfg", "job"]) == 2  # a flag keeps its value
    assert "mlbreg train --cfg job lam=1" in capsys.readouterr().err


def test_machine_checks_can_be_left_to_the_compute_node():
    # a sweep submitted to Slurm is checked on the login node, which may lack CUDA
    from mlbreg.config import ConfigError, validate

    cfg = make_cfg("device=cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            validate(cfg)
    validate(cfg, environment=False)


def test_a_key_the_method_ignores_is_noted_not_refused(tmp_path, capsys):
    # one sweep may cover several methods: method=sgd,rigl sparsity=0.9
    assert main(["train", "sparsity=0.9", "epochs=1", f"output_root={tmp_path}", "progress=false"]) == 0
    assert "note: sparsity=0.9 is not used by method=mllinbreg" in capsys.readouterr().err


def test_unreadable_checkpoint_is_an_error_not_a_silent_restart(tmp_path, capsys):
    cfg = make_cfg("epochs=2")
    train(cfg, tmp_path)
    RunDir(tmp_path).write_status("interrupted", run_key="x")
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    rows_before = (tmp_path / "metrics.csv").read_bytes()
    with pytest.raises(Exception) as err:
        train(cfg, tmp_path)
    assert "cannot read checkpoint" in str(err.value) and "resume=false" in str(err.value)
    assert (tmp_path / "metrics.csv").read_bytes() == rows_before  # nothing overwritten
    out = train(make_cfg("epochs=2", "resume=false"), tmp_path)  # the documented way out
    assert out["status"] == "finished"
