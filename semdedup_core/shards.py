"""The per-centroid shards `nearest_cent=<k>/<sha>.parquet` and the centroids file: assigning
every clip in streaming batches, writing each cluster's shard (several files, straight from the
assignment's buffer) and reading it back (in rank order for the pairwise and cross-cluster
passes)."""

import contextlib
import ctypes
import io
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semdedup_core import layout
from semdedup_core.backends.base import Backend
from semdedup_core.embeddings import EmbeddingSource, normalize
from semdedup_core.errors import InputError
from semdedup_core.kmeans import (ASSIGN_CHUNK, Scratch, assign_chunk, centroid_distances,
                                  nearest_centroid)
from semdedup_core.config import DedupConfig
from semdedup_core.parquet import (SMALL_READ_THREADS, content_sha, plain_float_values,
                                   read_table, reading, table_to_parquet_bytes)
from semdedup_core.ranking import rank_order
from semdedup_core.storage import Storage
from semdedup_core.threads import host_threads, ordered_map


def piece_bytes(piece: tuple[np.ndarray, ...]) -> int:
    """The bytes a held piece counts for in the buffer: its clips' ids and vectors, not its
    `extra` (kept apart, not written), so that which clips go into which file is the same
    whether or not extra rows are kept (a run with cross_cluster's probes or a Dagster step
    without them)."""
    return sum(a.nbytes for a in piece[:3])


def shard_table(ids: pa.Array, emb: np.ndarray, centroid: np.ndarray) -> pa.Table:
    l2, cos = centroid_distances(emb, centroid)
    n, d = emb.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    embedding = pa.ListArray.from_arrays(offsets, pa.array(emb.reshape(-1)))
    return pa.table({layout.ID: ids, layout.EMBEDDING: embedding, layout.L2_DIST: l2,
                     layout.COSINE_DIST: cos})


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc's malloc_trim; elsewhere a no-op).
    The writer's pieces are small arrays from the heap, which glibc keeps mapped once freed:
    without this, what the buffer held stays in the process's RSS through the pruning."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


try:
    _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc
    _MALLOC_TRIM = None


class ShardWriter:
    """Assigned clips held in memory by cluster and written straight into the cluster's shard
    folder as files of their own: each clip is written once, with no scratch copy.

    Flush policy: when the held clips reach `buffer_bytes`, the clusters holding the most are
    written (ties to the lower index) until half the buffer is free; `finish` writes the rest.
    A large cluster thus goes out in few large files while a small one is often written once,
    at the end; with k clusters sharing the buffer, files hold about 1.5 x buffer / k bytes
    on average. A cluster's clips go out in input order, cut at batch boundaries into files of
    at most about `buffer_bytes / 8` (encoding one then needs little memory besides the buffer).
    Files are named by their content, so the same input and settings write the same files
    (on as many host threads: batches, and so the cuts, follow the thread count).
    Writes run on `workers` host threads of the writer's own while the caller goes on (the
    assignment's next GEMMs): `add` waits only while the clips held and those being written
    exceed `buffer_bytes`, so memory stays within the buffer and a batch, as if it waited for
    every write. Which clips go into which file never depends on that timing.
    Use it as a context manager (its write threads start and end with the block): leaving the
    block early (an error) cancels the writes not yet started and waits for the others."""

    def __init__(self, out: Storage, centroids: np.ndarray, buffer_bytes: int, workers: int):
        self.out, self.centroids = out, centroids
        self.buffer_bytes = buffer_bytes
        self.part_bytes = max(1, buffer_bytes // 8)
        # Per cluster: pieces (id lengths int32, id bytes uint8, emb float32 (rows, d)).
        self.held: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = \
            [[] for _ in range(len(centroids))]
        self.held_bytes = np.zeros(len(centroids), dtype=np.int64)
        self.peak_bytes = 0  # the most ever held or being written (tests check the bound)
        self.written: dict[int, list[str]] = {}  # cluster -> its files, as written
        self.extra_of: dict[str, np.ndarray] = {}  # file -> the `extra` of its rows
        self.workers = max(1, workers)
        self._pool: ThreadPoolExecutor | None = None  # while inside the `with` block
        self._writing: deque[tuple[Future, int]] = deque()  # (write of a part, its bytes)
        self._writing_bytes = 0

    def __enter__(self) -> "ShardWriter":
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="semdedup-write")
        return self

    def __exit__(self, *exc) -> None:
        for future, _ in self._writing:
            future.cancel()
        self._pool.shutdown(wait=True)
        self._pool = None

    def add(self, labels: np.ndarray, ids: pa.Array, emb: np.ndarray,
            extra: np.ndarray | None = None) -> None:
        """Hold a batch of clips (unit float32 rows) under their cluster labels. `extra`:
        per-clip rows kept in memory beside each written file's rows (`extra_of`), not
        written (the cross-cluster probes)."""
        order = np.argsort(labels, kind="stable")
        by_cluster = labels[order]
        starts = np.flatnonzero(np.r_[True, by_cluster[1:] != by_cluster[:-1]]) if len(order) \
            else np.empty(0, np.int64)
        ends = np.r_[starts[1:], len(order)]
        ids = ids.cast(pa.string()).take(pa.array(order))  # a fresh array, in cluster order
        offsets = np.frombuffer(ids.buffers()[1], dtype=np.int32, count=len(ids) + 1)
        data = np.frombuffer(ids.buffers()[2] or b"", dtype=np.uint8)
        for s, e in zip(starts.tolist(), ends.tolist()):
            c = int(by_cluster[s])
            piece = (np.diff(offsets[s:e + 1]), data[offsets[s]:offsets[e]].copy(),
                     emb[order[s:e]]) + (() if extra is None else (extra[order[s:e]],))
            self.held[c].append(piece)
            self.held_bytes[c] += piece_bytes(piece)
        total = int(self.held_bytes.sum())
        self.peak_bytes = max(self.peak_bytes, total + self._writing_bytes)
        if total >= self.buffer_bytes:
            self._write(self._largest(total - self.buffer_bytes // 2))
        # Held and being written, at most the buffer between batches: the peak is then the
        # buffer and a batch, as when every write was waited for.
        self._wait_while(lambda: int(self.held_bytes.sum()) + self._writing_bytes
                         > self.buffer_bytes)

    def finish(self) -> None:
        """Write every cluster's remaining clips; returns once all files are written. Then
        the heap's freed pages go back to the system, once: trimmed after every round of
        writes instead, the next round faulted them in and zeroed them again (at 1M x 512,
        ~3 CPU-s of the assignment)."""
        self._write([int(c) for c in np.flatnonzero(self.held_bytes)])
        self._wait_while(lambda: True)
        release_freed_memory()

    def _wait_while(self, more: Callable[[], bool]) -> None:
        """Wait for the oldest writes, in order, while `more()` and some are running (a failed
        write raises here)."""
        while self._writing and more():
            future, size = self._writing.popleft()
            c, rel = future.result()
            self.written.setdefault(c, []).append(rel)
            self._writing_bytes -= size

    def _largest(self, need: int) -> list[int]:
        """The clusters holding the most, largest first, until they hold `need` bytes."""
        chosen, freed = [], 0
        for c in np.argsort(-self.held_bytes, kind="stable").tolist():
            if freed >= need or not self.held_bytes[c]:
                break
            chosen.append(c)
            freed += int(self.held_bytes[c])
        return chosen

    def _write(self, clusters: list[int]) -> None:
        """Hand the clusters' clips to the write threads, as parts of about `part_bytes`."""
        for c in clusters:
            part, size = [], 0
            for piece in self.held[c]:
                part.append(piece)
                size += piece_bytes(piece)
                if size >= self.part_bytes:
                    self._submit(c, part, size)
                    part, size = [], 0
            if part:
                self._submit(c, part, size)
            self.held[c] = []
            self.held_bytes[c] = 0

    def _submit(self, c: int, pieces: list, size: int) -> None:
        if self._pool is None:  # outside `with`, a failure would leave its threads running
            raise RuntimeError("ShardWriter writes only inside a `with ShardWriter(...)` block")
        self._writing.append((self._pool.submit(self._write_part, (c, pieces)), size))
        self._writing_bytes += size

    def _write_part(self, job: tuple[int, list]) -> tuple[int, str]:
        c, pieces = job
        lengths = np.concatenate([p[0] for p in pieces])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        ids = pa.StringArray.from_buffers(len(lengths), pa.py_buffer(offsets),
                                          pa.py_buffer(np.concatenate([p[1] for p in pieces])))
        emb = pieces[0][2] if len(pieces) == 1 else np.concatenate([p[2] for p in pieces])
        extra = np.concatenate([p[3] for p in pieces]) if len(pieces[0]) > 3 else None
        pieces.clear()  # the joined copies replace them: the part is in memory once while encoded
        data = table_to_parquet_bytes(shard_table(ids, emb, self.centroids[c]))
        del emb
        rel = layout.shard_file(c, content_sha(data))
        self.out.write_bytes(rel, data)
        if extra is not None:
            self.extra_of[rel] = extra
        return c, rel


def remove_stale_shards(out: Storage, sizes: np.ndarray, written: dict[int, list[str]],
                        only: set[int] | None = None) -> None:
    """After an assignment: delete what earlier runs left in the shard folders (of the
    clusters in `only`, default all) that this one did not write: other files of its clusters
    (an earlier run's, a killed run's, `.tmp` leftovers) and the folders of clusters that are
    empty now. One listing of the shards folder."""
    keep = {rel for rels in written.values() for rel in rels}

    def ours(c: int | None) -> bool:
        return c is not None and (only is None or c in only)

    def empty(c: int) -> bool:
        return c >= len(sizes) or sizes[c] == 0

    for rel in out.list_files(layout.SHARDS):
        c = layout.cluster_of_shard_dir(rel[len(layout.SHARDS) + 1:].split("/", 1)[0])
        if ours(c) and not empty(c) and rel not in keep:
            out.delete_file(rel)
    for name in out.list_dirs(layout.SHARDS):
        c = layout.cluster_of_shard_dir(name)
        if ours(c) and empty(c):
            out.delete_dir(layout.shard_dir(c))


def assign_to_shards(source: EmbeddingSource, centroids: np.ndarray, out: Storage,
                     backend: Backend, buffer_bytes: int = 128 << 20, progress=None,
                     only: set[int] | None = None, per_clip=None,
                     written: dict[int, list[str]] | None = None) -> np.ndarray:
    """Assign every clip to its nearest centroid and write `embs_by_nearest_center` (all
    clusters, or just those in `only`) from the assignment's buffer (`ShardWriter`).
    Three kinds of work overlap: host threads decode the next batches, the backend's compute
    pool (the CPU's cores, one BLAS thread each) assigns batches side by side, and the writer's
    threads encode and write full clusters; this thread only hands clips from one to the next,
    in input order, so the files do not depend on the timing. Memory: a few input batches per
    thread, `buffer_bytes`, and the files being encoded.
    `per_clip`: an object with `of_distances(backend, d2, labels)` -> host rows (n, m) from
    each chunk of distances to every centroid (`nearest_centroid`), and `by_file`, a dict
    it gets filled with each written file's rows (the cross-cluster probes, `Probes`).
    `written`: filled with each cluster's shard files, in name order (`shard_files` without
    listing them again). Returns the sizes of all clusters (n_clusters,)."""
    k = len(centroids)
    C = backend.asarray(centroids)
    sizes = np.zeros(k, dtype=np.int64)
    wanted = None
    if only is not None:
        wanted = np.zeros(k, dtype=bool)
        wanted[[c for c in only if 0 <= c < k]] = True

    scratch = Scratch(backend.xp)  # the compute threads' distance buffers, batch after batch
    # The batches' unit rows: handed back once the writer has copied them (`add`), so that
    # normalising a batch out of Arrow's read-only buffer does not map fresh memory each time.
    unit_rows = Scratch(np)

    def label(batch):
        rows = unit_rows.get(len(batch.emb), batch.emb.shape[1])
        emb = normalize(batch.emb, batch.norms, out=rows[:len(batch.emb)])
        chunks: list[np.ndarray] = []  # the batch's per_clip rows, chunk by chunk

        def keep_chunk(_start: int, d2, lab) -> None:
            chunks.append(per_clip.of_distances(backend, d2, backend.to_numpy(lab)))

        labels, _ = nearest_centroid(backend, backend.asarray(emb), C,
                                     ASSIGN_CHUNK if pool is None else assign_chunk(len(emb), k),
                                     on_chunk=None if per_clip is None else keep_chunk,
                                     scratch=scratch)
        return (batch.ids, emb, backend.to_numpy(labels),
                np.concatenate(chunks) if chunks else None, rows)

    workers = host_threads()
    # On an error the threads stop in turn: assigning, decoding, writing, the compute pool.
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(backend.compute_pool())
        writer = stack.enter_context(ShardWriter(out, centroids, buffer_bytes, workers))
        batches = stack.enter_context(contextlib.closing(source.iter_batches()))
        labelled = map(label, batches) if pool is None else stack.enter_context(
            contextlib.closing(ordered_map(label, batches, workers, pool=pool)))
        for ids, emb, labels, extra, rows in labelled:
            sizes += np.bincount(labels, minlength=k)
            if progress is not None:
                progress(len(ids))
            if wanted is not None:
                keep = wanted[labels]
                labels, ids, emb = labels[keep], ids.filter(pa.array(keep)), emb[keep]
                extra = None if extra is None else extra[keep]
            writer.add(labels, ids, emb, extra)  # copies the rows out
            unit_rows.put(rows)
        writer.finish()
    if per_clip is not None:
        per_clip.by_file.update(writer.extra_of)
    remove_stale_shards(out, sizes, writer.written, only)
    if written is not None:
        written.update((c, sorted(rels)) for c, rels in writer.written.items())
    return sizes


def shard_files(out: Storage, cluster: int) -> list[str]:
    """The files of one cluster's shard, in name order: its folder may hold several (written as
    the assignment buffer filled); [] when the cluster has none."""
    return [f for f in out.list_files(layout.shard_dir(cluster)) if layout.is_shard_file(f)]


def shard_files_by_cluster(out: Storage) -> dict[int, list[str]]:
    """Every cluster's shard files (`shard_files`), from one listing of the shards folder."""
    found: dict[int, list[str]] = {}
    for rel in out.list_files(layout.SHARDS):
        folder = rel[len(layout.SHARDS) + 1:].split("/")
        c = layout.cluster_of_shard_dir(folder[0])
        if c is not None and len(folder) == 2 and layout.is_shard_file(rel):
            found.setdefault(c, []).append(rel)
    return found


def read_shard(out: Storage, cluster: int, columns: list[str] | None = None,
               files: list[str] | None = None) -> pa.Table | None:
    """The shard of one cluster (all its files, in name order; the row order carries no
    meaning: ranking sorts by distance and id); None when the cluster has none (it is empty).
    `files`: its files where the caller knows them (else listed)."""
    files = shard_files(out, cluster) if files is None else files
    if not files:
        return None
    return pa.concat_tables(read_table(out, f, columns, ranged=columns is not None)
                            for f in files)


def list_column_to_numpy(col) -> np.ndarray:
    """A list<float>/fixed_size_list column as float32 (rows, dim)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(n, len(values) // n if n else 0)


def read_shard_file_vectors(out: Storage, rel: str) -> tuple[pa.Table, np.ndarray]:
    """One shard file as (its other columns, its embeddings float32 (rows, dim)). The
    embeddings come straight from the file's pages where they are stored as the shard writer
    stores them (`parquet.plain_float_values`), else through Arrow. The file is read whole
    (locally a memory map: no copy of the page cache)."""
    with reading(out, rel):
        with out.open_mapped(rel) as f:
            data = f.read_buffer()
        file = pq.ParquetFile(pa.BufferReader(data))
        names = file.schema_arrow.names
        table = file.read(columns=[c for c in names if c != layout.EMBEDDING],
                          use_threads=SMALL_READ_THREADS)
        meta, n = file.metadata, table.num_rows
        leaves = [i for i in range(meta.num_columns)
                  if meta.schema.column(i).path.split(".")[0] == layout.EMBEDDING]
        if not leaves:
            raise InputError(f"{out.display(rel)}: no {layout.EMBEDDING} column: not a shard as "
                             "semdedup writes them; re-run assignment")
        values = plain_float_values(data, meta, leaves[0]) if len(leaves) == 1 else None
        if values is None or n == 0 or len(values) % n:
            return table, list_column_to_numpy(file.read(
                columns=[layout.EMBEDDING], use_threads=SMALL_READ_THREADS).column(0))
        return table, values.reshape(n, len(values) // n)


def read_shard_vectors(out: Storage, files: list[str]) -> tuple[pa.Table, list[np.ndarray]]:
    """The rows of these shard files (one cluster's, `shard_files`), in order, with the
    embeddings apart as float32 (rows, dim), one array per file (`read_shard_file_vectors`):
    `take_rows` puts them in any order without joining them first."""
    parts = [read_shard_file_vectors(out, f) for f in files]
    return pa.concat_tables(t for t, _ in parts), [e for _, e in parts]


def take_rows(parts: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """`np.concatenate(parts)[rows]`. Where `rows` is a permutation (a ranking), each part is
    copied once, straight to its rows' places: the join's copy of every vector (and its fresh
    memory, which costs more than the copy on a VM that backs memory lazily) is saved."""
    if len(parts) == 1:
        return parts[0][rows]
    n = sum(len(p) for p in parts)
    place = np.full(n, -1, np.int64)
    place[rows] = np.arange(len(rows))
    if len(rows) != n or (place < 0).any():  # not a permutation
        return np.concatenate(parts)[rows]
    taken = np.empty((n, parts[0].shape[1]), parts[0].dtype)
    start = 0
    for p in parts:
        taken[place[start:start + len(p)]] = p
        start += len(p)
    return taken


@dataclass
class RankedShard:
    cluster: int
    ids: pa.Array  # in rank order
    emb: np.ndarray  # unit float32 (n, d), rank order
    cosine_dist: np.ndarray  # float32 (n,), rank order
    rank_dist: np.ndarray | None = None  # float32 (n,): the distance the ranking used
    files: list[str] | None = None  # the shard's files, in the order their rows were read
    order: np.ndarray | None = None  # the rows read, in rank order


def ranked_shard(cfg: DedupConfig, out: Storage, cluster: int,
                 files: list[str] | None = None) -> RankedShard | None:
    """One cluster's shard in rank order; None when the cluster has no shard. `files`: its
    files where the caller knows them (else listed: one request on S3)."""
    files = shard_files(out, cluster) if files is None else files
    if not files:
        return None
    shard, parts = read_shard_vectors(out, files)
    ids = shard.column(layout.ID).combine_chunks()
    cos = shard.column(layout.COSINE_DIST).to_numpy()
    l2 = shard.column(layout.L2_DIST).to_numpy()
    order = rank_order(ids, l2, cos, cfg.sim_metric, cfg.which_to_keep, cfg.random_state,
                       cluster)
    dist = cos if cfg.sim_metric == "cosine" else l2
    return RankedShard(cluster, ids.take(pa.array(order)), take_rows(parts, order), cos[order],
                       dist[order], files, order)


class KeptShards:
    """Ranked shards that one pass over the clusters keeps for the next, up to `budget` bytes
    of vectors: the cross step's for the prune loop, so that those shards are read and ranked
    once (the rest are read again), and with them their cross tables as written, so that
    those are not read back either (`keep_table`, `table`). Kept in cluster order, so which
    are kept does not depend on thread timing; each is given up when taken."""

    def __init__(self, budget: int):
        self.budget = budget
        self.kept: dict[int, RankedShard] = {}
        self.tables: dict[int, pa.Table] = {}  # cluster -> its cross table, as written

    def keep(self, ranked: RankedShard) -> None:
        if ranked.emb.nbytes <= self.budget:
            self.budget -= ranked.emb.nbytes
            self.kept[ranked.cluster] = ranked

    def keep_table(self, cluster: int, table: pa.Table) -> None:
        """A cluster's cross table as written: kept where its shard is (tens of bytes a clip
        beside the shard's kilobytes)."""
        if cluster in self.kept:
            self.tables[cluster] = table

    def table(self, cluster: int) -> pa.Table | None:
        """The kept cross table of `cluster` (given up), else None."""
        return self.tables.pop(cluster, None)

    def ranked_shard(self, cfg: DedupConfig, out: Storage, cluster: int,
                     files: list[str] | None = None) -> RankedShard | None:
        """The kept shard, else `ranked_shard` (the same arrays either way)."""
        kept = self.kept.pop(cluster, None)
        return kept if kept is not None else ranked_shard(cfg, out, cluster, files)


def save_centroids(out: Storage, centroids: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, centroids.astype(np.float32))
    out.write_bytes(layout.CENTROIDS, buf.getvalue())


def load_centroids(out: Storage) -> np.ndarray:
    return np.load(io.BytesIO(out.read_bytes(layout.CENTROIDS)))
