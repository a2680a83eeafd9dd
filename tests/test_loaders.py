"""The torchvision/PIL loader (`dataset.loader=torchvision`) against the tensor loader."""

import pytest
import torch

from mlbreg.data import BatchLoader, TorchvisionLoader, load_dataset, make_loader
from mlbreg.train import train

from helpers import make_cfg


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset("synthetic", shape=(3, 16, 16), train_size=40, test_size=8, augment=True)


def test_without_augmentation_both_loaders_give_the_same_batches(synthetic):
    args = (synthetic.train, 16, synthetic.mean, synthetic.std)
    a = list(BatchLoader(*args, shuffle=False, augment=False))
    b = list(TorchvisionLoader(*args, shuffle=False, augment=False, num_workers=0))
    assert len(a) == len(b) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        torch.testing.assert_close(xa, xb, rtol=1e-5, atol=1e-5)
        assert torch.equal(ya, yb)


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_visits_every_sample_once_and_is_reproducible(synthetic, workers):
    loader = TorchvisionLoader(
        synthetic.train, 16, synthetic.mean, synthetic.std, shuffle=True, augment=True, num_workers=workers, seed=3
    )
    loader.set_epoch(1)
    first = list(loader)
    again = list(loader)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, again))
    assert sorted(torch.cat([y for _, y in first]).tolist()) == sorted(synthetic.train.y.tolist())
    loader.set_epoch(2)
    assert not all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(first, loader))


def test_unknown_loader_is_named():
    with pytest.raises(ValueError, match="unknown loader 'dali'; valid: tensor, torchvision"):
        make_loader("dali", None, 1, (0,), (1,))


def test_digits_run_with_the_torchvision_loader(tmp_path):
    train(make_cfg("dataset.loader=torchvision", "dataset.num_workers=0", "epochs=30", "method=sgd"), tmp_path)
    import pandas as pd

    assert pd.read_csv(tmp_path / "metrics.csv").test_acc_pct.iloc[-1] > 90
