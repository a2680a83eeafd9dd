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
    return ("SparseProp is not installed or failed to build (pip install pybind11 scipy && "
            "pip install --no-build-isolation 'sparseprop>=0.1.14')")


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
