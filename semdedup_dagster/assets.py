"""Software-defined assets of the output layout, and the stage helpers the `semdedup` job's ops
share with them. Every helper is a thin call into `semdedup_core.pipeline`."""

import contextlib
import time
from collections.abc import Iterator

import numpy as np
from dagster import (
    AssetExecutionContext,
    AssetSpec,
    BackfillPolicy,
    MaterializeResult,
    MetadataValue,
    asset,
    multi_asset,
)

from semdedup_core import layout, run_record
from semdedup_core.backends import get_backend
from semdedup_core.config import DedupConfig, eps_text
from semdedup_core.audit import audit_rate
from semdedup_core.cross_cluster import (cross_cluster_tables, require_cross_tables,
                                         run_provenance)
from semdedup_core.extraction import (audit_output, check_rank_order, extract_from_tables,
                                      removed_mask, summarize)
from semdedup_core.inspection import EPS_GRID, score_stats
from semdedup_core.shards import load_centroids, save_centroids, shard_files_by_cluster
from semdedup_core.pipeline import (
    ClusterResult,
    FitResult,
    assign,
    fit_centroids,
    input_fingerprint,
    nonempty_clusters,
    prune_clusters,
    warn_forced_blas_kernels,
)
from semdedup_core.storage import Storage
from semdedup_dagster.checks import (
    CENTROID_CHECKS,
    SUMMARY_CHECKS,
    check_centroid_partitions,
    require_complete,
    summary_outcomes,
)
from semdedup_dagster.config import SemdedupResource
from semdedup_dagster.failures import reports_user_errors
from semdedup_dagster.partitions import CENTROIDS, register_centroids
from semdedup_dagster.plots import score_histogram_svg, summary_plots
from semdedup_dagster.resources import LayoutStorage

GROUP = "semdedup"
KMEANS_CENTROIDS = "kmeans_centroids"
EMBS_BY_NEAREST_CENTER = "embs_by_nearest_center"
PRUNING_TABLES = "semdedup_pruning_tables"
CROSS_TABLES = "semdedup_cross_cluster_tables"
UNIQUE_IDS = "unique_ids"
DEDUP_SUMMARY = "dedup_summary"


def where(out: Storage, rel: str = "") -> MetadataValue:
    """An artifact's address for metadata: absolute on local disk, the URI on S3."""
    return MetadataValue.path(out.path(rel) if out.local else out.display(rel))


# -- stage helpers (shared with jobs.py) ---------------------------------------------------------
# A Dagster run holds its output folder (semdedup_core/run_record.py) under its root run id, so
# its steps (separate processes) and a re-execution from failure share the hold. The lease is
# renewed while a step runs and covers the gaps between steps; a run whose steps run one at a
# time gives the folder back when a step fails; otherwise a failed or dead run keeps it until
# its lease runs out.
DAGSTER_LEASE_S = 300.0


def run_owner(context) -> str:
    return context.run.root_run_id or context.run.run_id


def steps_one_at_a_time(context) -> bool:
    """Whether the run's steps run one after the other in its own process: asset runs,
    `execute_in_process`, and the `semdedup` job unless its run config asks for `multiprocess`
    (never on k8s)."""
    executor = context.job_def.executor_def.name
    chosen = (context.run.run_config.get("execution") or {}).get("config") or {}
    if executor == "in_process_or_multiprocess":
        return "multiprocess" not in chosen
    return executor in ("in_process", "execute_in_process_executor")


def run_has_failed(context) -> bool:
    return context.instance.get_run_stats(context.run.run_id).steps_failed > 0


@contextlib.contextmanager
def holding_output(context, out: Storage) -> Iterator[run_record.OutputLock]:
    """This step's share of its run's hold on `out`: waits while another run holds it (the
    default instance has no run queue to serialise runs of one output), renews it while the
    step runs. The `semdedup` job's last step releases it; an asset step releases it when it
    ends (asset runs are often partial: the record then waits for `dedup_summary`).

    When the run's steps run one at a time, a step that fails, and any later step of a run
    that already has a failed one, gives the folder back marked failed (run_record: a later
    run takes it at once, a re-execution too): the run cannot finish, and other runs need not
    wait for its lease. With parallel steps a sibling may still be writing, so the lease
    stays."""
    def waiting(holder: run_record.Holder) -> None:
        context.log.info(f"{out.display()}: waiting for {holder.describe()}")

    lock = run_record.acquire(out, run_owner(context), None, wait=True,
                              lease_s=DAGSTER_LEASE_S, progress=waiting)
    failed = False
    try:
        yield lock
    except Exception:
        failed = True
        raise
    finally:
        lock.stop_heartbeat()
        if steps_one_at_a_time(context) and (failed or run_has_failed(context)):
            try:
                lock.release(ok=False)
            except Exception:  # the step's own error matters more (a full disk)
                if not failed:
                    raise
                context.log.warning(f"{out.display()}: could not mark the run's hold as failed")
    if isinstance(context, AssetExecutionContext):
        lock.release(ok=True)


def fit_stage(context, cfg: DedupConfig, storage: LayoutStorage,
              share_input_with_run: str | None = None) -> tuple[FitResult, dict]:
    """Validate the input, fit, write the centroids, register the centroid partitions. With
    `share_input_with_run` (a run id), a .zip input's extraction is kept for that run's
    `assign_stage`."""
    t = time.perf_counter()
    backend = get_backend(cfg.backend)
    warn_forced_blas_kernels(backend, context.log)
    out = storage.output(cfg)
    with holding_output(context, out) as lock:
        with storage.open_input(cfg, share=share_input_with_run, keep=True) as source:
            fit = fit_centroids(cfg, source, backend)
            run_record.begin_writing(out, lock, input_fingerprint(source))
        save_centroids(out, fit.centroids)
    instance = context.instance
    register_centroids(instance, cfg.n_clusters)
    return fit, {
        "path": where(out, layout.CENTROIDS),
        "clips": fit.n_rows, "dimensions": fit.dim, "n_clusters": cfg.n_clusters,
        "fit_sample_clips": fit.sample_rows, "kmeans_iterations": fit.iterations,
        "backend": backend.name, "seconds": round(time.perf_counter() - t, 3),
    }


def assign_stage(context, cfg: DedupConfig, storage: LayoutStorage, only: set[int] | None = None,
                 share_input_with_run: str | None = None) -> tuple[np.ndarray, Storage]:
    """Write the shards (all, or those in `only`); reuses (then removes) the .zip extraction that
    `fit_stage` kept for the same run."""
    out = storage.output(cfg)
    with holding_output(context, out) as lock:
        run_record.begin_writing(out, lock)
        centroids = load_centroids(out)
        with storage.open_input(cfg, share=share_input_with_run) as source:
            sizes = assign(cfg, source, centroids, out, get_backend(cfg.backend), only=only)
    return sizes, out


def cross_stage(context, cfg: DedupConfig, out: Storage, backend,
                targets: list[int] | None = None):
    """With cross_cluster, write the cross tables of `targets` (default: every non-empty
    cluster; those without a shard are left out), yielding (cluster, metadata) per table;
    without it, nothing (the tables of an earlier run go with the other leftovers in the
    summary step)."""
    if not cfg.cross_cluster:
        return
    with holding_output(context, out) as lock:
        run_record.begin_writing(out, lock)
        last = time.perf_counter()
        files_of = shard_files_by_cluster(out)  # one listing, not one per shard folder
        if targets is not None:
            targets = [k for k in targets if k in files_of]
        for result in cross_cluster_tables(cfg, out, sorted(files_of), backend, targets,
                                           files_of=files_of):
            secs, last = time.perf_counter() - last, time.perf_counter()
            scores = result.table.column(layout.SCORE).to_numpy()
            meta = {"path": where(out, layout.cross_table(result.cluster)),
                    "rows": len(scores), "candidates_compared": result.candidates,
                    "max_cross_score": round(float(scores.max()) if len(scores) else 0.0, 6),
                    "seconds": round(secs, 3)}
            meta.update({f"cross_removed_{eps_text(e)}": int(removed_mask(scores, e).sum())
                         for e in cfg.eps_to_extract})
            yield result.cluster, meta


def audit_metadata(rows) -> dict:
    """The audit as dedup_summary metadata: a table, and the estimate and interval per eps."""
    table = "| eps | kept | sampled | pairs left (estimate) | 95% interval |\n|---|---|---|---|---|\n"
    table += "".join(f"| {eps_text(a.eps)} | {a.kept:,} | {a.sampled:,} | "
                     f"{a.estimated_pairs:,.0f} | [{a.low:,.0f}, {a.high:,.0f}] |\n" for a in rows)
    meta = {"kept_pairs_audit": MetadataValue.md(table)}
    for a in rows:
        meta[f"kept_pairs_left_{eps_text(a.eps)}"] = round(float(a.estimated_pairs), 1)
        meta[f"kept_pairs_left_{eps_text(a.eps)}_high"] = round(float(a.high), 1)
    return meta


def shard_metadata(out: Storage, cluster: int, size: int) -> dict:
    return {"path": where(out, layout.shard_dir(cluster)), "rows": int(size)}


def cluster_metadata(out: Storage, result: ClusterResult, seconds: float) -> dict:
    """Per-centroid metadata: sizes, the score histogram, the eps curve and example pairs."""
    table = result.pruning
    scores = table.column(layout.SCORE).to_numpy()
    top = np.argsort(-scores, kind="stable")[:5]
    pairs = "| id | max_id | cosine_sim_score |\n|---|---|---|\n" + "".join(
        f"| {table.column(layout.ID)[int(i)]} | {table.column(layout.MAX_ID)[int(i)]} | "
        f"{scores[i]:.6f} |\n" for i in top if scores[i] > 0)
    curve = "| eps | removed |\n|---|---|\n" + "".join(
        f"| {eps_text(e)} | {int(removed_mask(scores, e).sum())} |\n" for e in EPS_GRID)
    return {"path": where(out, layout.pruning_table(result.cluster)),
            "rows": result.size, "max_cosine_sim_score": round(result.max_score, 6),
            "score_histogram": score_histogram_svg(scores),
            "removed_vs_eps": MetadataValue.md(curve),
            "closest_pairs": MetadataValue.md(pairs), "seconds": round(seconds, 3)}


def removed_metadata(cfg: DedupConfig, out: Storage, cluster: int, removed: dict,
                     result: ClusterResult | None = None) -> dict:
    """A unique_ids partition's: removals and parts per eps; with cross_cluster, where the
    step pruned the cluster (`result`), how many of them only the cross rule makes."""
    meta = {f"removed_{eps_text(e)}": int(n) for e, n in removed.items()}
    if result is not None:
        meta.update({f"removed_by_cross_only_{eps_text(e)}": n
                     for e, n in result.by_cross_only.items()})
    meta.update({f"path_{eps_text(e)}": where(out, layout.unique_ids_part(e, cluster))
                 for e in cfg.eps_to_extract})
    return meta


def summary_stage(context, cfg: DedupConfig, storage: LayoutStorage) -> dict:
    """Write the summaries, remove what earlier runs left, write the completion record and
    release the run's hold on the folder; returns the dedup_summary metadata (tables and
    curves). Memory follows the number of clusters, not clips."""
    out = storage.output(cfg)
    # A partial output is refused before the run takes its hold on the folder: a refusal writes
    # nothing, so it must not keep other runs waiting for a lease.
    require_complete(out, nonempty_clusters(out), cfg.eps_to_extract)
    with holding_output(context, out) as lock:
        run_record.begin_writing(out, lock)
        clusters = nonempty_clusters(out)
        # Example pairs just inside the first eps: the ones a user checks when choosing eps.
        stats = score_stats(out, clusters, EPS_GRID, examples_eps=cfg.eps_to_extract[0],
                            keep_scores=True, cross=cfg.cross_cluster)
        total = stats.total
        rows = summarize(out, cfg.eps_to_extract, clusters, total)  # removed: from the parts
        dim = int(load_centroids(out).shape[1])
        # The audit, as `semdedup run` does it, in a pass of its own (pruning ran in other steps).
        audited = audit_output(out, clusters, cfg.eps_to_extract, get_backend(cfg.backend),
                               audit_rate([stats.sizes[c] for c in clusters], dim, cfg.n_clusters),
                               cfg.random_state, cfg.cross_cluster, stats.scores)
        run_record.remove_leftovers(out, cfg, clusters)
        run_record.write_record(out, lock, cfg, run_record.counts(total, dim, clusters, rows))
        lock.release(ok=True)
    summary_md = "| eps | total | kept | removed |\n|---|---|---|---|\n" + "".join(
        f"| {eps_text(e)} | {r['total']:,} | {r['kept']:,} | {r['removed']:,} |\n"
        for e, r in rows.items())
    curve = "| eps | removed | removed fraction |\n|---|---|---|\n" + "".join(
        f"| {eps_text(e)} | {stats.removed[e]:,} | {stats.removed[e] / max(total, 1):.4f} |\n"
        for e in EPS_GRID)
    sizes_arr = np.array(list(stats.sizes.values()) or [0])
    meta = {
        "total": total, "clusters": len(clusters),
        "summary": MetadataValue.md(summary_md),
        "removed_vs_eps": MetadataValue.md(curve),
        "cluster_size_min": int(sizes_arr.min()), "cluster_size_median": float(np.median(sizes_arr)),
        "cluster_size_max": int(sizes_arr.max()),
        "path": where(out, layout.summary_csv(cfg.eps_to_extract[0])),
    }
    meta.update({f"removed_{eps_text(e)}": r["removed"] for e, r in rows.items()})
    meta[f"example_pairs_{eps_text(cfg.eps_to_extract[0])}"] = MetadataValue.md(
        "| cluster | id | max_id | cosine_sim_score |\n|---|---|---|---|\n" + "".join(
            f"| {c} | {i} | {m} | {sc:.6f} |\n" for sc, c, i, m in stats.examples[:10]))
    meta.update(summary_plots(stats.histogram, sizes_arr, EPS_GRID,
                              [stats.removed[e] / max(total, 1) for e in EPS_GRID]))
    meta.update(audit_metadata(audited))
    return meta


def cluster_dedup_stage(context, cfg: DedupConfig, out: Storage, clusters: list[int], backend,
                        prune: bool = True, extract: bool = True):
    """Prune (and extract) clusters, pipelined (the next ones read while one computes); with
    `prune` off, extract from the pruning tables on storage. Yields, in order, (cluster,
    ClusterResult or None for an empty cluster, removed per eps, seconds since the previous)."""
    last = time.perf_counter()
    with holding_output(context, out) as lock:
        files_of = shard_files_by_cluster(out)  # one listing, not one per shard folder
        made_from = run_provenance(cfg, out) if extract and cfg.cross_cluster else None
        with_shard = [c for c in clusters if c in files_of]
        if made_from is not None:  # checked before anything is written
            require_cross_tables(out, with_shard, made_from, max(cfg.eps_to_extract))
        if extract and not prune and with_shard:  # the pruning tables too (each again later)
            check_rank_order(out, with_shard[0], cfg)
        run_record.begin_writing(out, lock)
        if prune:
            for cluster, result in zip(clusters, prune_clusters(cfg, out, clusters, backend,
                                                                extract=extract,
                                                                files_of=files_of,
                                                                made_from=made_from)):
                secs, last = time.perf_counter() - last, time.perf_counter()
                yield cluster, result, (result.removed if result else {}), secs
            return
        for cluster in clusters:
            removed = extract_from_tables(out, cluster, cfg.eps_to_extract, cfg.cross_cluster,
                                          made_from=made_from, ranked_by=cfg,
                                          files=files_of[cluster]) \
                if cluster in files_of else {}
            secs, last = time.perf_counter() - last, time.perf_counter()
            yield cluster, None, removed, secs


# -- the assets ----------------------------------------------------------------------------------
# Every asset reads the run's arguments from the `semdedup` resource (given once per run).
# All have a single-run backfill policy: the partitioned ones take a range of centroids in one
# step, and `dagster asset materialize --partition-range 0...9` (which wants the policy on every
# selected asset) can select the unpartitioned ones beside them.
IO_MANAGER = "semdedup_layout"  # LayoutIOManager: downstream assets read the layout back


@asset(name=KMEANS_CENTROIDS, group_name=GROUP, kinds={"numpy"}, io_manager_key=IO_MANAGER,
       check_specs=CENTROID_CHECKS, backfill_policy=BackfillPolicy.single_run(),
       description="K-means centroids (clustering_results/kmeans_centroids.npy); registers one "
                   "`centroids` partition per centroid.")
@reports_user_errors
def kmeans_centroids(context: AssetExecutionContext, semdedup: SemdedupResource,
                     layout_storage: LayoutStorage):
    cfg = semdedup.engine()
    _, meta = fit_stage(context, cfg, layout_storage)
    yield MaterializeResult(metadata=meta)
    if context.selected_asset_check_keys:
        partitions = context.instance.get_dynamic_partitions(CENTROIDS.name)
        yield check_centroid_partitions(cfg, layout_storage.output(cfg), partitions).result()


@asset(name=EMBS_BY_NEAREST_CENTER, group_name=GROUP, partitions_def=CENTROIDS,
       io_manager_key=IO_MANAGER,
       deps=[KMEANS_CENTROIDS], backfill_policy=BackfillPolicy.single_run(), kinds={"parquet"},
       description="Clips of each centroid, unit embeddings and distances "
                   "(embs_by_nearest_center/nearest_cent={k}). One streaming pass over the input "
                   "writes every selected partition.")
@reports_user_errors
def embs_by_nearest_center(context: AssetExecutionContext, semdedup: SemdedupResource,
                           layout_storage: LayoutStorage) -> MaterializeResult:
    cfg = semdedup.engine()
    wanted = {int(k) for k in context.partition_keys}
    sizes, out = assign_stage(context, cfg, layout_storage, only=wanted)
    for k in wanted:
        size = int(sizes[k]) if k < len(sizes) else 0
        context.add_asset_metadata(shard_metadata(out, k, size), partition_key=str(k))
    picked = [k for k in wanted if k < len(sizes)]
    return MaterializeResult(metadata={
        "partitions_in_run": len(wanted),
        "rows_in_run": int(sum(sizes[k] for k in picked)),
        "largest_cluster_in_run": int(max((sizes[k] for k in picked), default=0))})


@asset(name=CROSS_TABLES, group_name=GROUP, partitions_def=CENTROIDS, io_manager_key=IO_MANAGER,
       deps=[EMBS_BY_NEAREST_CENTER], backfill_policy=BackfillPolicy.single_run(),
       kinds={"parquet"},
       description="With cross_cluster: per cluster, each clip's best match among the clips of "
                   "other clusters earlier in the global order "
                   "(semdedup_cross_cluster_tables/cluster_{k}.parquet). The selected partitions "
                   "are searched in one pass over the shards they may draw candidates from.")
@reports_user_errors
def cross_cluster_tables_asset(context: AssetExecutionContext, semdedup: SemdedupResource,
                               layout_storage: LayoutStorage) -> MaterializeResult:
    cfg = semdedup.engine()
    out = layout_storage.output(cfg)
    targets = sorted(map(int, context.partition_keys))
    done = dict(cross_stage(context, cfg, out, get_backend(cfg.backend), targets))
    for k, meta in done.items():  # each partition's own figures and table (as the job's)
        context.add_asset_metadata(meta, partition_key=str(k))
    return MaterializeResult(metadata={
        "cross_cluster": cfg.cross_cluster, "partitions_in_run": len(done),
        **{f"cross_removed_{eps_text(e)}_in_run": sum(m[f"cross_removed_{eps_text(e)}"]
                                                      for m in done.values())
           for e in cfg.eps_to_extract}})


@multi_asset(
    name="cluster_dedup", group_name=GROUP, partitions_def=CENTROIDS, can_subset=True,
    backfill_policy=BackfillPolicy.single_run(),
    specs=[
        AssetSpec(PRUNING_TABLES, deps=[EMBS_BY_NEAREST_CENTER], partitions_def=CENTROIDS,
                  skippable=True, kinds={"parquet"}, metadata={"dagster/io_manager_key": IO_MANAGER},
                  description="Per cluster, rank order with each clip's best earlier match "
                              "(semdedup_pruning_tables/cluster_{k}.parquet)."),
        AssetSpec(UNIQUE_IDS, deps=[PRUNING_TABLES, CROSS_TABLES], partitions_def=CENTROIDS,
                  skippable=True,
                  kinds={"parquet"}, metadata={"dagster/io_manager_key": IO_MANAGER},
                  description="The clips to REMOVE per eps (unique_ids_{eps}.parquet/part.{k})."),
    ])
@reports_user_errors
def cluster_dedup(context: AssetExecutionContext, semdedup: SemdedupResource,
                  layout_storage: LayoutStorage):
    cfg = semdedup.engine()
    out = layout_storage.output(cfg)
    backend = get_backend(cfg.backend)
    selected = {k.to_user_string() for k in context.selected_asset_keys}
    prune, extract = PRUNING_TABLES in selected, UNIQUE_IDS in selected
    clusters = sorted(int(k) for k in context.partition_keys)
    removed_total = dict.fromkeys(cfg.eps_to_extract, 0)
    for cluster, result, removed, secs in cluster_dedup_stage(context, cfg, out, clusters,
                                                              backend, prune, extract):
        if prune:
            meta = cluster_metadata(out, result, secs) if result else {"rows": 0, "empty": True}
            context.add_asset_metadata(meta, asset_key=PRUNING_TABLES, partition_key=str(cluster))
        if extract:
            context.add_asset_metadata(removed_metadata(cfg, out, cluster, removed, result),
                                       asset_key=UNIQUE_IDS, partition_key=str(cluster))
            for eps, n in removed.items():
                removed_total[eps] += n
    if prune:
        yield MaterializeResult(asset_key=PRUNING_TABLES,
                                metadata={"partitions_in_run": len(clusters)})
    if extract:
        yield MaterializeResult(asset_key=UNIQUE_IDS, metadata={
            "partitions_in_run": len(clusters),
            **{f"removed_{eps_text(e)}_in_run": n for e, n in removed_total.items()}})


@asset(name=DEDUP_SUMMARY, group_name=GROUP, deps=[UNIQUE_IDS], kinds={"csv"},
       io_manager_key=IO_MANAGER, check_specs=SUMMARY_CHECKS,
       backfill_policy=BackfillPolicy.single_run(),
       description="dedup_summary_{eps}.csv per eps, the removed-vs-eps curve and the "
                   "cluster-size distribution. Fails when clusters with shards lack pruning "
                   "tables (a partial output).")
@reports_user_errors
def dedup_summary(context: AssetExecutionContext, semdedup: SemdedupResource,
                  layout_storage: LayoutStorage):
    cfg = semdedup.engine()
    yield MaterializeResult(metadata=summary_stage(context, cfg, layout_storage))
    checks = {k.name for k in context.selected_asset_check_keys}
    for outcome in summary_outcomes(cfg, layout_storage.output(cfg)):
        if outcome.name in checks:
            yield outcome.result()


ASSETS = [kmeans_centroids, embs_by_nearest_center, cross_cluster_tables_asset, cluster_dedup,
          dedup_summary]
