"""K-means: fit on a sample (Lloyd over the backend's array namespace), assign every clip in
streaming batches, and write the per-centroid shards `nearest_cent=<k>/<sha>.parquet`.

Why Lloyd over numpy rather than faiss or scikit-learn: measured in `bench/kmeans_compare.py`,
it is as fast per iteration on these CPUs, holds no extra copy of the data, and the same code runs
on CuPy when cuML is missing.
"""

import io
import os
import shutil
import tempfile

import numpy as np
import pyarrow as pa

from semdedup_core import layout
from semdedup_core.backends.base import Backend
from semdedup_core.embeddings import EmbeddingSource, normalize
from semdedup_core.parquet import content_sha, read_table, table_to_parquet_bytes
from semdedup_core.storage import Storage
from semdedup_core.threads import host_threads, ordered_map

ASSIGN_CHUNK = 16384  # rows per distance GEMM: (chunk, k) float32 scratch


def nearest_centroid(backend: Backend, X, C, chunk: int = ASSIGN_CHUNK):
    """For unit rows X (n, d) and centroids C (k, d): (labels int64 (n,), squared distance
    float32 (n,)). Ties go to the lowest centroid index. X may be on the host while the
    backend is a device: chunks then move over one at a time."""
    xp = backend.xp
    c_sq = (C * C).sum(axis=1)
    minus_2ct = xp.ascontiguousarray((-2 * C).T)
    n = X.shape[0]
    labels = xp.empty(n, dtype=xp.int64)
    dist = xp.empty(n, dtype=xp.float32)
    buf = xp.empty((min(chunk, n), C.shape[0]), dtype=xp.float32)  # reused: no page faults
    for s in range(0, n, chunk):
        d2 = buf[: min(chunk, n - s)]
        xp.matmul(backend.asarray(X[s:s + chunk]), minus_2ct, out=d2)  # ||x-c||^2 - 1 = ||c||^2 - 2 x.c
        d2 += c_sq
        lab = d2.argmin(axis=1)
        labels[s:s + chunk] = lab
        dist[s:s + chunk] = xp.take_along_axis(d2, lab[:, None], axis=1)[:, 0] + 1
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
    Stops after `max_iter` iterations, or when inertia improves by less than `tol` (relative),
    as cuML does. An emptied cluster is re-seeded with the sample point farthest from its
    centroid. With `sample_on_host`, a device backend keeps the sample in host memory and
    moves it over in chunks each iteration (same results, for samples the device cannot hold).
    Returns (centroids float32 (k, d) on the host, iterations run)."""
    xp = backend.xp
    m, d = sample.shape
    X = sample if sample_on_host else backend.asarray(sample)
    C = kmeans_pp_init(backend, X, n_clusters, np.random.default_rng(seed))
    prev_inertia = np.inf
    it = 0
    for it in range(1, max_iter + 1):
        labels, d2 = nearest_centroid(backend, X, C)
        inertia = float(d2.sum(dtype=xp.float64))
        sums = xp.zeros((n_clusters, d), dtype=xp.float32)
        backend.scatter_add_rows(sums, labels, X)
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


# -- assignment and shards ----------------------------------------------------------------------
class _Spill:
    """The clips of each cluster, gathered from all batches without holding the input in
    memory; rows keep input order. Labelled batches are buffered (`buffer_bytes` in all),
    then sorted by cluster in one gather and appended as one record per cluster to that
    cluster's local file: file appends are (input bytes / buffer) x clusters, not batches x
    clusters, and the Python work per batch is constant. A record is [rows, id bytes] int64,
    id lengths int32[rows], the id bytes, float32[rows, dim]."""

    def __init__(self, scratch: str | None, dim: int, buffer_bytes: int):
        self.dir = tempfile.mkdtemp(prefix="semdedup-spill-", dir=scratch)
        self.dim = dim
        self.buffer_bytes = buffer_bytes
        self._pending: list[tuple[np.ndarray, pa.Array, np.ndarray]] = []
        self._pending_bytes = 0
        self._tail: dict[int, tuple[pa.Array, np.ndarray]] = {}  # after finish(): in memory

    def _path(self, k: int) -> str:
        return os.path.join(self.dir, f"{k}.spill")

    def add(self, labels: np.ndarray, ids: pa.Array, emb: np.ndarray) -> None:
        """Buffer a batch of clips with their cluster labels."""
        self._pending.append((labels, ids.cast(pa.string()), emb))
        self._pending_bytes += emb.nbytes + ids.nbytes
        if self._pending_bytes >= self.buffer_bytes:
            for k, ids_k, emb_k in self._by_cluster():
                self._append(k, ids_k, emb_k)

    def finish(self) -> None:
        """No more batches: what is still buffered stays in memory for `take`."""
        self._tail = {k: (ids_k, emb_k) for k, ids_k, emb_k in self._by_cluster()}

    def _by_cluster(self):
        """The buffered clips as (cluster, ids, emb) runs, clusters ascending, input order
        within each; empties the buffer."""
        if not self._pending:
            return
        labels = np.concatenate([p[0] for p in self._pending])
        ids = pa.concat_arrays([p[1] for p in self._pending])
        emb = np.concatenate([p[2] for p in self._pending])
        self._pending, self._pending_bytes = [], 0
        order = np.argsort(labels, kind="stable")
        labels, ids, emb = labels[order], ids.take(pa.array(order)), emb[order]
        starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
        ends = np.r_[starts[1:], len(labels)]
        for s, e in zip(starts.tolist(), ends.tolist()):
            yield int(labels[s]), ids.slice(s, e - s), emb[s:e]

    def _append(self, k: int, ids: pa.Array, emb: np.ndarray) -> None:
        offsets = np.frombuffer(ids.buffers()[1], dtype=np.int32, count=len(ids) + 1,
                                offset=ids.offset * 4)
        data = memoryview(ids.buffers()[2])[offsets[0]:offsets[-1]]
        with open(self._path(k), "ab") as f:
            f.write(np.array([len(ids), len(data)], dtype=np.int64).data)
            f.write(np.diff(offsets).astype(np.int32).data)
            f.write(data)
            f.write(np.ascontiguousarray(emb, dtype=np.float32).data)

    def take(self, k: int) -> tuple[pa.Array, np.ndarray]:
        """Cluster k's clips, in input order (call after `finish`); its file is deleted as it
        is read, so scratch disk peaks at the input's size, not twice it."""
        ids_parts, emb_parts = [], []
        if os.path.exists(self._path(k)):
            with open(self._path(k), "rb") as f:
                raw = f.read()
            os.unlink(self._path(k))
            ids, emb = self._decode(raw)
            ids_parts.append(ids)
            emb_parts.append(emb)
        if k in self._tail:
            ids, emb = self._tail.pop(k)
            ids_parts.append(ids)
            emb_parts.append(emb)
        if len(ids_parts) == 1:
            return ids_parts[0], emb_parts[0]
        return pa.concat_arrays(ids_parts), np.concatenate(emb_parts)

    def _decode(self, raw: bytes) -> tuple[pa.Array, np.ndarray]:
        lengths, id_bytes, embs = [], [], []
        pos = 0
        while pos < len(raw):
            rows, nbytes = np.frombuffer(raw, dtype=np.int64, count=2, offset=pos)
            pos += 16
            lengths.append(np.frombuffer(raw, dtype=np.int32, count=rows, offset=pos))
            pos += 4 * rows
            id_bytes.append(raw[pos:pos + nbytes])
            pos += nbytes
            embs.append(np.frombuffer(raw, dtype=np.float32, count=rows * self.dim, offset=pos))
            pos += 4 * rows * self.dim
        lens = np.concatenate(lengths)
        offsets = np.zeros(len(lens) + 1, dtype=np.int32)
        np.cumsum(lens, out=offsets[1:])
        ids = pa.StringArray.from_buffers(len(lens), pa.py_buffer(offsets),
                                          pa.py_buffer(b"".join(id_bytes)))
        return ids, np.concatenate(embs).reshape(len(lens), self.dim)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def centroid_distances(emb: np.ndarray, centroid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(l2_dist_to_cent, cosine_dist_to_cent) as float32, per SPEC:
    `||e - c||` and `1 - e.(c/||c||)`."""
    c = centroid.astype(np.float32)
    l2 = np.linalg.norm(emb - c, axis=1).astype(np.float32)
    unit = c / max(float(np.linalg.norm(c)), 1e-12)
    cos = (1.0 - emb @ unit).astype(np.float32)
    return l2, cos


def shard_table(ids: pa.Array, emb: np.ndarray, centroid: np.ndarray) -> pa.Table:
    l2, cos = centroid_distances(emb, centroid)
    n, d = emb.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    embedding = pa.ListArray.from_arrays(offsets, pa.array(emb.reshape(-1)))
    return pa.table({"id": ids, "embedding": embedding, "l2_dist_to_cent": l2,
                     "cosine_dist_to_cent": cos})


def write_shard(out: Storage, cluster: int, table: pa.Table) -> str:
    """Write one cluster's shard under its content hash, then drop older shards of the folder."""
    data = table_to_parquet_bytes(table)
    rel = layout.shard_file(cluster, content_sha(data))
    out.write_bytes(rel, data)
    for old in out.list_files(layout.shard_dir(cluster)):
        if old != rel:
            out.delete_file(old)
    return rel


def assign_to_shards(source: EmbeddingSource, centroids: np.ndarray, out: Storage,
                     backend: Backend, spill_buffer_bytes: int = 128 << 20,
                     scratch: str | None = None, progress=None, shard_progress=None,
                     only: set[int] | None = None) -> np.ndarray:
    """Assign every clip to its nearest centroid and write `embs_by_nearest_center` (all
    clusters, or just those in `only`). Memory: a few input batches, the spill buffer and a
    few clusters being written.
    Returns the sizes of all clusters (n_clusters,)."""
    k, dim = centroids.shape
    C = backend.asarray(centroids)
    sizes = np.zeros(k, dtype=np.int64)
    spill = _Spill(scratch, dim, spill_buffer_bytes)
    wanted = None
    if only is not None:
        wanted = np.zeros(k, dtype=bool)
        wanted[[c for c in only if 0 <= c < k]] = True
    try:
        for batch in source.iter_batches():
            emb = normalize(batch.emb, batch.norms)
            labels, _ = nearest_centroid(backend, backend.asarray(emb), C)
            labels = backend.to_numpy(labels)
            sizes += np.bincount(labels, minlength=k)
            ids = batch.ids
            if wanted is not None:
                keep = wanted[labels]
                labels, ids, emb = labels[keep], ids.filter(pa.array(keep)), emb[keep]
            spill.add(labels, ids, emb)
            if progress is not None:
                progress(len(batch.ids))
        spill.finish()

        def spill_to_shard(cluster: int) -> None:
            ids, emb = spill.take(cluster)
            write_shard(out, cluster, shard_table(ids, emb, centroids[cluster]))

        # Clusters are encoded and written on host threads; memory: ~2 clusters per thread.
        todo = [int(c) for c in np.flatnonzero(sizes if wanted is None else sizes * wanted)]
        for _ in ordered_map(spill_to_shard, todo, host_threads(), ahead=2 * host_threads()):
            if shard_progress is not None:
                shard_progress(1)
    finally:
        spill.close()
    # A re-run with other settings may have left shards of clusters that are empty now.
    for name in out.list_dirs(layout.SHARDS):
        c = layout.cluster_of_shard_dir(name)
        if c is not None and (c >= k or sizes[c] == 0) and (only is None or c in only):
            out.delete_dir(layout.shard_dir(c))
    return sizes


def read_shard(out: Storage, cluster: int) -> pa.Table | None:
    """The shard of one cluster (all files of its folder, in name order); None when the
    cluster has none (it is empty)."""
    files = out.list_files(layout.shard_dir(cluster))
    if not files:
        return None
    return pa.concat_tables(read_table(out, f) for f in files)


def save_centroids(out: Storage, centroids: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, centroids.astype(np.float32))
    out.write_bytes(layout.CENTROIDS, buf.getvalue())


def load_centroids(out: Storage) -> np.ndarray:
    return np.load(io.BytesIO(out.read_bytes(layout.CENTROIDS)))
