"""CuPy backend: the shared kernels (assignment, Lloyd, tiled pairwise) run on the device;
the K-means fit uses cuML when it is installed, seeded with the same initial centroids as the
CPU fit. Importing this module imports nothing from CUDA; `unavailable_reason` probes."""

import logging

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
    """None when CuPy imports and sees a CUDA device, else a sentence saying why not."""
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
    return None


def _cuml_kmeans():
    try:
        from cuml.cluster import KMeans
    except Exception:
        return None
    return KMeans


class GpuBackend(Backend):
    name = "gpu"

    def __init__(self):
        import cupy

        self.xp = cupy
        self._cuml = _cuml_kmeans()

    def describe(self) -> str:
        dev = self.xp.cuda.Device()
        props = self.xp.cuda.runtime.getDeviceProperties(dev.id)
        fit = "cuML K-means" if self._cuml else "CuPy Lloyd K-means (cuML not installed)"
        return f"{props['name'].decode()} ({fit})"

    def to_numpy(self, a) -> np.ndarray:
        return self.xp.asnumpy(a)

    def is_host(self, a) -> bool:
        return isinstance(a, np.ndarray)

    def argsort_stable(self, a):
        return self.xp.argsort(a)  # CuPy's sorts are always stable; not all versions take kind

    def scatter_add_rows(self, out, labels, rows) -> None:
        # A one-hot GEMM instead of atomic adds: atomics sum in a different order on every run,
        # and results must be deterministic.
        xp = self.xp
        k = out.shape[0]
        step = max(1, _ONEHOT_BYTES // (4 * k))
        cols = xp.arange(k, dtype=labels.dtype)
        for s in range(0, len(labels), step):
            onehot = (labels[s:s + step, None] == cols[None, :]).astype(xp.float32)
            out += onehot.T @ self.asarray(rows[s:s + step])  # rows may stay on the host

    def fit_kmeans(self, sample, n_clusters, max_iter, tol, seed):
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
        if self._cuml is None:
            return lloyd(self, sample, n_clusters, max_iter, tol, seed)
        # Same initial centroids as the shared Lloyd, so both backends start from one point.
        X = self.xp.asarray(sample)
        init = kmeans_pp_init(self, X, n_clusters, np.random.default_rng(seed))
        model = self._cuml(n_clusters=n_clusters, max_iter=max_iter, tol=tol, n_init=1,
                           init=init, random_state=seed, max_samples_per_batch=CUML_BATCH_SAMPLES,
                           output_type="cupy")
        model.fit(X)
        centroids = self.to_numpy(model.cluster_centers_).astype(np.float32)
        return centroids, int(model.n_iter_)

    def fits_on_device(self, nbytes: int) -> bool:
        free, _ = self.xp.cuda.runtime.memGetInfo()
        return nbytes < free / 4

    def pairwise_tile_size(self, requested: int, dim: int) -> int:
        # Bigger tiles keep the GPU busy. A tile's products and masks take ~9 bytes per entry;
        # tiles are kept under 1/16 of the device's total memory, which gives the same tile (and
        # so the same resolution of any 1e-5 tie) on every run on this kind of device. Only when
        # free memory cannot hold that (other processes on the device) does it shrink further.
        free, total = self.xp.cuda.runtime.memGetInfo()
        tile = max(256, min(max(requested, 8192), int((total / 16 / 9) ** 0.5)))
        fits_free = max(256, int((free / 4 / 9) ** 0.5))
        if fits_free < tile:
            log.warning("pairwise tile %d -> %d: free device memory is low (%.1f GiB); ties "
                        "within 1e-5 may resolve differently from a run with more free memory",
                        tile, fits_free, free / 2**30)
            return fits_free
        return tile
