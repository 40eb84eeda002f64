"""numpy backend (BLAS does the GEMMs on all cores)."""

import numpy as np

from semdedup_core.backends.base import Backend
from semdedup_core.threads import compute_pool


class CpuBackend(Backend):
    name = "cpu"
    xp = np

    def compute_pool(self):
        return compute_pool()

    def scatter_add_rows(self, out, labels, rows) -> None:
        # A sparse one-hot (k x n) times the rows: measured 0.08 s for 200k x 512 into k=1000,
        # against 0.87 s for np.add.at or a sort + np.add.reduceat.
        import scipy.sparse  # here: only K-means needs it (~0.1 s of every start-up)

        n = len(labels)
        onehot = scipy.sparse.csr_matrix(
            (np.ones(n, dtype=rows.dtype), (labels, np.arange(n))), shape=(out.shape[0], n))
        out += onehot @ rows
