"""The stages in order. Each stage is a function that can run alone against the output layout
(Dagster runs them one asset at a time, per centroid partition); `run_pipeline` runs them all.

    scan+fit  -> clustering_results/kmeans_centroids.npy
    assign    -> clustering_results/embs_by_nearest_center/nearest_cent=<k>/<sha>.parquet
    prune(k)  -> extraction/semdedup_pruning_tables/cluster_<k>.parquet
                 extraction/unique_ids_<eps>.parquet/part.<k>.parquet
    summary   -> extraction/dedup_summary_<eps>.csv
"""

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from semdedup_core import layout
from semdedup_core.backends import Backend, get_backend
from semdedup_core.config import DedupConfig
from semdedup_core.embeddings import EmbeddingSource, scan_input
from semdedup_core.errors import InputError
from semdedup_core.extraction import summarize, write_removed
from semdedup_core.kmeans import (assign_to_shards, load_centroids, lloyd, read_shard,
                                  save_centroids)
from semdedup_core.pairwise import max_similarity_to_earlier, pairwise_flops
from semdedup_core.parquet import write_table
from semdedup_core.ranking import rank_order
from semdedup_core.storage import S3Options, Storage, open_input_location

log = logging.getLogger(__name__)


@dataclass
class PhaseTimer:
    """Seconds and FLOPs per phase, for the closing table and the benchmarks."""

    seconds: dict[str, float] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def gflops(self, name: str) -> float | None:
        if name in self.flops and self.seconds.get(name):
            return self.flops[name] / self.seconds[name] / 1e9
        return None


def _bar(total: int, desc: str, unit: str, show: bool):
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not show, leave=False)


@contextlib.contextmanager
def open_source(cfg: DedupConfig) -> Iterator[EmbeddingSource]:
    """The input as an EmbeddingSource (a .zip is extracted for the duration)."""
    with open_input_location(cfg.input_embeddings_path, S3Options.from_config(cfg),
                             cfg.zip_max_bytes) as folder:
        yield EmbeddingSource.discover(folder, cfg.id_column, cfg.embedding_column,
                                       cfg.read_batch_rows)


def output_storage(cfg: DedupConfig) -> Storage:
    return Storage(cfg.resolved_output_path, S3Options.from_config(cfg))


# -- stage 1: scan + fit -------------------------------------------------------------------------
@dataclass
class FitResult:
    centroids: np.ndarray
    n_rows: int
    dim: int
    sample_rows: int
    iterations: int


def fit_sample_size(cfg: DedupConfig, n_rows: int) -> int:
    """The fit sample: min(all clips, kmeans_sample_per_cluster * n_clusters)."""
    return min(n_rows, cfg.kmeans_sample_per_cluster * cfg.n_clusters)


def fit_centroids(cfg: DedupConfig, source: EmbeddingSource, backend: Backend,
                  timer: PhaseTimer | None = None, show_progress: bool = False) -> FitResult:
    """Validate the whole input, fit K-means on a seeded sample. Writes nothing."""
    timer = timer or PhaseTimer()
    n = source.n_rows
    if cfg.n_clusters > n:
        raise InputError(f"{source.storage.display()}: n_clusters={cfg.n_clusters} is larger than "
                         f"the number of clips ({n}); lower n_clusters")
    with timer.phase("scan"), _bar(n, "scan + validate", "clip", show_progress) as bar:
        scan = scan_input(source, fit_sample_size(cfg, n), cfg.random_state, bar.update)
    with timer.phase("kmeans_fit"):
        log.info("fitting K-means: %d clusters on %d of %d clips (dim %d)", cfg.n_clusters,
                 len(scan.sample), n, scan.dim)
        centroids, iters = backend.fit_kmeans(scan.sample, cfg.n_clusters, cfg.max_iter,
                                              cfg.kmeans_tol, cfg.random_state)
    timer.flops["kmeans_fit"] = 2.0 * iters * len(scan.sample) * cfg.n_clusters * scan.dim
    return FitResult(centroids, n, scan.dim, len(scan.sample), iters)


# -- stage 2: assign -----------------------------------------------------------------------------
def assign(cfg: DedupConfig, source: EmbeddingSource, centroids: np.ndarray, out: Storage,
           backend: Backend, timer: PhaseTimer | None = None,
           show_progress: bool = False) -> np.ndarray:
    """Write every `nearest_cent=<k>` shard. Returns cluster sizes (n_clusters,)."""
    timer = timer or PhaseTimer()
    k, dim = centroids.shape
    with timer.phase("assign"), \
            _bar(source.n_rows, "assign", "clip", show_progress) as bar, \
            _bar(k, "write shards", "cluster", show_progress) as bar2:
        sizes = assign_to_shards(source, centroids, out, backend, progress=bar.update,
                                 shard_progress=bar2.update)
    timer.flops["assign"] = 2.0 * source.n_rows * k * dim
    return sizes


def nonempty_clusters(out: Storage) -> list[int]:
    """The clusters that have a shard on storage, ascending."""
    found = (layout.cluster_of_shard_dir(d) for d in out.list_dirs(layout.SHARDS))
    return sorted(c for c in found if c is not None)


# -- stage 3: prune one cluster ------------------------------------------------------------------
@dataclass
class ClusterResult:
    cluster: int
    size: int
    removed: dict[float, int]
    flops: int


def list_column_to_numpy(col) -> np.ndarray:
    """A list<float>/fixed_size_list column as float32 (rows, dim)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(n, len(values) // n if n else 0)


def prune_cluster(cfg: DedupConfig, out: Storage, cluster: int, backend: Backend) -> ClusterResult:
    """Rank one cluster's shard, compute its pruning table, and write the table and the
    `unique_ids_<eps>` part of every eps."""
    shard = read_shard(out, cluster)
    ids = shard.column("id").combine_chunks()
    l2 = shard.column("l2_dist_to_cent").to_numpy()
    cos = shard.column("cosine_dist_to_cent").to_numpy()
    order = rank_order(ids, l2, cos, cfg.sim_metric, cfg.which_to_keep, cfg.random_state, cluster)
    emb = list_column_to_numpy(shard.column("embedding"))[order]
    tile = backend.pairwise_tile_size(cfg.pairwise_tile_size, emb.shape[1])
    score, match = max_similarity_to_earlier(backend, backend.asarray(emb), tile)
    score, match = backend.to_numpy(score), backend.to_numpy(match)
    ranked_ids = ids.take(pa.array(order))
    pruning = pa.table({"id": ranked_ids, "max_id": ranked_ids.take(pa.array(match)),
                        "cosine_sim_score": pa.array(score, type=pa.float32())})
    write_table(out, layout.pruning_table(cluster), pruning)
    removed = write_removed(out, pruning, cos[order], cluster, cfg.eps_to_extract)
    return ClusterResult(cluster, len(order), removed, pairwise_flops(len(order), tile,
                                                                      emb.shape[1]))


def prune_all(cfg: DedupConfig, out: Storage, clusters: list[int], backend: Backend,
              timer: PhaseTimer | None = None, show_progress: bool = False) -> list[ClusterResult]:
    timer = timer or PhaseTimer()
    results = []
    with timer.phase("prune"), _bar(len(clusters), "pairwise", "cluster", show_progress) as bar:
        for c in clusters:
            results.append(prune_cluster(cfg, out, c, backend))
            bar.update(1)
    timer.flops["prune"] = float(sum(r.flops for r in results))
    # Pruning tables of clusters that no longer exist (an earlier run) would mislead readers.
    wanted = set(clusters)
    for rel in out.list_files(layout.PRUNING_TABLES):
        c = layout.cluster_of_pruning_table(rel.rsplit("/", 1)[-1])
        if c is not None and c not in wanted:
            out.delete_file(rel)
    return results


# -- all stages ----------------------------------------------------------------------------------
@dataclass
class RunReport:
    output_path: str
    backend: str
    n_rows: int
    dim: int
    n_clusters: int
    kmeans_iterations: int
    sample_rows: int
    cluster_sizes: np.ndarray
    summary: dict[float, dict]
    timer: PhaseTimer


def run_pipeline(cfg: DedupConfig, show_progress: bool = False) -> RunReport:
    """Every stage in order; the output layout is complete when this returns."""
    timer = PhaseTimer()
    backend = get_backend(cfg.backend)
    out = output_storage(cfg)
    with open_source(cfg) as source:
        fit = fit_centroids(cfg, source, backend, timer, show_progress)
        # Nothing is written before the whole input has been validated.
        with timer.phase("assign"):
            save_centroids(out, fit.centroids)
        sizes = assign(cfg, source, fit.centroids, out, backend, timer, show_progress)
    clusters = [int(c) for c in np.flatnonzero(sizes)]
    prune_all(cfg, out, clusters, backend, timer, show_progress)
    with timer.phase("summary"):
        summary = summarize(out, cfg.eps_to_extract, clusters)
    return RunReport(out.display(), backend.name, fit.n_rows, fit.dim, cfg.n_clusters,
                     fit.iterations, fit.sample_rows, sizes, summary, timer)


__all__ = ["run_pipeline", "fit_centroids", "assign", "prune_cluster", "prune_all", "summarize",
           "load_centroids", "lloyd", "nonempty_clusters", "open_source", "output_storage"]
