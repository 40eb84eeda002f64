"""Jobs.

`semdedup`: the whole pipeline in one run, for the launchpad, sensors, schedules and
`dagster job execute`. Centroids are fitted once, shards written in one streaming pass, then the
clusters are fanned out in batches (`centroids_per_step`) to parallel steps; each step reports
materialisations of the centroid partitions it produced, so the asset catalog shows them.

`semdedup_centroid`: re-materialise chosen centroid partitions of the pruning tables and
unique ids (e.g. one that failed), from the asset graph or the launchpad.
"""

from dagster import (
    AssetMaterialization,
    AssetObservation,
    Config,
    DynamicOut,
    DynamicOutput,
    In,
    Nothing,
    OpExecutionContext,
    Out,
    define_asset_job,
    job,
    op,
)
from pydantic import Field as PydanticField

from semdedup_core.backends import get_backend
from semdedup_core.config import DedupConfig, checked_eps, eps_text, make_config
from semdedup_core.extraction import sweep
from semdedup_core.sample import DEMO_ARGS
from semdedup_core import layout
from semdedup_dagster.assets import (
    CROSS_TABLES,
    DEDUP_SUMMARY,
    EMBS_BY_NEAREST_CENTER,
    KMEANS_CENTROIDS,
    PRUNING_TABLES,
    UNIQUE_IDS,
    assign_stage,
    cluster_dedup_stage,
    cross_stage,
    fit_stage,
    removed_metadata,
    shard_metadata,
    summary_stage,
    where,
)
from semdedup_dagster.checks import check_centroid_partitions, summary_outcomes
from semdedup_dagster.config import ASSIGN_OP, SemdedupResource, run_config_for
from semdedup_dagster.failures import reports_user_errors
from semdedup_dagster.k8s import job_executor, run_k8s_tags, step_k8s_tags
from semdedup_dagster.partitions import CENTROIDS
from semdedup_dagster.reporting import PartitionReport, figures_table, reports_partitions
from semdedup_dagster.resources import LayoutStorage

# Runs started by the sensor and the schedule carry their output folder in this tag; the
# deployment's run queue (deploy/dagster.yaml) runs one run per value at a time, and the output
# lock (semdedup_core/run_record.py) holds the folder against any other writer.
OUTPUT_TAG = "semdedup/output"


def output_tag(args: dict) -> dict:
    """The tag of a run with these arguments (Dagster-only ones, like centroids_per_step,
    allowed)."""
    engine_args = {k: v for k, v in args.items() if k in DedupConfig.model_fields}
    return {OUTPUT_TAG: make_config(**engine_args).resolved_output_path}


# With no config, the launchpad and `dagster job execute -j semdedup` run the bundled sample
# into ./semdedup-demo-output (relative to the run's working directory), like `semdedup demo`.


# pool "gpu": the deployment's limit on computing steps running at once (deploy/dagster.yaml).
@op(name="fit_centroids", out=Out(Nothing), pool="gpu", tags=step_k8s_tags(),
    description="Read and validate the whole input, fit K-means on a sample, write "
                "kmeans_centroids.npy and register the `centroids` partitions 0..k-1.")
@reports_user_errors
def fit_centroids_op(context: OpExecutionContext, semdedup: SemdedupResource,
                     layout_storage: LayoutStorage) -> None:
    cfg = semdedup.engine()
    # A .zip input is extracted once per run: assign_shards reuses this step's extraction.
    _, meta = fit_stage(context, cfg, layout_storage, share_input_with_run=context.run_id)
    context.log_event(AssetMaterialization(KMEANS_CENTROIDS, metadata=meta))
    partitions = context.instance.get_dynamic_partitions(CENTROIDS.name)
    context.log_event(check_centroid_partitions(cfg, layout_storage.output(cfg),
                                                partitions).evaluation())


class AssignConfig(Config):
    centroids_per_step: int = PydanticField(
        default=250, ge=1,
        description="Clusters deduplicated per step; steps run in parallel (processes locally, "
                    "pods on Kubernetes).")
    report_partitions: bool | None = PydanticField(
        default=None,
        description="Report every centroid partition of the shards, pruning tables and unique "
                    "ids as materialised (three events per cluster). Default: when that is "
                    "cheap (an instance that batches event writes, or at most 100 clusters); "
                    "each step's figures are in one table event either way.")


@op(name=ASSIGN_OP, ins={"fitted": In(Nothing)}, out=DynamicOut(dict), pool="gpu",
    tags=step_k8s_tags(),
    description="One streaming pass over the input: every clip to its nearest centroid's shard "
                "(embs_by_nearest_center); then the non-empty clusters in batches of "
                "centroids_per_step, one dedup_clusters step each.")
@reports_user_errors
def assign_shards(context: OpExecutionContext, config: AssignConfig, semdedup: SemdedupResource,
                  layout_storage: LayoutStorage):
    cfg = semdedup.engine()
    report = reports_partitions(context.instance, cfg.n_clusters, config.report_partitions)
    sizes, out = assign_stage(context, cfg, layout_storage,
                              share_input_with_run=context.run_id)
    clusters = [int(k) for k in sizes.nonzero()[0]]
    with PartitionReport(context, report) as partitions:
        for k in clusters:
            partitions.add(EMBS_BY_NEAREST_CENTER, k, shard_metadata(out, k, sizes[k]))
    context.log_event(AssetObservation(EMBS_BY_NEAREST_CENTER, metadata={
        "path": where(out, layout.SHARDS), "clusters": len(clusters),
        "rows": int(sizes.sum()), "partitions_reported": len(clusters) if report else 0,
        "cluster_rows": figures_table([{"cluster": k, "rows": int(sizes[k])}
                                       for k in clusters])}))
    # With cross_cluster, the cross tables come before any cluster's removals (their union).
    cross = []
    with PartitionReport(context, report) as partitions:
        for k, meta in cross_stage(context, cfg, out, get_backend(cfg.backend)):
            partitions.add(CROSS_TABLES, k, meta)
            cross.append({"cluster": k, **{n: v for n, v in meta.items() if n != "path"}})
    if cross:
        context.log_event(AssetObservation(CROSS_TABLES, metadata={
            "path": where(out, layout.CROSS_TABLES), "clusters": figures_table(cross)}))
    step = config.centroids_per_step
    for i in range(0, len(clusters), step):
        batch = clusters[i:i + step]
        yield DynamicOutput({"clusters": batch, "report_partitions": report},
                            mapping_key=f"clusters_{batch[0]}_{batch[-1]}")


@op(ins={"work": In(dict)}, out=Out(dict), pool="gpu", tags=step_k8s_tags(),
    description="Rank, pairwise-score and extract a batch of clusters: their pruning tables "
                "and unique_ids parts; their figures in one table event.")
@reports_user_errors
def dedup_clusters(context: OpExecutionContext, work: dict, semdedup: SemdedupResource,
                   layout_storage: LayoutStorage) -> dict:
    cfg = semdedup.engine()
    out = layout_storage.output(cfg)
    clusters = work["clusters"]
    removed_total: dict[str, int] = {}
    figures = []
    with PartitionReport(context, work["report_partitions"]) as partitions:
        for k, result, removed, secs in cluster_dedup_stage(context, cfg, out, clusters,
                                                            get_backend(cfg.backend)):
            if result is None:
                continue
            row = {"cluster": k, "rows": result.size,
                   "max_cosine_sim_score": round(result.max_score, 6),
                   **{f"removed_{eps_text(e)}": int(n) for e, n in removed.items()},
                   "seconds": round(secs, 3)}
            figures.append(row)
            partitions.add(PRUNING_TABLES, k, {
                "path": where(out, layout.pruning_table(k)), "rows": result.size,
                "max_cosine_sim_score": row["max_cosine_sim_score"]})
            partitions.add(UNIQUE_IDS, k, removed_metadata(cfg, out, k, removed, result))
            for eps, n in removed.items():
                removed_total[eps_text(eps)] = removed_total.get(eps_text(eps), 0) + n
    context.log_event(AssetObservation(
        PRUNING_TABLES, description=f"clusters {clusters[0]}..{clusters[-1]} of this run",
        metadata={"clusters": figures_table(figures),
                  **{f"removed_{e}": n for e, n in removed_total.items()}}))
    return {"clusters": clusters, "removed": removed_total}


@op(ins={"done": In(list)},
    description="Write dedup_summary_<eps>.csv per eps and the summary's metadata (eps curve, "
                "cluster sizes, example pairs); check the output's counts.")
@reports_user_errors
def summarize_run(context: OpExecutionContext, done: list, semdedup: SemdedupResource,
                  layout_storage: LayoutStorage) -> None:
    cfg = semdedup.engine()
    meta = summary_stage(context, cfg, layout_storage)
    context.log_event(AssetMaterialization(DEDUP_SUMMARY, metadata=meta))
    for outcome in summary_outcomes(cfg, layout_storage.output(cfg)):
        context.log_event(outcome.evaluation())
    context.log.info("summary: " + ", ".join(
        f"eps {eps_text(e)}: removed {meta[f'removed_{eps_text(e)}']:,} of {meta['total']:,}"
        for e in cfg.eps_to_extract))


@job(name="semdedup", config=run_config_for(DEMO_ARGS), executor_def=job_executor(),
     tags=run_k8s_tags(),
     description="Semantic dedup end to end: centroids, shards, per-centroid pruning (parallel "
                 "steps), unique ids per eps, summaries.")
def semdedup_job():
    results = assign_shards(fit_centroids_op()).map(dedup_clusters)
    summarize_run(results.collect())


class SweepConfig(Config):
    """New eps over an existing output: unique ids and summaries only."""

    output_path: str = PydanticField(description="A finished semdedup output, local or s3://.")
    eps_to_extract: list[float] = PydanticField(
        description=DedupConfig.model_fields["eps_to_extract"].description)


@op(name="sweep_eps", description="New unique_ids_<eps> and summaries from an output's pruning "
                                  "tables.")
@reports_user_errors
def sweep_eps_op(context: OpExecutionContext, config: SweepConfig,
                 layout_storage: LayoutStorage) -> None:
    eps = checked_eps(config.eps_to_extract)
    out = layout_storage.location(config.output_path)
    rows = sweep(out, eps, owner=context.run_id, wait=True)
    context.log_event(AssetMaterialization(
        UNIQUE_IDS, description=f"sweep of eps {', '.join(map(eps_text, eps))}",
        metadata={f"removed_{eps_text(e)}": r["removed"] for e, r in rows.items()}))
    context.log.info("; ".join(f"eps {eps_text(e)}: removed {r['removed']} of {r['total']}"
                               for e, r in rows.items()))


@job(name="semdedup_sweep", description="Write unique_ids_{eps} and summaries for new eps from an "
                                         "output's pruning tables, recomputing nothing else.")
def semdedup_sweep_job():
    sweep_eps_op()


semdedup_centroid_job = define_asset_job(
    name="semdedup_centroid", selection=[PRUNING_TABLES, UNIQUE_IDS],
    description="Re-materialise the pruning table and unique ids of chosen centroid partitions.")

JOBS = [semdedup_job, semdedup_centroid_job, semdedup_sweep_job]
