"""The per-centroid shards `nearest_cent=<k>/<sha>.parquet` and the centroids file: assigning
every clip in streaming batches (spilled by cluster to local scratch), writing, and reading back
(in rank order for the pairwise and cross-cluster passes)."""

import contextlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from semdedup_core import layout
from semdedup_core.backends.base import Backend
from semdedup_core.embeddings import EmbeddingSource, normalize
from semdedup_core.kmeans import centroid_distances, nearest_centroid
from semdedup_core.config import DedupConfig
from semdedup_core.parquet import content_sha, read_table, table_to_parquet_bytes
from semdedup_core.ranking import rank_order
from semdedup_core.run_record import pid_alive
from semdedup_core.storage import Storage, storage_faults
from semdedup_core.threads import host_threads, ordered_map


SPILL_PREFIX = "semdedup-spill-"


def remove_dead_spills(scratch: str | None) -> None:
    """Remove the spill folders of processes that died without cleaning up (killed runs)."""
    scratch = scratch or tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(scratch):
            pid = name[len(SPILL_PREFIX):].split("-", 1)[0]
            if name.startswith(SPILL_PREFIX) and pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(os.path.join(scratch, name), ignore_errors=True)


class Spill:
    """The clips of each cluster, gathered from all batches without holding the input in
    memory; rows keep input order. Labelled batches are buffered (`buffer_bytes` in all),
    then sorted by cluster in one gather and appended as one record per cluster to that
    cluster's local file: file appends are (input bytes / buffer) x clusters, not batches x
    clusters, and the Python work per batch is constant. A record is [rows, id bytes] int64,
    id lengths int32[rows], the id bytes, float32[rows, dim], then float64[rows, meta] when
    rows carry `meta` numbers besides the embedding (cross-cluster candidates do)."""

    def __init__(self, scratch: str | None, dim: int, buffer_bytes: int, meta: int = 0):
        remove_dead_spills(scratch)
        # The pid in the name lets a later run remove this folder if this process is killed.
        self.dir = tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=scratch)
        self.dim = dim
        self.meta = meta
        self.buffer_bytes = buffer_bytes
        self._pending: list[tuple[np.ndarray, pa.Array, np.ndarray, np.ndarray]] = []
        self._pending_bytes = 0
        self._tail: dict[int, tuple[pa.Array, np.ndarray, np.ndarray]] = {}  # after finish()

    def _path(self, k: int) -> str:
        return os.path.join(self.dir, f"{k}.spill")

    def add(self, labels: np.ndarray, ids: pa.Array, emb: np.ndarray,
            meta: np.ndarray | None = None) -> None:
        """Buffer a batch of clips with their cluster labels (and `meta` (rows, meta) numbers)."""
        if meta is None:
            meta = np.empty((len(labels), self.meta), np.float64)
        self._pending.append((labels, ids.cast(pa.string()), emb, meta))
        self._pending_bytes += emb.nbytes + ids.nbytes + meta.nbytes
        if self._pending_bytes >= self.buffer_bytes:
            for k, ids_k, emb_k, meta_k in self._by_cluster():
                self._append(k, ids_k, emb_k, meta_k)

    def finish(self) -> None:
        """No more batches: what is still buffered stays in memory for `take`."""
        self._tail = {k: tuple(rest) for k, *rest in self._by_cluster()}

    def _by_cluster(self):
        """The buffered clips as (cluster, ids, emb, meta) runs, clusters ascending, input
        order within each; empties the buffer."""
        if not self._pending:
            return
        labels = np.concatenate([p[0] for p in self._pending])
        ids = pa.concat_arrays([p[1] for p in self._pending])
        emb = np.concatenate([p[2] for p in self._pending])
        meta = np.concatenate([p[3] for p in self._pending])
        self._pending, self._pending_bytes = [], 0
        order = np.argsort(labels, kind="stable")
        labels, ids, emb, meta = labels[order], ids.take(pa.array(order)), emb[order], meta[order]
        starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
        ends = np.r_[starts[1:], len(labels)]
        for s, e in zip(starts.tolist(), ends.tolist()):
            yield int(labels[s]), ids.slice(s, e - s), emb[s:e], meta[s:e]

    def _append(self, k: int, ids: pa.Array, emb: np.ndarray, meta: np.ndarray) -> None:
        offsets = np.frombuffer(ids.buffers()[1], dtype=np.int32, count=len(ids) + 1,
                                offset=ids.offset * 4)
        data = memoryview(ids.buffers()[2])[offsets[0]:offsets[-1]]
        with storage_faults(f"scratch file {self._path(k)} ($TMPDIR)", "write"), \
                open(self._path(k), "ab") as f:
            f.write(np.array([len(ids), len(data)], dtype=np.int64).data)
            f.write(np.diff(offsets).astype(np.int32).data)
            f.write(data)
            f.write(np.ascontiguousarray(emb, dtype=np.float32).data)
            if self.meta:
                f.write(np.ascontiguousarray(meta, dtype=np.float64).data)

    def take(self, k: int) -> tuple[pa.Array, np.ndarray]:
        """Cluster k's clips (ids, emb), in input order (call after `finish`); its file is
        deleted as it is read, so scratch disk peaks at the input's size, not twice it."""
        return self.take_with_meta(k)[:2]

    def take_with_meta(self, k: int) -> tuple[pa.Array, np.ndarray, np.ndarray]:
        """`take`, with the rows' meta numbers (rows, meta) float64."""
        parts = []
        if os.path.exists(self._path(k)):
            with open(self._path(k), "rb") as f:
                raw = f.read()
            os.unlink(self._path(k))
            parts.append(self._decode(raw))
        if k in self._tail:
            parts.append(self._tail.pop(k))
        if not parts:
            return (pa.array([], pa.string()), np.empty((0, self.dim), np.float32),
                    np.empty((0, self.meta), np.float64))
        if len(parts) == 1:
            return parts[0]
        return (pa.concat_arrays([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]))

    def _decode(self, raw: bytes) -> tuple[pa.Array, np.ndarray, np.ndarray]:
        lengths, id_bytes, embs, metas = [], [], [], []
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
            metas.append(np.frombuffer(raw, dtype=np.float64, count=rows * self.meta, offset=pos))
            pos += 8 * rows * self.meta
        lens = np.concatenate(lengths)
        offsets = np.zeros(len(lens) + 1, dtype=np.int32)
        np.cumsum(lens, out=offsets[1:])
        ids = pa.StringArray.from_buffers(len(lens), pa.py_buffer(offsets),
                                          pa.py_buffer(b"".join(id_bytes)))
        return (ids, np.concatenate(embs).reshape(len(lens), self.dim),
                np.concatenate(metas).reshape(len(lens), self.meta))

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def shard_table(ids: pa.Array, emb: np.ndarray, centroid: np.ndarray) -> pa.Table:
    l2, cos = centroid_distances(emb, centroid)
    n, d = emb.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    embedding = pa.ListArray.from_arrays(offsets, pa.array(emb.reshape(-1)))
    return pa.table({layout.ID: ids, layout.EMBEDDING: embedding, layout.L2_DIST: l2,
                     layout.COSINE_DIST: cos})


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
    spill = Spill(scratch, dim, spill_buffer_bytes)
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


def list_column_to_numpy(col) -> np.ndarray:
    """A list<float>/fixed_size_list column as float32 (rows, dim)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(n, len(values) // n if n else 0)


@dataclass
class RankedShard:
    cluster: int
    ids: pa.Array  # in rank order
    emb: np.ndarray  # unit float32 (n, d), rank order
    cosine_dist: np.ndarray  # float32 (n,), rank order
    rank_dist: np.ndarray | None = None  # float32 (n,): the distance the ranking used


def ranked_shard(cfg: DedupConfig, out: Storage, cluster: int) -> RankedShard | None:
    """One cluster's shard in rank order; None when the cluster has no shard."""
    shard = read_shard(out, cluster)
    if shard is None:
        return None
    ids = shard.column(layout.ID).combine_chunks()
    cos = shard.column(layout.COSINE_DIST).to_numpy()
    l2 = shard.column(layout.L2_DIST).to_numpy()
    order = rank_order(ids, l2, cos, cfg.sim_metric, cfg.which_to_keep, cfg.random_state,
                       cluster)
    emb = list_column_to_numpy(shard.column(layout.EMBEDDING))[order]
    dist = cos if cfg.sim_metric == "cosine" else l2
    return RankedShard(cluster, ids.take(pa.array(order)), emb, cos[order], dist[order])


def save_centroids(out: Storage, centroids: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, centroids.astype(np.float32))
    out.write_bytes(layout.CENTROIDS, buf.getvalue())


def load_centroids(out: Storage) -> np.ndarray:
    return np.load(io.BytesIO(out.read_bytes(layout.CENTROIDS)))
