"""mlbreg: sparse training from scratch with ML LinBreg and its baselines."""
__version__ = "0.1.0"


def load(path, device="cpu"):
    """The trained model of a run directory or an exported file, rebuilt from the run's
    config (see `mlbreg.export.load`)."""
    from .export import load as _load
    return _load(path, device=device)
