"""numpy backend (BLAS does the GEMMs on all cores)."""

import numpy as np

from semdedup_core.backends.base import Backend


class CpuBackend(Backend):
    name = "cpu"
    xp = np

    def scatter_add_rows(self, out, labels, rows) -> None:
        # Sort rows by label, then one contiguous reduceat per run of equal labels: far faster
        # than np.add.at for (n, d) rows.
        order = np.argsort(labels, kind="stable")
        sorted_labels = labels[order]
        starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
        out[sorted_labels[starts]] += np.add.reduceat(rows[order], starts, axis=0)
