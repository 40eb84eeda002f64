"""The stages in order. Each stage is a function that can run alone against the output layout
(Dagster runs them one asset at a time, per centroid partition); `run_pipeline` runs them all.

    scan+fit  -> clustering_results/kmeans_centroids.npy
    assign    -> clustering_results/embs_by_nearest_center/nearest_cent=<k>/<sha>.parquet
    cross     -> extraction/semdedup_cross_cluster_tables/cluster_<k>.parquet (cross_cluster only)
    prune(k)  -> extraction/semdedup_pruning_tables/cluster_<k>.parquet
                 extraction/unique_ids_<eps>.parquet/part.<k>.parquet
    summary   -> extraction/dedup_summary_<eps>.csv, extraction/audit.json
"""

import contextlib
import functools
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from semdedup_core import layout, run_record
from semdedup_core.backends import Backend, get_backend
from semdedup_core.config import DedupConfig
from semdedup_core.embeddings import EmbeddingSource, scan_input
from semdedup_core.errors import InputError
from semdedup_core.audit import EpsAudit, KeptPairsAudit, audit_rate, write_audit
from semdedup_core.cross_cluster import (Probes, check_cross_table, cross_cluster_tables,
                                         probe_radius, read_cross_table, run_provenance)
from semdedup_core.extraction import (removed_by_cross_only, removed_rows, summarize,
                                      write_removed)
from semdedup_core.shards import (KeptShards, RankedShard, assign_to_shards, ranked_shard,
                                 save_centroids)
from semdedup_core.pairwise import max_similarity_to_earlier, pairwise_flops
from semdedup_core.parquet import write_table
from semdedup_core.storage import S3Options, Storage, open_input_location
from semdedup_core.threads import host_threads, in_order_beside, ordered_map

log = logging.getLogger(__name__)

# Clusters queued for the audit beside the prune loop: it is faster than pruning, so a short
# queue keeps the loop from waiting on it without holding many clusters' embeddings.
AUDIT_BACKLOG = 2


@dataclass
class PhaseTimer:
    """Seconds, FLOPs and the process's CPU seconds per phase, for the closing table and the
    benchmarks (on a shared machine CPU seconds move far less than wall seconds)."""

    seconds: dict[str, float] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase (re-entering one adds to it); logged once, for runs without a
        terminal (a re-entry, e.g. writing the centroids, adds to the closing table only)."""
        first = name not in self.seconds
        if first:
            log.info("%s: started", name)
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu
            if first:
                log.info("%s: done in %.2f s", name, self.seconds[name])

    def gflops(self, name: str) -> float | None:
        if name in self.flops and self.seconds.get(name):
            return self.flops[name] / self.seconds[name] / 1e9
        return None


def _bar(total: int, desc: str, unit: str, show: bool):
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not show, leave=False)


@contextlib.contextmanager
def open_source(cfg: DedupConfig, s3: S3Options | None = None, share: str | None = None,
                keep: bool = False) -> Iterator[EmbeddingSource]:
    """The input as an EmbeddingSource (a .zip is extracted for the duration, or kept for a later
    step of the same run: see `open_input_location`). `s3`: the deployment's S3 defaults, under
    the run's own aws_* settings."""
    with open_input_location(cfg.input_embeddings_path, S3Options.from_config(cfg, s3),
                             cfg.zip_max_bytes, share=share, keep=keep) as folder:
        yield EmbeddingSource.discover(folder, cfg.id_column, cfg.embedding_column,
                                       cfg.read_batch_rows)


def input_fingerprint(source: EmbeddingSource) -> str:
    return run_record.input_fingerprint(source.fingerprint_items())


def output_storage(cfg: DedupConfig, s3: S3Options | None = None) -> Storage:
    return Storage(cfg.resolved_output_path, S3Options.from_config(cfg, s3))


# -- stage 1: scan + fit -------------------------------------------------------------------------
@dataclass
class FitResult:
    centroids: np.ndarray
    n_rows: int
    dim: int
    sample_rows: int
    iterations: int


def fit_centroids(cfg: DedupConfig, source: EmbeddingSource, backend: Backend,
                  timer: PhaseTimer | None = None, show_progress: bool = False,
                  unique_ids: bool = True) -> FitResult:
    """Validate the whole input, fit K-means on a seeded sample. Writes nothing."""
    timer = timer or PhaseTimer()
    n = source.n_rows
    if cfg.n_clusters > n:
        raise InputError(f"{source.storage.display()}: n_clusters={cfg.n_clusters} is larger than "
                         f"the number of clips ({n}); lower n_clusters")
    with timer.phase("scan"), _bar(n, "scan + validate", "clip", show_progress) as bar:
        scan = scan_input(source, cfg.fit_sample_rows(n), cfg.random_state, bar.update,
                          unique_ids)
    with timer.phase("kmeans_fit"):
        log.info("fitting K-means: %d clusters on %d of %d clips (dim %d)", cfg.n_clusters,
                 len(scan.sample), n, scan.dim)
        centroids, iters = backend.fit_kmeans(scan.sample, cfg.n_clusters, cfg.max_iter,
                                              cfg.kmeans_tol, cfg.random_state, cfg.gpu_kmeans)
    timer.flops["kmeans_fit"] = 2.0 * iters * len(scan.sample) * cfg.n_clusters * scan.dim
    return FitResult(centroids, n, scan.dim, len(scan.sample), iters)


# -- stage 2: assign -----------------------------------------------------------------------------
def assign(cfg: DedupConfig, source: EmbeddingSource, centroids: np.ndarray, out: Storage,
           backend: Backend, timer: PhaseTimer | None = None, show_progress: bool = False,
           only: set[int] | None = None, probes: Probes | None = None,
           written: dict[int, list[str]] | None = None) -> np.ndarray:
    """Write every `nearest_cent=<k>` shard (or those in `only`). Returns cluster sizes.
    `probes` (`assign_probes`): also keep each clip's cross-cluster probes, from the
    distances assignment computes anyway, for the cross step of the same run. `written`:
    filled with each cluster's shard files, for the later steps of the same run."""
    timer = timer or PhaseTimer()
    k, dim = centroids.shape
    with timer.phase("assign"), _bar(source.n_rows, "assign", "clip", show_progress) as bar:
        sizes = assign_to_shards(source, centroids, out, backend,
                                 buffer_bytes=cfg.buffer_bytes(source.n_rows, dim),
                                 progress=bar.update, only=only, per_clip=probes,
                                 written=written)
    timer.flops["assign"] = 2.0 * source.n_rows * k * dim
    return sizes


def assign_probes(cfg: DedupConfig, centroids: np.ndarray) -> Probes | None:
    """With a capped cross_cluster search, the probes for assignment to fill (`assign`) and
    the cross step to use (`cross_all`): the cross step then needs no (clips x k) GEMM of its
    own. Held in memory (max_probes x 4 bytes per clip), so only within one process; the
    cross step computes the probes of any shard they do not cover (Dagster's steps),
    with the same bits."""
    if not cfg.cross_cluster or cfg.cross_cluster_max_probes == 0:
        return None
    probes = Probes(centroids, probe_radius(cfg.eps_to_extract), cfg.cross_cluster_max_probes)
    return None if probes.all else probes


def nonempty_clusters(out: Storage) -> list[int]:
    """The clusters that have a shard on storage, ascending."""
    found = (layout.cluster_of_shard_dir(d) for d in out.list_dirs(layout.SHARDS))
    return sorted(c for c in found if c is not None)


# -- stage 3: prune one cluster, stage 4: extract its removals -----------------------------------
@dataclass
class ClusterResult:
    cluster: int
    size: int
    removed: dict[float, int]
    flops: int
    max_score: float
    pruning: pa.Table  # as written, so callers (Dagster metadata) need not read it back
    cross: pa.Table | None = None  # the cluster's cross-cluster table (cross_cluster only)
    emb: np.ndarray | None = None  # unit rows in rank order, for the audit
    # per eps, the removals only the cross rule makes (`removed_by_cross_only`; with a cross table)
    by_cross_only: dict[float, int] = field(default_factory=dict)


@dataclass
class ScoredShard:
    ranked: RankedShard
    score: np.ndarray  # float32 (n,), each clip's best similarity to an earlier clip
    match: np.ndarray  # int64 (n,), the position of that clip
    flops: int


def score_shard(cfg: DedupConfig, backend: Backend, ranked: RankedShard,
                pool: Executor | None = None) -> ScoredShard:
    """The pairwise pass of one ranked cluster on the backend (the device work); with `pool`,
    its row blocks run on those threads."""
    n, dim = ranked.emb.shape
    tile = backend.pairwise_tile_size(cfg.pairwise_tile_size, dim)
    # A cluster larger than a quarter of free device memory stays on the host; tiles move over.
    emb = backend.asarray(ranked.emb) if backend.fits_on_device(ranked.emb.nbytes) else ranked.emb
    score, match = max_similarity_to_earlier(backend, emb, tile, pool=pool)
    return ScoredShard(ranked, backend.to_numpy(score), backend.to_numpy(match),
                       pairwise_flops(n, tile, dim))


def write_cluster_outputs(cfg: DedupConfig, out: Storage, scored: ScoredShard,
                          extract: bool, cross: pa.Table | None = None,
                          made_from: str | None = None) -> ClusterResult:
    """Write the pruning table and, with `extract`, every eps's `unique_ids` part. With
    cross_cluster the removals take the cluster's cross table: `cross` where this run made it
    and holds it, else read from storage and checked against this run's (`check_cross_table`;
    `made_from`: `run_provenance`, else read here) before anything of the cluster is written."""
    ranked = scored.ranked
    if not (cfg.cross_cluster and extract):
        cross = None
    elif cross is None:
        cross = read_cross_table(out, ranked.cluster, required=True)
        check_cross_table(out, ranked.cluster, cross, ranked.ids,
                          made_from or run_provenance(cfg, out), max(cfg.eps_to_extract))
    pruning = pa.table({layout.ID: ranked.ids, layout.MAX_ID: ranked.ids.take(pa.array(scored.match)),
                        layout.SCORE: pa.array(scored.score, type=pa.float32())})
    write_table(out, layout.pruning_table(ranked.cluster), pruning)
    removed = write_removed(out, pruning, ranked.cosine_dist, ranked.cluster,
                            cfg.eps_to_extract, cross) if extract else {}
    n = len(ranked.ids)
    by_cross_only = {} if cross is None else {
        e: removed_by_cross_only(pruning, cross, e) for e in cfg.eps_to_extract}
    return ClusterResult(ranked.cluster, n, removed, scored.flops,
                         float(scored.score.max()) if n else 0.0, pruning, cross, ranked.emb,
                         by_cross_only)


def prune_clusters(cfg: DedupConfig, out: Storage, clusters: list[int], backend: Backend,
                   extract: bool = True,
                   kept: KeptShards | None = None,
                   files_of: dict[int, list[str]] | None = None,
                   made_from: str | None = None) -> Iterator[ClusterResult | None]:
    """Prune (and extract) each cluster, yielding results in the order given (None for a cluster
    without a shard). Results never depend on which thread computed what.
    On the CPU, each cluster is read, ranked, scored and written on a host thread of its own,
    its row blocks computed on the compute threads (one BLAS thread each), so small clusters
    run side by side and a large one spreads over every core; about 2 x host_threads()
    clusters are in memory at once. On a device, this thread runs the pairwise passes, cluster
    after cluster, while host threads read and rank the next clusters and write the finished
    ones, so the device is not left waiting on parquet; about 2 x host_threads() clusters are
    in memory at once. `kept`: shards (and cross tables) the cross step kept, taken instead
    of read again. `files_of`: every cluster's shard files (none for a cluster it lacks), as
    assignment wrote them, so that no shard folder is listed again. `made_from`: this run's
    `run_provenance` where the caller has it (else read once, when a cross table is read)."""
    workers = host_threads()
    take = ranked_shard if kept is None else kept.ranked_shard

    def read(cluster: int) -> RankedShard | None:
        return take(cfg, out, cluster, None if files_of is None else files_of.get(cluster, []))

    provenance = functools.cache(lambda: made_from or run_provenance(cfg, out))

    def finish(s: ScoredShard | None) -> ClusterResult | None:
        if s is None:
            return None
        cross = kept.table(s.ranked.cluster) if kept is not None else None
        read = cfg.cross_cluster and extract and cross is None  # checked against `provenance`
        return write_cluster_outputs(cfg, out, s, extract, cross,
                                     provenance() if read else None)

    with backend.compute_pool() as pool:
        if pool is not None:
            def prune_one(cluster: int) -> ClusterResult | None:
                ranked = read(cluster)
                return finish(None if ranked is None else score_shard(cfg, backend, ranked, pool))

            yield from ordered_map(prune_one, clusters, 2 * workers)
            return
        ranked = ordered_map(read, clusters, workers)
        scored = (r if r is None else score_shard(cfg, backend, r) for r in ranked)
        yield from ordered_map(finish, scored, workers)


def prune_cluster(cfg: DedupConfig, out: Storage, cluster: int, backend: Backend,
                  extract: bool = True) -> ClusterResult | None:
    """One cluster (what a Dagster partition does); None when it has no shard."""
    with contextlib.closing(prune_clusters(cfg, out, [cluster], backend, extract)) as results:
        return next(results)


def cross_all(cfg: DedupConfig, out: Storage, clusters: list[int], backend: Backend,
              timer: PhaseTimer | None = None, show_progress: bool = False,
              probes: Probes | None = None, keep: KeptShards | None = None,
              files_of: dict[int, list[str]] | None = None) -> None:
    """With cross_cluster, write every cluster's cross table (without it, those of an earlier
    run are removed with the other leftovers at the end: `run_record.remove_leftovers`).
    `probes`: those assignment kept (`assign_probes`); `keep`: where to keep the shards read
    for `prune_all`; `files_of`: the shard files assignment wrote (`prune_clusters`)."""
    if not cfg.cross_cluster:
        return
    timer = timer or PhaseTimer()
    flops = 0
    with timer.phase("cross"), _bar(len(clusters), "cross-cluster", "cluster",
                                    show_progress) as bar:
        for result in cross_cluster_tables(cfg, out, clusters, backend, probes=probes,
                                           keep=keep, files_of=files_of):
            if keep is not None:
                keep.keep_table(result.cluster, result.table)
            flops += result.flops
            bar.update(1)
    timer.flops["cross"] = float(flops)


def cluster_removed(cfg: DedupConfig, result: ClusterResult) -> dict[float, np.ndarray]:
    """Which clips (rank order) each eps removes: pruning score or cross score >= 1 - eps."""
    return {e: removed_rows(result.pruning, result.cross, e) for e in cfg.eps_to_extract}


def prune_all(cfg: DedupConfig, out: Storage, clusters: list[int], backend: Backend,
              timer: PhaseTimer | None = None, show_progress: bool = False,
              audit: KeptPairsAudit | None = None,
              kept: KeptShards | None = None,
              files_of: dict[int, list[str]] | None = None,
              by_cross_only: dict[float, int] | None = None) -> dict[float, int]:
    """Prune and extract every cluster (results are not kept: memory stays at a few clusters),
    feeding each to `audit` in cluster order, on a thread of its own beside the pruning (so
    the prune loop never waits for it while a few clusters are queued). Returns the clips
    removed per eps. The audit's phase is, on the CPU, its thread's CPU time (what it takes
    from the run at most); on a device, the wall time of its calls (its GEMMs run there). The
    prune phase keeps the loop's whole wall time: the audit overlaps it, so subtracting the
    audit's time would flatter the prune row (its seconds are what #14's GFLOP/s divide).
    `kept`: shards the cross step kept (`cross_all`); `files_of`: see `prune_clusters`;
    `by_cross_only`: with cross_cluster, summed into per eps: the removals only the cross-cluster
    rule makes (`ClusterResult.by_cross_only`)."""
    timer = timer or PhaseTimer()
    flops = 0
    removed = dict.fromkeys(cfg.eps_to_extract, 0)
    if audit is not None:
        timer.seconds.setdefault("audit", 0.0)
    clock = time.thread_time if backend.name == "cpu" else time.perf_counter

    def check(result: ClusterResult) -> None:
        start = clock()
        audit.add_cluster(result.cluster, result.emb, cluster_removed(cfg, result))
        timer.seconds["audit"] += clock() - start

    with timer.phase("prune"), _bar(len(clusters), "pairwise", "cluster", show_progress) as bar, \
            in_order_beside(AUDIT_BACKLOG) as beside:
        for result in prune_clusters(cfg, out, clusters, backend, kept=kept,
                                     files_of=files_of):
            if result is not None:
                flops += result.flops
                for eps, n in result.removed.items():
                    removed[eps] += n
                if by_cross_only is not None:
                    for eps, n in result.by_cross_only.items():
                        by_cross_only[eps] = by_cross_only.get(eps, 0) + n
                if audit is not None:
                    beside(functools.partial(check, result))
            bar.update(1)
    if "audit" in timer.seconds and clock is time.thread_time:  # its thread's, out of prune's
        timer.cpu_seconds["audit"] = timer.seconds["audit"]
        timer.cpu_seconds["prune"] -= timer.seconds["audit"]
    timer.flops["prune"] = float(flops)
    return removed


def run_audit(cfg: DedupConfig, backend: Backend, sizes: np.ndarray,
              centroids: np.ndarray) -> KeptPairsAudit:
    """The audit of a run with clusters of `sizes` around `centroids`."""
    rate = audit_rate(sizes, centroids.shape[1], cfg.n_clusters)
    return KeptPairsAudit(backend, cfg.eps_to_extract, rate, cfg.random_state, centroids)


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
    audit: list[EpsAudit] = field(default_factory=list)
    by_cross_only: dict[float, int] | None = None  # with cross_cluster: `prune_all`'s


def warn_forced_blas_kernels(backend: Backend, logger=log) -> None:
    """Say so (on `logger`: a Dagster step passes its context's) when OPENBLAS_CORETYPE forces
    the CPU backend's kernels (README: OpenBLAS kernels): a family that does not match the CPU
    runs the GEMMs slower, and its rows' bits may follow the shape of each call, so outputs
    may differ with the thread count."""
    forced = os.environ.get("OPENBLAS_CORETYPE")
    if backend.name == "cpu" and forced:
        logger.warning("OPENBLAS_CORETYPE=%s forces OpenBLAS's kernels: where they do not "
                       "match this CPU, GEMMs run slower and outputs may differ with the thread "
                       "count; unset it unless OpenBLAS misdetects the CPU (README: OpenBLAS "
                       "kernels)", forced)


def run_pipeline(cfg: DedupConfig, show_progress: bool = False,
                 s3: S3Options | None = None, wait: bool = False) -> RunReport:
    """Every stage in order; the output layout is complete when this returns. The output folder
    is taken first (`run_record`): a second run into it fails naming this one, or with `wait`
    waits for it. The completion record is written last."""
    timer = PhaseTimer()
    backend = get_backend(cfg.backend)
    warn_forced_blas_kernels(backend)
    out = output_storage(cfg, s3)
    with run_record.take_output(out, wait=wait) as lock:
        with open_source(cfg, s3) as source:
            fit = fit_centroids(cfg, source, backend, timer, show_progress)
            # Nothing is written before the whole input has been validated.
            run_record.begin_writing(out, lock, input_fingerprint(source))
            with timer.phase("kmeans_fit"):
                save_centroids(out, fit.centroids)
            probes = assign_probes(cfg, fit.centroids)
            files_of: dict[int, list[str]] = {}  # no shard folder is listed again
            sizes = assign(cfg, source, fit.centroids, out, backend, timer, show_progress,
                           probes=probes, written=files_of)
        clusters = [int(c) for c in np.flatnonzero(sizes)]
        # The shards the cross step reads, as many as the assignment buffer's memory (free
        # by now) holds, are kept for the prune loop: read and ranked once.
        kept = KeptShards(cfg.buffer_bytes(fit.n_rows, fit.dim)) if cfg.cross_cluster else None
        cross_all(cfg, out, clusters, backend, timer, show_progress, probes, kept, files_of)
        audit = run_audit(cfg, backend, sizes, fit.centroids)
        by_cross_only = {} if cfg.cross_cluster else None
        removed = prune_all(cfg, out, clusters, backend, timer, show_progress, audit, kept,
                            files_of, by_cross_only)
        with timer.phase("summary"):
            summary = summarize(out, cfg.eps_to_extract, clusters, int(sizes.sum()), removed)
            audited = audit.result()
            write_audit(out, audit.rate, cfg.random_state, cfg.cross_cluster, audited)
            run_record.remove_leftovers(out, cfg, clusters)
            run_record.write_record(out, lock, cfg,
                                    run_record.counts(fit.n_rows, fit.dim, clusters, summary))
    return RunReport(out.display(), backend.name, fit.n_rows, fit.dim, cfg.n_clusters,
                     fit.iterations, fit.sample_rows, sizes, summary, timer, audited,
                     by_cross_only)
