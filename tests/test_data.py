"""Tests of mlbreg.data: tiny fixtures in the real on-disk formats, loaded through the real code."""

import hashlib
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mlbreg.data import BatchLoader, DataNotFoundError, Split, load_dataset
from mlbreg.data import sources as data  # where _load_tinyimagenet finds _read_jpegs (patched below)

# --------------------------------------------------------------------------- fixtures on disk


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """CIFAR-10 python-version batches, 4 images per train batch, 6 in test_batch.

    The real files are Python 2 pickles whose str keys load as str under
    encoding="latin1" (how torchvision reads them), so str keys here reproduce
    what torchvision sees.  torchvision checks each file's md5 against the
    class attributes train_list/test_list/meta; we point those at the md5s of
    the fixture files, so the real integrity check and loading code still run.
    """
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    for name, n in [*[(f"data_batch_{i}", 4) for i in range(1, 6)], ("test_batch", 6)]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump(
                {"batch_label": name, "labels": y, "data": x, "filenames": [f"{i}.png" for i in range(n)]}, f, protocol=2
            )
        written[name] = (x, y)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": 4, "num_vis": 3072}, f, protocol=2)
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", _md5(folder / f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")})
    return tmp_path, written


def _write_idx(path, array):
    # idx format: big-endian magic (0, 0, dtype 0x08 = uint8, ndim), then big-endian int32 dims, then data.
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_mnist(root, folder):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for prefix, n in [("train", 12), ("t10k", 5)]:
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
        written[prefix] = (x, y)
    return written


# wnids.txt deliberately unsorted: class index is the position in the *sorted* list.
TINY_WNIDS = ["n0300", "n0100", "n0200"]


def _jpeg(path, color, gray=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if gray:
        Image.new("L", (64, 64), color[0]).save(path, quality=95)
    else:
        Image.new("RGB", (64, 64), tuple(color)).save(path, quality=95)


def _write_tiny(root):
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    colors = {}  # file name -> expected RGB
    for k, wnid in enumerate(TINY_WNIDS):
        for j in range(2):
            color = (40 * k + 20, 100 + 30 * j, 200 - 50 * k)
            gray = k == 0 and j == 1
            if gray:
                color = (90, 90, 90)
            _jpeg(base / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", color, gray=gray)
            colors[f"{wnid}_{j}"] = color
    lines = []
    for i, wnid in enumerate(["n0200", "n0300", "n0100", "n0200"]):
        color = (10 + 50 * i, 60, 240 - 40 * i)
        _jpeg(base / "val" / "images" / f"val_{i}.JPEG", color)
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
        colors[f"val_{i}"] = color
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base, colors


# --------------------------------------------------------------------------- loading


def test_cifar10_round_trip(cifar_root):
    root, written = cifar_root
    assert data.missing_data("cifar10", str(root)) is None  # the config check finds the files
    ds = load_dataset("cifar10", root=str(root))
    train_x = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_y = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert ds.train.x.dtype == torch.uint8 and ds.train.x.shape == (20, 3, 32, 32)
    assert ds.train.y.dtype == torch.int64
    # CIFAR rows are channel-major (1024 R, 1024 G, 1024 B), i.e. exactly CHW.
    assert torch.equal(ds.train.x, torch.from_numpy(train_x.reshape(-1, 3, 32, 32)))
    assert ds.train.y.tolist() == train_y
    assert torch.equal(ds.test.x, torch.from_numpy(written["test_batch"][0].reshape(-1, 3, 32, 32)))
    assert ds.test.y.tolist() == written["test_batch"][1]
    assert (ds.num_classes, ds.in_shape, ds.augment) == (10, (3, 32, 32), True)
    assert len(ds.mean) == len(ds.std) == 3


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_round_trip(tmp_path, name, folder):
    written = _write_mnist(tmp_path, folder)
    assert data.missing_data(name, tmp_path) is None
    ds = load_dataset(name, root=tmp_path)
    for split, prefix in [(ds.train, "train"), (ds.test, "t10k")]:
        x, y = written[prefix]
        assert split.x.dtype == torch.uint8 and split.x.shape == (len(y), 1, 28, 28)
        assert torch.equal(split.x[:, 0], torch.from_numpy(x))
        assert split.y.dtype == torch.int64 and split.y.tolist() == y.tolist()
    assert (ds.num_classes, ds.in_shape, ds.augment) == (10, (1, 28, 28), False)


def test_tinyimagenet_round_trip_and_cache(tmp_path, monkeypatch):
    base, colors = _write_tiny(tmp_path)
    assert data.missing_data("tinyimagenet", tmp_path) is None
    ds = load_dataset("tinyimagenet", root=tmp_path)
    sorted_wnids = sorted(TINY_WNIDS)
    assert ds.train.x.shape == (6, 3, 64, 64) and ds.train.x.dtype == torch.uint8
    assert ds.test.x.shape == (4, 3, 64, 64) and ds.test.y.dtype == torch.int64
    assert (ds.num_classes, ds.in_shape, ds.augment) == (3, (3, 64, 64), True)
    # train: classes in sorted-wnid order, files sorted within a class
    expected_train = [(sorted_wnids.index(w), colors[f"{w}_{j}"]) for w in sorted_wnids for j in range(2)]
    # test: val_annotations order
    expected_test = [(sorted_wnids.index(w), colors[f"val_{i}"]) for i, w in enumerate(["n0200", "n0300", "n0100", "n0200"])]
    for split, expected in [(ds.train, expected_train), (ds.test, expected_test)]:
        assert split.y.tolist() == [label for label, _ in expected]
        want = torch.tensor([c for _, c in expected], dtype=torch.float32).view(-1, 3, 1, 1)
        assert (split.x.float() - want).abs().max() <= 3  # JPEG of a flat colour: near exact
    # mean/std computed from the train split
    x = ds.train.x.double() / 255
    assert np.allclose(ds.mean, x.mean(dim=(0, 2, 3)).tolist(), atol=1e-6)
    assert np.allclose(ds.std, x.std(dim=(0, 2, 3), unbiased=False).tolist(), atol=1e-6)

    # Second load comes from the cache: no JPEG is opened.
    assert (base / data._TINY_CACHE).exists()
    with monkeypatch.context() as m:
        m.setattr(data, "_read_jpegs", lambda files: pytest.fail("cache not used"))
        again = load_dataset("tinyimagenet", root=tmp_path)
    assert torch.equal(again.train.x, ds.train.x) and torch.equal(again.test.y, ds.test.y)
    assert again.mean == ds.mean

    # Adding an image invalidates the cache.
    _jpeg(base / "train" / "n0100" / "images" / "n0100_9.JPEG", (1, 2, 3))
    grown = load_dataset("tinyimagenet", root=tmp_path)
    assert len(grown.train) == 7


@pytest.mark.parametrize(
    "name,expected",
    [
        ("cifar10", ["cifar-10-batches-py", "data_batch_1..5", "cifar-10-python.tar.gz", "download"]),
        ("mnist", ["MNIST/raw", "train-images-idx3-ubyte", "download"]),
        ("fashion_mnist", ["FashionMNIST/raw", "t10k-labels-idx1-ubyte", "download"]),
        ("tinyimagenet", ["tiny-imagenet-200", "wnids.txt", "val_annotations.txt", "tiny-imagenet-200.zip"]),
    ],
)
def test_missing_data_message(tmp_path, name, expected):
    with pytest.raises(DataNotFoundError) as info:
        load_dataset(name, root=tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert str(tmp_path) in message
    for fragment in expected:
        assert fragment in message
    # the config check (before any run directory exists) says the same; download=True does not check
    assert data.missing_data(name, tmp_path) == message
    assert data.missing_data(name, tmp_path, download=True) is None


def test_unknown_dataset_and_option():
    with pytest.raises(ValueError, match="'imagenet'.*cifar10"):
        load_dataset("imagenet")
    with pytest.raises(TypeError, match="test_fraction"):
        load_dataset("digits", test_fractoin=0.3)


def test_digits_split_deterministic_and_stratified():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert a.train.x.dtype == torch.float32 and a.train.x.shape[1:] == (1, 8, 8)
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == 360
    assert 0 <= a.train.x.min() and a.train.x.max() <= 1
    # stratified: each class's share of the test split matches its share overall
    everything = torch.cat([a.train.y, a.test.y])
    expected = torch.bincount(everything).double() * len(a.test) / len(everything)
    assert (torch.bincount(a.test.y).double() - expected).abs().max() <= 1
    assert np.allclose(a.mean, [a.train.x.mean().item()], atol=1e-6)
    assert np.allclose(a.std, [a.train.x.std(unbiased=False).item()], atol=1e-6)
    other = load_dataset("digits", split_seed=1, test_fraction=0.25)
    assert len(other.test) == 450 and not torch.equal(other.test.y, a.test.y[:450])


def test_synthetic():
    ds = load_dataset("synthetic", shape=[1, 16, 16], num_classes=4, train_size=30, test_size=7, seed=3)
    assert ds.train.x.shape == (30, 1, 16, 16) and ds.train.x.dtype == torch.uint8
    assert ds.test.y.shape == (7,) and ds.test.y.max() < 4
    assert (ds.in_shape, ds.mean, ds.std, ds.augment) == ((1, 16, 16), (0.5,), (0.25,), False)
    assert torch.equal(
        load_dataset("synthetic", shape=(1, 16, 16), num_classes=4, train_size=30, test_size=7, seed=3).train.x, ds.train.x
    )


# --------------------------------------------------------------------------- loader


def _id_split(n=50, shape=(3, 8, 8)):
    # label = sample id, so batches tell which samples they hold
    return Split(
        torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)), torch.arange(n)
    )


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def test_epoch_visits_every_sample_once():
    split = _id_split()
    loader = BatchLoader(split, 7, (0.5,) * 3, (0.25,) * 3, shuffle=True, augment=True)
    batches = _epoch(loader, 0)
    assert len(loader) == len(batches) == 8 and len(batches[-1][1]) == 1
    ids = torch.cat([y for _, y in batches])
    assert sorted(ids.tolist()) == list(range(50)) and ids.tolist() != list(range(50))
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (3, 8, 8)
    dropped = BatchLoader(split, 7, (0.5,) * 3, (0.25,) * 3, shuffle=True, augment=False, drop_last=True)
    assert len(dropped) == len(list(dropped)) == 7 and all(len(y) == 7 for _, y in dropped)


def test_class_counts_per_epoch():
    split = Split(torch.zeros(100, 1, 4, 4, dtype=torch.uint8), torch.arange(100) % 3)
    loader = BatchLoader(split, 16, (0.0,), (1.0,), shuffle=True, augment=False)
    for epoch in range(3):
        ys = torch.cat([y for _, y in _epoch(loader, epoch)])
        assert torch.equal(torch.bincount(ys), torch.bincount(split.y))


def test_normalization():
    split = _id_split()
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    loader = BatchLoader(split, 16, mean, std, shuffle=False, augment=False)
    x = torch.cat([x for x, _ in loader])
    want = (split.x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(x, want, atol=1e-6)
    assert loader.x.dtype == torch.uint8  # stored as uint8, converted per batch
    # float splits are used as they are (no /255)
    floats = Split(split.x.float() / 255, split.y)
    fx = torch.cat([x for x, _ in BatchLoader(floats, 16, mean, std, shuffle=False, augment=False)])
    assert torch.allclose(fx, want, atol=1e-6)
    with pytest.raises(ValueError, match="one per channel"):
        BatchLoader(split, 16, (0.5,), (0.25,), shuffle=False, augment=False)


def test_same_seed_and_epoch_same_batches():
    split = _id_split()
    make = lambda seed: BatchLoader(split, 8, (0.5,) * 3, (0.25,) * 3, shuffle=True, augment=True, seed=seed)
    uninterrupted = make(0)
    runs = [_epoch(uninterrupted, e) for e in range(3)]
    resumed = _epoch(make(0), 2)  # fresh loader, as after a restart at epoch 2
    for (xa, ya), (xb, yb) in zip(runs[2], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    order = lambda batches: torch.cat([y for _, y in batches]).tolist()
    assert order(runs[0]) != order(runs[1]) != order(runs[2])
    assert order(_epoch(make(1), 0)) != order(runs[0])


def test_crop_pads_with_zero_pixels():
    # Constant image: each output pixel is the constant or padding; padding must be
    # a zero *pixel*, i.e. -mean/std after normalization.
    split = Split(torch.full((256, 3, 32, 32), 200, dtype=torch.uint8), torch.zeros(256, dtype=torch.long))
    loader = BatchLoader(split, 64, (0.5,) * 3, (0.25,) * 3, shuffle=True, augment=True)
    pad_value, image_value = (0 - 0.5) / 0.25, (200 / 255 - 0.5) / 0.25
    shifts = set()
    for x, _ in loader:
        inside = torch.isclose(x, torch.tensor(image_value))
        assert (inside | torch.isclose(x, torch.tensor(pad_value))).all()
        for mask in inside[:, 0]:
            rows, cols = mask.any(1), mask.any(0)
            assert torch.equal(mask, rows[:, None] & cols[None, :])  # a rectangle
            for line in (rows, cols):
                on = line.nonzero().flatten()
                assert len(on) >= 32 - 4 and on[-1] - on[0] + 1 == len(on)  # contiguous, shift <= 4
                assert line[0] or line[-1]  # the image window touches one border
            shifts.add((int(rows.sum()), int(cols.sum())))
    assert len(shifts) > 20  # many of the 81 offsets occur


def test_crop_and_flip_are_exact_windows():
    # Distinct pixel values: every output must be one of the 81 windows of the
    # zero-padded image, flipped or not; and offsets/flips must be ~uniform.
    c, h, w = 2, 8, 8
    image = 1 + torch.arange(c * h * w, dtype=torch.float32).view(c, h, w)
    n = 4096
    split = Split(image.expand(n, c, h, w).clone(), torch.zeros(n, dtype=torch.long))
    loader = BatchLoader(split, 512, (0.0,) * c, (1.0,) * c, shuffle=True, augment=True)
    padded = F.pad(image, (4, 4, 4, 4))
    candidates = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)]
    windows = torch.stack(
        [
            padded[:, dy : dy + h, dx : dx + w].flip(2) if flip else padded[:, dy : dy + h, dx : dx + w]
            for dy, dx, flip in candidates
        ]
    )
    counts = torch.zeros(len(candidates))
    for x, _ in loader:
        match = (x[:, None] == windows[None]).flatten(2).all(2)  # (batch, candidates)
        assert (match.sum(1) == 1).all()
        counts += match.sum(0)
    flips = counts.view(81, 2)[:, 1].sum() / n
    assert abs(flips - 0.5) < 0.05
    per_offset = counts.view(81, 2).sum(1)
    assert per_offset.min() > 20 and per_offset.max() < 90  # expected 4096 / 81 ~ 51


def test_download_without_network_says_what_to_put_where(tmp_path, monkeypatch):
    import urllib.error

    from torchvision.datasets import CIFAR10

    def offline(self):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(CIFAR10, "download", offline)  # a machine without internet
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("cifar10", root=tmp_path, download=True)
    message = str(info.value)
    assert "downloading cifar10 failed" in message and "no route to host" in message
    assert f"{tmp_path}/cifar-10-batches-py" in message and "cifar-10-python.tar.gz" in message


def test_dataset_records_state_what_the_loader_gives():
    """A data set's record (classes, input shape, split sizes) is what its loader returns, so the code
    that relies on it without loading the data (export, the GPU-hours estimate) gets the truth."""
    from mlbreg.data import DATASETS, load_dataset

    data = load_dataset("digits")
    source = DATASETS.get("digits")
    assert (source.num_classes, source.in_shape, source.sizes) == (
        data.num_classes,
        tuple(data.in_shape),
        (len(data.train), len(data.test)),
    )
    assert all(DATASETS.get(n).missing is not None for n in ("cifar10", "tinyimagenet", "mnist", "fashion_mnist"))
