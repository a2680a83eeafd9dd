"""mlbreg: sparse training from scratch with ML LinBreg and its baselines."""
__version__ = "0.1.0"
