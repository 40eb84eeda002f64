"""CuPy backend: the shared kernels (assignment, Lloyd, tiled pairwise) run on the device;
the K-means fit uses cuML when it is installed, seeded with the same initial centroids as the
CPU fit. Importing this module imports nothing from CUDA; `unavailable_reason` probes."""

import numpy as np

from semdedup_core.backends.base import Backend

# Bytes of device scratch one (rows x k) one-hot block may take in scatter_add_rows.
_ONEHOT_BYTES = 256 << 20


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

    def scatter_add_rows(self, out, labels, rows) -> None:
        # A one-hot GEMM instead of atomic adds: atomics sum in a different order on every run,
        # and results must be deterministic.
        xp = self.xp
        k = out.shape[0]
        step = max(1, _ONEHOT_BYTES // (4 * k))
        cols = xp.arange(k, dtype=labels.dtype)
        for s in range(0, len(labels), step):
            onehot = (labels[s:s + step, None] == cols[None, :]).astype(xp.float32)
            out += onehot.T @ rows[s:s + step]

    def fit_kmeans(self, sample, n_clusters, max_iter, tol, seed):
        if self._cuml is None:
            return super().fit_kmeans(sample, n_clusters, max_iter, tol, seed)
        # Same initial centroids as the shared Lloyd, so both backends start from one point.
        from semdedup_core.kmeans import kmeans_pp_init

        X = self.xp.asarray(sample)
        init = kmeans_pp_init(self, X, n_clusters, np.random.default_rng(seed))
        model = self._cuml(n_clusters=n_clusters, max_iter=max_iter, tol=tol, n_init=1,
                           init=init, random_state=seed, output_type="cupy")
        model.fit(X)
        centroids = self.to_numpy(model.cluster_centers_).astype(np.float32)
        return centroids, int(getattr(model, "n_iter_", max_iter))

    def fits_on_device(self, nbytes: int) -> bool:
        free, _ = self.xp.cuda.runtime.memGetInfo()
        return nbytes < free / 4

    def pairwise_tile_size(self, requested: int, dim: int) -> int:
        # Bigger tiles keep the GPU busy; a tile's products and mask take ~9 bytes per entry,
        # kept under a quarter of the free device memory.
        free, _ = self.xp.cuda.runtime.memGetInfo()
        fits = int((free / 4 / 9) ** 0.5)
        return max(256, min(max(requested, 8192), fits))
