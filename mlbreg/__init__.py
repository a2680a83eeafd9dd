"""mlbreg: sparse training from scratch with ML LinBreg and its baselines."""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """The trained model of a run directory or an exported file, rebuilt from the run's
    config (see `mlbreg.export.load`)."""
    from .export import load as _load

    return _load(path, device=device)


def sparse_steps(model, optimizer, backend="auto", **options):
    """ML LinBreg's coarse steps on sparse CPU layers in your own training loop (hooks on the model and
    the optimizer; see `mlbreg.loop_hooks.sparse_steps` and docs/own-model.md)."""
    from .loop_hooks import sparse_steps as _sparse_steps

    return _sparse_steps(model, optimizer, backend=backend, **options)
