"""The interface the engine's kernels use: an array namespace plus the few operations whose best
implementation differs between numpy and CuPy."""

import contextlib
from collections.abc import Iterator
from concurrent.futures import Executor

import numpy as np


class Backend:
    name = "base"
    xp = np  # the array namespace of the kernels (numpy or cupy)

    def describe(self) -> str:
        return self.name

    def asarray(self, a):
        """Host array -> backend array (float32 stays float32)."""
        return self.xp.asarray(a)

    def to_numpy(self, a) -> np.ndarray:
        return np.asarray(a)

    def is_host(self, a) -> bool:
        """Whether `a` is a host array that the kernels must move over piece by piece (a
        sample or cluster larger than the device holds). Never, when the device is the host."""
        return False

    def take_rows(self, X, rows):
        """X[rows] as a backend array, for X on the device or on the host (`rows`: indices,
        host or backend array)."""
        if self.is_host(X):
            return self.asarray(X[self.to_numpy(rows)])
        return X[self.asarray(rows)]

    def argsort_stable(self, a):
        """Indices sorting `a`, ties in index order."""
        return self.xp.argsort(a, kind="stable")

    def gram_lower(self, a, out) -> bool:
        """Write a @ a.T's lower triangle (diagonal included) into `out`, each element the bits
        of the matmul, leaving the rest of `out` as it was; False (nothing written) where the
        backend has no such product: the caller then uses matmul."""
        return False

    def scatter_add_rows(self, out, labels, rows, pool: Executor | None = None) -> None:
        """`out[labels[i]] += rows[i]` for every i, in order of i (K-means' centroid sums);
        `pool`: compute threads to share the work (`compute_pool`)."""
        raise NotImplementedError

    def fit_kmeans(self, sample: np.ndarray, n_clusters: int, max_iter: int, tol: float,
                   seed: int, gpu_kmeans: str = "lloyd"):
        """Fit on `sample` (normalised float32 (m, d)); returns (centroids float32 (k, d) as a
        numpy array, iterations run). `gpu_kmeans` ("lloyd" or "cuml") matters on the GPU only."""
        from semdedup_core.kmeans import lloyd

        return lloyd(self, sample, n_clusters, max_iter, tol, seed)

    def fits_on_device(self, nbytes: int) -> bool:
        """Whether an array of nbytes should be moved to the device whole (else: in slabs)."""
        return True

    @contextlib.contextmanager
    def compute_pool(self) -> Iterator[Executor | None]:
        """Threads to run independent GEMMs side by side (the CPU's cores), or None: the device
        is fed by one thread, cluster after cluster."""
        yield None

    def pairwise_tile_size(self, requested: int, dim: int) -> int:
        """The tile size to use; the GPU shrinks it to fit free device memory."""
        return requested
