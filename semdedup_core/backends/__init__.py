"""Compute backends behind one small interface, chosen once per run.

`cpu` runs on numpy; `gpu` runs the same kernels on CuPy (and cuML's K-means fit when asked for
with `gpu_kmeans="cuml"`). Only this package imports CuPy or cuML, and only when the GPU is asked
for.
"""

import logging

from semdedup_core.backends.base import Backend
from semdedup_core.backends.cpu import CpuBackend
from semdedup_core.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["Backend", "CpuBackend", "get_backend"]


def get_backend(name: str = "auto") -> Backend:
    """`cpu`, `gpu` or `auto` (the GPU when CuPy runs a test kernel and matmul on a CUDA device,
    else the CPU)."""
    if name == "cpu":
        return CpuBackend()
    from semdedup_core.backends import gpu  # imports nothing heavy until probed

    reason = gpu.unavailable_reason()
    if reason is None:
        backend = gpu.GpuBackend()
        log.info("backend: gpu (%s)", backend.describe())
        return backend
    if name == "gpu":
        raise ConfigError(f"backend 'gpu' is not usable here: {reason}")
    log.info("backend: cpu (no GPU: %s)", reason)
    return CpuBackend()
