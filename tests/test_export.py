"""`mlbreg export / eval / bench` and `mlbreg.load` on real tiny runs on digits."""

import json
import math
import shutil
import struct

import pytest
import torch

import mlbreg
from mlbreg.cli import main
from mlbreg.export import EXPORT_NAME, ExportError, dataset_shapes
from mlbreg.sparse_format import decode_weight, encode_weight, layer_nbytes
from mlbreg.train import train

from helpers import make_cfg


def _train(path, *overrides):
    threads = torch.get_num_threads()
    try:
        # num_threads in the config: eval sets the same count, so the sums are the same
        outcome = train(make_cfg("num_threads=1", *overrides), path)
    finally:
        torch.set_num_threads(threads)
    assert outcome["status"] == "finished"
    return path


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    """LinBreg, 3 epochs: ~96% zeros; the first layer below 1/32 density, the last above."""
    return _train(tmp_path_factory.mktemp("mlp"), "method=linbreg", "lam=0.3", "epochs=3", "model.hidden=[128]")


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory):
    """ML LinBreg on the conv net (BatchNorm buffers, an int64 counter), 1 epoch from 5% density."""
    return _train(tmp_path_factory.mktemp("conv"), "model=convnet", "epochs=1", "init.density=0.05")


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    (dst / EXPORT_NAME).unlink(missing_ok=True)
    return dst


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


def _assert_bitwise_equal(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert _bits(a[k]) == _bits(b[k]), k


def _final(run) -> dict:
    import pandas as pd

    return pd.read_csv(run / "metrics.csv").iloc[-1].to_dict()


@pytest.mark.parametrize("which", ["mlp_run", "conv_run"])
def test_export_load_eval_reproduces_the_run_exactly(which, request, capsys):
    run = request.getfixturevalue(which)
    assert main(["export", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {run / EXPORT_NAME}" in out
    exported = torch.load(run / "model.pt", weights_only=True)
    for source in (run / EXPORT_NAME, run):
        model = mlbreg.load(source)
        assert not model.training
        _assert_bitwise_equal(model.state_dict(), exported)
    assert main(["eval", str(run / EXPORT_NAME)]) == 0
    out = capsys.readouterr().out
    acc = _final(run)["test_acc_pct"]
    assert f"test accuracy {acc:.4f}%" in out and "equal: the model reproduces" in out


def test_model_pt_of_a_run_without_export(mlp_run, tmp_path, capsys):
    run = _copy(mlp_run, tmp_path)
    _assert_bitwise_equal(mlbreg.load(run).state_dict(), torch.load(run / "model.pt", weights_only=True))
    assert main(["eval", str(run)]) == 0
    assert "(model.pt;" in capsys.readouterr().out


def test_file_is_the_compressed_size_at_high_sparsity(mlp_run, tmp_path):
    from mlbreg.metrics import model_bytes

    run = _copy(mlp_run, tmp_path)
    final = _final(run)
    assert final["sparsity_pct"] >= 95.0
    assert main(["export", str(run), "--out", str(tmp_path / "m.safetensors")]) == 0
    path = tmp_path / "m.safetensors"
    size, dense_size = path.stat().st_size, (run / "model.pt").stat().st_size
    assert size < dense_size / 4
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_len])
    meta = header.pop("__metadata__")
    data = size - 8 - header_len
    # the data section is exactly what report's size rule counts (training's metrics and now)
    assert data == final["model_bytes_sparse"] == model_bytes(mlbreg.load(path))["model_bytes_sparse"]
    assert data == sum(end - begin for begin, end in (t["data_offsets"] for t in header.values()))
    assert header_len < 8192  # the small header: names, shapes, config, final metrics
    layout = json.loads(meta["sparse"])
    # the first layer holds fewer than 1/32 non-zeros, the last more: both position codes in one run
    assert {name: info["encoding"] for name, info in layout.items()} == {"net.1.weight": "indices", "net.3.weight": "bitmask"}
    assert meta["mlbreg"] == mlbreg.__version__ and meta["config"] == (run / "config.yaml").read_text()


@pytest.mark.parametrize(
    "shape,nnz",
    [
        ((64, 64), 127),
        ((64, 64), 128),
        ((64, 64), 129),
        ((10, 3, 3, 3), 0),
        ((10, 3, 3, 3), 270),
        ((7, 13), 2),
        ((7, 13), 40),
        ((3,), 1),
    ],
)
def test_position_codes_round_trip_exactly(shape, nnz):
    """Indices below density 1/32 (4·nnz < numel/8), the bitmask from there on (a tie is the same size)."""
    numel = math.prod(shape)
    g = torch.Generator().manual_seed(nnz)
    w = torch.zeros(numel)
    w[torch.randperm(numel, generator=g)[:nnz]] = torch.randn(nnz, generator=g)
    w = w.reshape(shape)
    parts, encoding = encode_weight(w)
    assert encoding == ("indices" if 4 * nnz < math.ceil(numel / 8) else "bitmask")
    assert sum(p.numel() * p.element_size() for p in parts.values()) == layer_nbytes(numel, nnz)
    back = decode_weight("w", parts, dict(shape=list(shape), encoding=encoding))
    assert _bits(back) == _bits(w)


def test_a_run_that_did_not_finish_is_refused(mlp_run, tmp_path, capsys):
    run = _copy(mlp_run, tmp_path)
    status = json.loads((run / "status.json").read_text())
    status.update(status="interrupted", epoch=2, message="stopped by signal 15 after epoch 2; rerun to resume")
    (run / "status.json").write_text(json.dumps(status))
    assert main(["export", str(run)]) == 2
    err = capsys.readouterr().err
    assert "is interrupted after epoch 2" in err and "rerun the same `mlbreg train` command" in err
    assert not (run / EXPORT_NAME).exists()
    for command in ("eval", "bench"):
        assert main([command, str(run)]) == 2
        assert "is interrupted" in capsys.readouterr().err
    assert main(["export", str(tmp_path)]) == 2
    assert "not a run directory: no readable status.json" in capsys.readouterr().err
    assert main(["export", str(mlp_run), "--format", "onnx"]) == 2
    assert "unknown format 'onnx'; valid: safetensors" in capsys.readouterr().err


def test_a_stale_export_and_a_changed_accuracy_are_reported(mlp_run, tmp_path, capsys):
    run = _copy(mlp_run, tmp_path)
    assert main(["export", str(run)]) == 0
    metrics = (run / "metrics.csv").read_text().splitlines()
    header, last = metrics[0].split(","), metrics[-1].split(",")
    i = header.index("test_acc_pct")
    last[i] = repr(float(last[i]) + 1.0)
    (run / "metrics.csv").write_text("\n".join(metrics[:-1] + [",".join(last)]) + "\n")
    capsys.readouterr()
    assert main(["eval", str(run)]) == 1
    assert "differs from the run's" in capsys.readouterr().err
    # the run trained again after its export: the export no longer holds its model
    state = torch.load(run / "model.pt", weights_only=True)
    state["net.3.bias"] += 1
    torch.save(state, run / "model.pt")
    with pytest.raises(ExportError, match="export it again"):
        mlbreg.load(run)


def test_shape_table_matches_the_data(mlp_run):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(mlp_run / "config.yaml")
    assert dataset_shapes(cfg) == dataset_shapes(cfg, from_data=True) == (10, (1, 8, 8))
    synthetic = make_cfg(
        "dataset=synthetic", "dataset.shape=[3,16,16]", "dataset.num_classes=5", "dataset.train_size=8", "dataset.test_size=8"
    )
    assert dataset_shapes(synthetic) == dataset_shapes(synthetic, from_data=True) == (5, (3, 16, 16))


def test_bench_prints_a_row_per_backend(conv_run, capsys):
    from mlbreg.backends import sparseprop_available
    from mlbreg.backends.native import unavailable_reason

    assert (
        main(["bench", str(conv_run), "--batch-sizes", "1,2", "--threads", "1", "--min-run-time", "0.01", "--rounds", "2"]) == 0
    )
    out = capsys.readouterr().out
    rows = {(cols[0], cols[1]) for cols in (line.split() for line in out.splitlines()) if len(cols) > 5}
    available = {"native": unavailable_reason() is None, "sparseprop": sparseprop_available()}
    for name in ["dense"] + [n for n, ok in available.items() if ok]:
        assert {(name, "1"), (name, "2")} <= rows, out
    for name in (n for n, ok in available.items() if not ok):
        assert f"{name}: not run: " in out
    if available["native"]:
        assert "native kernels: " in out and " path" in out and "4 of 4" in out
    assert "; 1 thread;" in out
    with pytest.raises(SystemExit):  # argparse's usage error
        main(["bench", str(conv_run), "--batch-sizes", "1,x"])
    assert "expected positive integers separated by commas" in capsys.readouterr().err
