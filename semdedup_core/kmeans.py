"""K-means maths: fit on a sample (Lloyd over the backend's array namespace), nearest-centroid
assignment, and the distances to a centroid that the shards record. Shard and centroid I/O is
in `semdedup_core.shards`.

Why Lloyd over numpy rather than faiss or scikit-learn: measured in `bench/kmeans_compare.py`,
it is as fast per iteration on these CPUs, holds no extra copy of the data, and the same code is
the GPU backend's default fit on CuPy (reproducible bit for bit, which cuML's is not).
"""

import queue
from concurrent.futures import Executor

import numpy as np

from semdedup_core.backends.base import Backend
from semdedup_core.threads import host_threads, ordered_map

ASSIGN_CHUNK = 16384  # rows per distance GEMM: (chunk, k) float32 scratch
SCRATCH_ELEMENTS = 1 << 24  # a (rows, k) float32 scratch of 64 MiB: ASSIGN_CHUNK rows at k=1024


def assign_chunk(rows: int, k: int) -> int:
    """Rows per distance GEMM when several assign side by side: ASSIGN_CHUNK, or above k=1024
    fewer, so that each thread's scratch stays at 64 MiB; `rows` is then cut into equal parts
    (thousands of rows each: BLAS gives a row of a product the same bits whatever rows share
    its call, except in calls so small that it takes another kernel, which these are not)."""
    cap = max(1, SCRATCH_ELEMENTS // max(k, 1))
    if cap >= ASSIGN_CHUNK:
        return ASSIGN_CHUNK
    parts = -(-rows // cap)
    return max(1, -(-rows // parts))


class Scratch:
    """Float32 (rows, cols) buffers kept for reuse: `nearest_centroid`'s distances across its
    calls (every Lloyd iteration, every batch of an assignment), the assignment's unit rows.
    A fresh 64 MiB buffer per call is mapped, faulted in page by page and unmapped each time,
    which cost more CPU than the distances' argmin. Thread-safe; holds as many buffers as
    were in use at once. `get` may hand out a buffer of more rows: take its first rows."""

    def __init__(self, xp):
        self.xp = xp
        self._free: queue.SimpleQueue = queue.SimpleQueue()

    def get(self, rows: int, cols: int):
        try:
            buf = self._free.get_nowait()
        except queue.Empty:
            buf = None
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols:
            buf = self.xp.empty((rows, cols), dtype=self.xp.float32)
        return buf

    def put(self, buf) -> None:
        self._free.put(buf)


def nearest_centroid(backend: Backend, X, C, chunk: int = ASSIGN_CHUNK, on_chunk=None,
                     pool: Executor | None = None, scratch: Scratch | None = None):
    """For unit rows X (n, d) and centroids C (k, d): (labels int64 (n,), squared distance
    float32 (n,)). Ties go to the lowest centroid index. X may be on the host while the
    backend is a device: chunks then move over one at a time. `on_chunk(start, d2, labels)`
    sees each chunk's distances to every centroid, d2 = ||x - c||^2 - 1 (float32, reused
    after the call), and its labels (e.g. for the cross-cluster probes). With `pool` (the CPU's
    compute threads, `Backend.compute_pool`), chunks of `assign_chunk` rows run side by side,
    each thread with a scratch of its own: the same bits. `scratch`: buffers to reuse across
    calls (`Scratch`); by default this call's own."""
    xp = backend.xp
    c_sq = (C * C).sum(axis=1)
    minus_2ct = xp.ascontiguousarray((-2 * C).T)
    n = X.shape[0]
    labels = xp.empty(n, dtype=xp.int64)
    dist = xp.empty(n, dtype=xp.float32)
    if pool is not None:
        chunk = assign_chunk(n, C.shape[0])
    workers = 1 if pool is None else host_threads()
    scratch = Scratch(xp) if scratch is None else scratch
    rows, k = min(chunk, n), C.shape[0]

    def one(s: int) -> None:
        buf = scratch.get(rows, k)  # one per thread at a time: reused, no page faults
        d2 = buf[: min(chunk, n - s)]
        xp.matmul(backend.asarray(X[s:s + chunk]), minus_2ct, out=d2)  # ||x-c||^2 - 1 = ||c||^2 - 2 x.c
        d2 += c_sq
        lab = d2.argmin(axis=1)
        if on_chunk is not None:
            on_chunk(s, d2, lab)
        labels[s:s + chunk] = lab
        dist[s:s + chunk] = xp.take_along_axis(d2, lab[:, None], axis=1)[:, 0] + 1
        scratch.put(buf)

    starts = range(0, n, chunk)
    for _ in (map(one, starts) if pool is None else
              ordered_map(one, starts, workers, pool=pool)):  # at most `workers` at once
        pass
    return labels, xp.maximum(dist, 0)


INIT_CANDIDATES_PER_CLUSTER = 16


def kmeans_pp_init(backend: Backend, X, n_clusters: int, rng: np.random.Generator):
    """k-means++ (D^2 sampling) over a seeded subsample of at most 16 candidates per cluster,
    which keeps the init to k matrix-vector products over a small array."""
    xp = backend.xp
    m = X.shape[0]
    n_cand = min(m, INIT_CANDIDATES_PER_CLUSTER * n_clusters)
    cand_rows = np.sort(rng.choice(m, size=n_cand, replace=False))
    cand = backend.take_rows(X, cand_rows)
    chosen = [int(rng.integers(n_cand))]
    closest = xp.maximum(2 - 2 * (cand @ cand[chosen[0]]), 0)  # unit rows: ||a-b||^2
    for _ in range(1, n_clusters):
        # The D^2 draw stays on the backend's device: two scalars come back per centre, not
        # the candidates' distances (k round trips of 16k floats each at large k on a GPU).
        cumulative = xp.cumsum(closest.astype(xp.float64))
        total = float(cumulative[-1])
        if total <= 0:  # every candidate coincides with a centre: take unused ones in order
            used = set(chosen)
            pick = next(i for i in range(n_cand) if i not in used)
        else:
            target = backend.asarray(np.array([rng.random() * total]))
            pick = min(int(xp.searchsorted(cumulative, target, side="right")[0]), n_cand - 1)
        chosen.append(pick)
        closest = xp.minimum(closest, xp.maximum(2 - 2 * (cand @ cand[pick]), 0))
    return cand[backend.asarray(np.array(chosen))].copy()


def lloyd(backend: Backend, sample: np.ndarray, n_clusters: int, max_iter: int, tol: float,
          seed: int, sample_on_host: bool = False) -> tuple[np.ndarray, int]:
    """Seeded Lloyd iterations from a k-means++ init (`kmeans_pp_init`).
    Stops after `max_iter` iterations, or when inertia improves by less than `tol` (relative).
    Centroid sums go through `backend.scatter_add_rows` in a fixed order, so a run repeats bit
    for bit on its device. An emptied cluster is re-seeded with the sample point farthest from its
    centroid. With `sample_on_host`, a device backend keeps the sample in host memory and
    moves it over in chunks each iteration (same results, for samples the device cannot hold).
    Returns (centroids float32 (k, d) on the host, iterations run)."""
    xp = backend.xp
    m, d = sample.shape
    X = sample if sample_on_host else backend.asarray(sample)
    C = kmeans_pp_init(backend, X, n_clusters, np.random.default_rng(seed))
    prev_inertia = np.inf
    it = 0
    # After the init: its matrix-vector products are split over BLAS's threads (their bits
    # follow the split), while the compute threads' GEMMs give the same bits either way.
    scratch = Scratch(xp)
    with backend.compute_pool() as pool:
        for it in range(1, max_iter + 1):
            labels, d2 = nearest_centroid(backend, X, C, pool=pool, scratch=scratch)
            inertia = float(d2.sum(dtype=xp.float64))
            sums = xp.zeros((n_clusters, d), dtype=xp.float32)
            backend.scatter_add_rows(sums, labels, X, pool)
            counts = xp.bincount(labels, minlength=n_clusters)
            C = sums / xp.maximum(counts, 1)[:, None].astype(xp.float32)
            empty = xp.flatnonzero(counts == 0)
            if len(empty):
                far = backend.argsort_stable(-d2)[: len(empty)]
                C[empty] = backend.take_rows(X, far)
            if prev_inertia - inertia <= tol * inertia:
                break
            prev_inertia = inertia
    return backend.to_numpy(C).astype(np.float32), it


DISTANCE_ROWS = 256  # rows per step of `centroid_distances`: its temporaries stay in cache


def centroid_distances(emb: np.ndarray, centroid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(l2_dist_to_cent, cosine_dist_to_cent) as float32, per SPEC:
    `||e - c||` and `1 - e.(c/||c||)`. Each row's value depends on that row alone, so a
    cluster written in several parts gets the same bits as written whole: the dot products go
    through einsum's per-row loop, not BLAS gemv, whose last rows of a call (and of each
    thread's share) take another kernel and differ in the last bit. The norms are numpy's
    `linalg.norm` sum (float32 squares, reduced row by row), taken DISTANCE_ROWS rows at a
    time in one small buffer: two whole-array temporaries cost more than the sums (fresh
    memory, faulted in and zeroed)."""
    c = centroid.astype(np.float32)
    n = len(emb)
    kind = np.result_type(emb.dtype, c.dtype)  # float32 for the shards' rows
    l2 = np.empty(n, dtype=kind)
    buf = np.empty((min(n, DISTANCE_ROWS), emb.shape[1]), dtype=kind)
    for s in range(0, n, DISTANCE_ROWS):
        rows = emb[s:s + DISTANCE_ROWS]
        diff = np.subtract(rows, c, out=buf[:len(rows)])
        np.multiply(diff, diff, out=diff)
        np.add.reduce(diff, axis=1, out=l2[s:s + len(rows)])
    l2 = np.sqrt(l2, out=l2).astype(np.float32, copy=False)
    unit = c / max(float(np.linalg.norm(c)), 1e-12)
    cos = (1.0 - np.einsum("ij,j->i", emb, unit)).astype(np.float32)
    return l2, cos
