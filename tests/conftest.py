"""Fixtures and markers shared by the tests (plain helper functions are in helpers.py).

Markers (registered in pyproject.toml): `slow` (deselected by default; `-m slow` runs them),
`gpu` (skipped without CUDA), `sparseprop` (skipped without the SparseProp package).
"""

import pytest
import torch


def _sparseprop_missing() -> str | None:
    from mlbreg.backends import sparseprop_available

    if sparseprop_available():
        return None
    return (
        "SparseProp is not installed or failed to build (pip install pybind11 scipy && "
        "pip install --no-build-isolation 'sparseprop>=0.1.14')"
    )


def pytest_collection_modifyitems(config, items):
    reasons = {"gpu": None if torch.cuda.is_available() else "needs CUDA"}
    if any("sparseprop" in item.keywords for item in items):
        reasons["sparseprop"] = _sparseprop_missing()
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # 2-core CI machine: one thread per test process keeps timings and results stable
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="session")
def _own_choice_record(tmp_path_factory):
    # the timed layer choices of the tests go to a record of their own (inherited by subprocesses),
    # not to the user's machine record (backends/choice_store.py)
    import os

    previous = os.environ.get("MLBREG_CHOICE_CACHE")
    os.environ["MLBREG_CHOICE_CACHE"] = str(tmp_path_factory.mktemp("layer-choices"))
    yield
    if previous is None:
        del os.environ["MLBREG_CHOICE_CACHE"]
    else:
        os.environ["MLBREG_CHOICE_CACHE"] = previous
