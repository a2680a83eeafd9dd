"""Build and load the native kernels (a torch C++ extension, compiled at first use and cached).

The binary is built with ``-O3 -march=native -fopenmp`` for the CPU it runs on, so the cache key holds
the source hash, the torch version, the chosen vector path and a fingerprint of the CPU (a shared home
directory on a cluster must not hand an AVX-512 build to an AVX2 node). Cache: ``$MLBREG_CACHE`` or
``$XDG_CACHE_HOME/mlbreg`` (default ``~/.cache/mlbreg``), outside the repository.

``MLBREG_NATIVE_ISA=auto|avx2|plain`` picks the vector path: ``auto`` takes the widest the compiler
targets on this CPU (AVX-512, else AVX2+FMA, else plain C++); the others force a narrower one (for
tests and comparisons). After loading, a self-check runs every kernel on a small case against torch:
a build that computes wrong numbers is never used.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import platform
import sys
from contextlib import redirect_stdout
from pathlib import Path

import torch

from . import ops

SOURCE = Path(__file__).with_name("kernels.cpp")
ISAS = ("auto", "avx2", "plain")


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be built or loaded on this machine (the message says why)."""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> str:
    """The vector features that decide the speed of dense and sparse training here (AVX2, AVX-512,
    AVX512_BF16, AMX), as listed in /proc/cpuinfo; "" where it cannot be read."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return ""
    return " ".join(w for w in wanted if w in flags)


def cpu_fingerprint() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return hashlib.sha1(f"{cpu_model()}|{platform.machine()}|{flags}".encode()).hexdigest()[:8]


def cache_dir() -> Path:
    root = os.environ.get("MLBREG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mlbreg"
    )
    return Path(root)


def _isa() -> str:
    isa = os.environ.get("MLBREG_NATIVE_ISA", "auto")
    if isa not in ISAS:
        raise NativeUnavailable(f"MLBREG_NATIVE_ISA={isa!r} is not one of {', '.join(ISAS)}")
    return isa


@functools.cache
def _load(isa: str):
    if platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        raise NativeUnavailable(f"untested CPU architecture {platform.machine()}")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime": not needed here
    from torch.utils import cpp_extension

    src_hash = hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:10]
    # the checkout's path too: ninja rebuilds when the source path in its build file changes, so two
    # checkouts sharing one cache would otherwise rebuild each other's extension on every load
    where = hashlib.sha1(str(SOURCE.resolve()).encode()).hexdigest()[:6]
    tag = f"{isa}_{src_hash}_{where}_{cpu_fingerprint()}_t{torch.__version__.replace('+', '_').replace('.', '_')}"
    build_dir = cache_dir() / "native" / tag
    build_dir.mkdir(parents=True, exist_ok=True)
    cflags = ["-O3", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        cflags.append("-march=native")
    else:
        cflags.append("-mcpu=native")
    cflags += {"auto": [], "avx2": ["-DMLBREG_FORCE_AVX2"], "plain": ["-DMLBREG_FORCE_PLAIN"]}[isa]
    name = f"mlbreg_native_{isa}_{src_hash}"
    if not any(build_dir.glob(f"{name}*.so")):
        print(f"mlbreg: building the native CPU kernels ({isa} path; once, ~30 s; cached in {build_dir})", file=sys.stderr)
    try:
        with redirect_stdout(io.StringIO()):  # ninja's progress lines are not the user's business
            mod = cpp_extension.load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=cflags,
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                verbose=False,
            )
    except Exception as err:  # noqa: BLE001 - compiler missing, ninja missing, build error: all "unavailable"
        lines = str(err).strip().splitlines()
        why = next(
            (ln.strip() for ln in lines if "error" in ln.lower() and "ninja" not in ln.lower()), lines[-1] if lines else ""
        )
        raise NativeUnavailable(
            f"could not build the native kernels ({type(err).__name__}: {why[:200]}); needs g++ and ninja (pip install ninja)"
        ) from err
    _self_check(mod)
    return mod


_failed: dict[str, NativeUnavailable] = {}


def load():
    """The compiled extension module (built on first use); raises NativeUnavailable (remembered: a
    sweep in one process tries the build once)."""
    isa = _isa()
    if isa in _failed:
        raise _failed[isa]
    try:
        return _load(isa)
    except NativeUnavailable as err:
        _failed[isa] = err
        raise


def unavailable_reason() -> str | None:
    try:
        load()
    except NativeUnavailable as err:
        return str(err)
    return None


def _self_check(mod) -> None:
    """Every kernel against torch on small cases with borders, stride 2, full and partial batch tiles, and
    rows wide enough for the widest register tile (AVX-512: 6 interior positions)."""
    gen = torch.Generator().manual_seed(1234)
    for stride, k, pad, batch in ((1, 3, 1, 37), (2, 3, 1, 40), (2, 1, 0, 33)):
        w = torch.randn(5, 4, k, k, generator=gen) * (torch.rand(5, 4, k, k, generator=gen) < 0.5)
        x = torch.randn(batch, 4, 7, 15, generator=gen, dtype=torch.float64)
        err = ops.max_conv_error(mod, x, w, stride, pad)
        if not err < 1e-4:
            raise NativeUnavailable(
                f"the native build ({mod.simd_path()}) failed its self-check "
                f"(conv stride {stride}, kernel {k}: relative error {err:.2e})"
            )
    if not ops.max_bn_error(mod, gen) < 1e-4:
        raise NativeUnavailable(f"the native build ({mod.simd_path()}) failed its BatchNorm self-check")
