"""CuPy backend: the shared kernels (assignment, Lloyd, tiled pairwise) run on the device.

The K-means fit is the shared Lloyd, so the centroids are the same bits on every run (and follow
the CPU's rule: relative-inertia stop, emptied clusters re-seeded). cuML's KMeans is an opt-in
(`gpu_kmeans="cuml"`): faster at large k, but its centroid sums use atomic adds and its stopping
rule differs, so its centroids change from run to run. Importing this module imports nothing
from CUDA; `unavailable_reason` probes."""

import logging
import os

import numpy as np

from semdedup_core.backends.base import Backend

# Bytes of device scratch one (rows x k) one-hot block may take in scatter_add_rows.
_ONEHOT_BYTES = 256 << 20
# The K-means fit keeps its sample on the device when sample + distance workspace take at most
# this share of the device's memory; otherwise the sample stays on the host.
FIT_DEVICE_SHARE = 0.5
CUML_BATCH_SAMPLES = 32768  # cuML's max_samples_per_batch: (batch x k) float32 distances

log = logging.getLogger(__name__)


def unavailable_reason() -> str | None:
    """None when CuPy imports, sees a CUDA device and computes a small elementwise kernel, a
    reduction and a matmul correctly; else a sentence saying why not. A CuPy installed without
    its CUDA libraries (NVRTC compiles the kernels, cuBLAS runs the matmuls) imports and counts
    devices fine, and would only fail at the first kernel of a run."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install 'semdedup[gpu]')"
    except Exception as exc:  # a broken CUDA install raises all sorts of errors on import
        return f"CuPy failed to import: {exc}"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device is visible"
    except Exception as exc:
        return f"no usable CUDA device ({exc})"
    ctk = "is CuPy's CUDA toolkit installed? pip install 'cupy-cuda12x[ctk]' (or cuda13x)"
    try:
        x = cupy.arange(8, dtype=cupy.float32)
        total = float((x * 2 + 1).sum())
    except Exception as exc:
        return f"CuPy cannot compile or run a kernel ({type(exc).__name__}: {exc}); {ctk}"
    if total != 64.0:
        return f"CuPy's test kernel computed {total}, not 64: the CUDA install is broken"
    try:
        product = cupy.asnumpy(cupy.matmul(x.reshape(2, 4), x.reshape(4, 2)))  # cuBLAS
    except Exception as exc:
        return f"CuPy cannot run a matmul ({type(exc).__name__}: {exc}); {ctk}"
    expected = np.arange(8, dtype=np.float32).reshape(2, 4) @ np.arange(
        8, dtype=np.float32).reshape(4, 2)
    if not np.array_equal(product, expected):
        return f"CuPy's test matmul computed {product.tolist()}, not {expected.tolist()}"
    return None


def _cuml_kmeans():
    """cuML's KMeans class, or None (logged: the user asked for it) when it cannot be imported."""
    try:
        from cuml.cluster import KMeans
    except Exception as exc:
        log.warning("gpu_kmeans=cuml, but cuML cannot be imported (%s: %s): fitting with the "
                    "CuPy Lloyd instead", type(exc).__name__, exc)
        return None
    return KMeans


class GpuBackend(Backend):
    name = "gpu"

    def __init__(self):
        import cupy

        self.xp = cupy
        tf32 = os.environ.get("CUPY_TF32", "").strip()
        if tf32 not in ("", "0"):
            log.warning("CUPY_TF32=%s: float32 matmuls run in TF32, with errors near 1e-3, far "
                        "above the 1e-5 tie tolerance: scores, matches and removals will differ "
                        "from the CPU's and between devices; unset CUPY_TF32", tf32)

    def describe(self) -> str:
        dev = self.xp.cuda.Device()
        name = self.xp.cuda.runtime.getDeviceProperties(dev.id)["name"]
        name = name.decode() if isinstance(name, bytes) else name
        return f"{name}, CuPy {self.xp.__version__}"

    def to_numpy(self, a) -> np.ndarray:
        return self.xp.asnumpy(a)

    def is_host(self, a) -> bool:
        return isinstance(a, np.ndarray)

    def scatter_add_rows(self, out, labels, rows, pool=None) -> None:
        # A one-hot GEMM instead of atomic adds: atomics sum in a different order on every run,
        # and results must be deterministic.
        xp = self.xp
        k = out.shape[0]
        step = max(1, _ONEHOT_BYTES // (4 * k))
        cols = xp.arange(k, dtype=labels.dtype)
        for s in range(0, len(labels), step):
            onehot = (labels[s:s + step, None] == cols[None, :]).astype(xp.float32)
            out += onehot.T @ self.asarray(rows[s:s + step])  # rows may stay on the host

    def fit_kmeans(self, sample, n_clusters, max_iter, tol, seed, gpu_kmeans="lloyd"):
        from semdedup_core.kmeans import ASSIGN_CHUNK, kmeans_pp_init, lloyd

        # Sized against the device's total memory, not its free memory, so the path (and so
        # the centroids) is the same on every run on this kind of device.
        _, total = self.xp.cuda.runtime.memGetInfo()
        workspace = 4 * n_clusters * (max(ASSIGN_CHUNK, CUML_BATCH_SAMPLES) + sample.shape[1])
        if sample.nbytes + workspace > total * FIT_DEVICE_SHARE:
            log.info("fit sample of %.1f GiB does not fit beside the workspace in %.0f%% of the "
                     "device's %.1f GiB: Lloyd with the sample in host memory, streamed over "
                     "in chunks", sample.nbytes / 2**30, 100 * FIT_DEVICE_SHARE, total / 2**30)
            return lloyd(self, sample, n_clusters, max_iter, tol, seed, sample_on_host=True)
        kmeans = _cuml_kmeans() if gpu_kmeans == "cuml" else None
        if kmeans is None:
            log.info("K-means fit: CuPy Lloyd (same centroids on every run)")
            return lloyd(self, sample, n_clusters, max_iter, tol, seed)
        log.info("K-means fit: cuML KMeans (gpu_kmeans=cuml: faster, not reproducible run to run)")
        # Same initial centroids as the shared Lloyd, so both fits start from one point.
        X = self.xp.asarray(sample)
        init = kmeans_pp_init(self, X, n_clusters, np.random.default_rng(seed))
        model = kmeans(n_clusters=n_clusters, max_iter=max_iter, tol=tol, n_init=1, init=init,
                       random_state=seed, max_samples_per_batch=CUML_BATCH_SAMPLES,
                       output_type="cupy")
        model.fit(X)
        centroids = self.to_numpy(model.cluster_centers_).astype(np.float32)
        return centroids, int(model.n_iter_)

    def free_bytes(self) -> int:
        """Device memory this process can use now: the driver's free memory plus the blocks
        CuPy's pool holds but no array uses (the driver counts those as taken)."""
        free, _ = self.xp.cuda.runtime.memGetInfo()
        return free + self.xp.get_default_memory_pool().free_bytes()

    def fits_on_device(self, nbytes: int) -> bool:
        return nbytes < self.free_bytes() / 4

    def pairwise_tile_size(self, requested: int, dim: int) -> int:
        # Bigger tiles keep the GPU busy. A tile's products and masks take ~9 bytes per entry;
        # tiles are kept under 1/16 of the device's total memory, which gives the same tile (and
        # so the same resolution of any 1e-5 tie) on every run on this kind of device. Only when
        # free memory cannot hold that (other processes on the device) does it shrink further.
        _, total = self.xp.cuda.runtime.memGetInfo()
        free = self.free_bytes()
        tile = max(256, min(max(requested, 8192), int((total / 16 / 9) ** 0.5)))
        fits_free = max(256, int((free / 4 / 9) ** 0.5))
        if fits_free < tile:
            log.warning("pairwise tile %d -> %d: free device memory is low (%.1f GiB); ties "
                        "within 1e-5 may resolve differently from a run with more free memory",
                        tile, fits_free, free / 2**30)
            return fits_free
        return tile
