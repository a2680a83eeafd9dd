"""The project's own sparse CPU kernels (``backend=native``): build.py compiles and checks them,
ops.py wraps them as autograd functions, backend.py swaps them into a model for coarse steps."""

from .build import NativeUnavailable, cpu_model, unavailable_reason

__all__ = ["NativeUnavailable", "cpu_model", "unavailable_reason"]
