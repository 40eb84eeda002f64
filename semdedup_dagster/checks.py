"""Asset checks: what every materialisation of the centroids and of the summary must satisfy,
read back from the output layout (parquet footers, the CSVs, the registered partitions).

The assets declare the specs and yield the results in their own step; the `semdedup` job's ops
log the same evaluations, so the checks show on every run, whichever door it came through.
"""

from dataclasses import dataclass, field

import numpy as np
from dagster import AssetCheckEvaluation, AssetCheckResult, AssetCheckSpec, AssetKey

from semdedup_core import layout
from semdedup_core.config import DedupConfig, eps_text
from semdedup_core.errors import InputError
from semdedup_core.extraction import pruned_clusters
from semdedup_core.inspection import summaries
from semdedup_core.shards import load_centroids, shard_files_by_cluster
from semdedup_core.parquet import row_count
from semdedup_core.pipeline import nonempty_clusters
from semdedup_core.storage import Storage
from semdedup_core.threads import LATENCY_BOUND_THREADS, ordered_map

KMEANS_CENTROIDS = "kmeans_centroids"
DEDUP_SUMMARY = "dedup_summary"

PARTITIONS_CHECK = "partitions_match_n_clusters"
TABLES_CHECK = "one_pruning_table_per_shard"
TOTALS_CHECK = "kept_plus_removed_is_total"

CENTROID_CHECKS = [AssetCheckSpec(
    PARTITIONS_CHECK, asset=KMEANS_CENTROIDS,
    description="The centroids file has n_clusters rows and the `centroids` partitions are "
                "exactly 0..n_clusters-1.")]
SUMMARY_CHECKS = [
    AssetCheckSpec(TABLES_CHECK, asset=DEDUP_SUMMARY,
                   description="Every non-empty shard has a pruning table with as many rows, "
                               "and no pruning table lacks a shard."),
    AssetCheckSpec(TOTALS_CHECK, asset=DEDUP_SUMMARY,
                   description="Per eps: kept + removed = total, total = the clips of the pruning "
                               "tables, removed = the rows of unique_ids_<eps>."),
]


@dataclass
class Outcome:
    asset: str
    name: str
    passed: bool
    description: str
    metadata: dict = field(default_factory=dict)

    def result(self) -> AssetCheckResult:
        """As yielded by an asset that declares the check."""
        return AssetCheckResult(asset_key=self.asset, check_name=self.name, passed=self.passed,
                                description=self.description, metadata=self.metadata)

    def evaluation(self) -> AssetCheckEvaluation:
        """As logged by an op of the `semdedup` job."""
        return AssetCheckEvaluation(asset_key=AssetKey(self.asset), check_name=self.name,
                                    passed=self.passed, description=self.description,
                                    metadata=self.metadata)


def _rows(out: Storage, rels: list[str]) -> list[int]:
    """Row counts from parquet footers, on I/O threads (on S3 each is a round trip)."""
    return list(ordered_map(lambda rel: row_count(out, rel), rels, LATENCY_BOUND_THREADS))


def _listed(clusters, limit: int = 20) -> str:
    clusters = sorted(clusters)
    more = f" and {len(clusters) - limit} more" if len(clusters) > limit else ""
    return ", ".join(map(str, clusters[:limit])) + more


def check_centroid_partitions(cfg: DedupConfig, out: Storage, partitions: list[str]) -> Outcome:
    rows = int(load_centroids(out).shape[0])
    expected = [str(k) for k in range(cfg.n_clusters)]
    passed = rows == cfg.n_clusters and sorted(partitions, key=int) == expected
    return Outcome(KMEANS_CENTROIDS, PARTITIONS_CHECK, passed,
                   f"{rows} centroids, {len(partitions)} partitions, n_clusters {cfg.n_clusters}",
                   {"centroids": rows, "partitions": len(partitions),
                    "n_clusters": cfg.n_clusters})


def missing_pruning_tables(out: Storage, clusters: list[int]) -> list[int]:
    """Clusters (with a shard) whose pruning table is not on storage."""
    return sorted(set(clusters) - set(pruned_clusters(out)))


def require_complete(out: Storage, clusters: list[int], eps_list: list[float]) -> None:
    """Refuse to summarise a partial output: a summary of some clusters would read as a whole."""
    if not clusters:
        raise InputError(f"{out.display(layout.SHARDS)}: no shards; materialise "
                         "embs_by_nearest_center (or run the semdedup job) first")
    missing = missing_pruning_tables(out, clusters)
    if missing:
        raise InputError(
            f"{out.display(layout.PRUNING_TABLES)}: no pruning table for {len(missing)} of the "
            f"{len(clusters)} clusters with shards (clusters {_listed(missing)}); materialise "
            "semdedup_pruning_tables for those partitions first")
    for eps in eps_list:
        parts = set(out.list_files(layout.unique_ids_dir(eps)))
        missing = [c for c in clusters if layout.unique_ids_part(eps, c) not in parts]
        if missing:
            raise InputError(
                f"{out.display(layout.unique_ids_dir(eps))}: no part for {len(missing)} of the "
                f"{len(clusters)} clusters (clusters {_listed(missing)}); materialise unique_ids "
                "for those partitions first")


def check_tables_per_shard(out: Storage) -> Outcome:
    shards = nonempty_clusters(out)
    tables = pruned_clusters(out)
    missing, orphans = sorted(set(shards) - set(tables)), sorted(set(tables) - set(shards))
    both = sorted(set(shards) & set(tables))
    files = shard_files_by_cluster(out)  # a shard may be several files
    listed = [f for c in both for f in files.get(c, [])]
    rows_of = dict(zip(listed, _rows(out, listed)))
    shard_rows = [sum(rows_of[f] for f in files.get(c, [])) for c in both]
    table_rows = _rows(out, [layout.pruning_table(c) for c in both])
    unequal = [c for c, a, b in zip(both, shard_rows, table_rows) if a != b]
    problems = []
    if missing:
        problems.append(f"no pruning table for clusters {_listed(missing)}")
    if orphans:
        problems.append(f"pruning tables without a shard: clusters {_listed(orphans)}")
    if unequal:
        problems.append(f"row counts differ from the shard in clusters {_listed(unequal)}")
    return Outcome(DEDUP_SUMMARY, TABLES_CHECK, not problems,
                   "; ".join(problems) or f"{len(both)} shards, {len(both)} pruning tables, "
                                          f"{sum(table_rows):,} rows in each",
                   {"shards": len(shards), "pruning_tables": len(tables),
                    "rows": int(sum(table_rows))})


def check_totals(cfg: DedupConfig, out: Storage) -> Outcome:
    tables = pruned_clusters(out)
    total = int(sum(_rows(out, [layout.pruning_table(c) for c in tables])))
    rows = {r["eps"]: r for r in summaries(out)}
    problems = []
    for eps in cfg.eps_to_extract:
        row = rows.get(eps)
        if row is None:
            problems.append(f"no {layout.summary_csv(eps)}")
            continue
        removed = int(np.sum(_rows(out, out.list_files(layout.unique_ids_dir(eps)))))
        if row["kept"] + row["removed"] != row["total"]:
            problems.append(f"eps {eps_text(eps)}: kept {row['kept']} + removed "
                            f"{row['removed']} != total {row['total']}")
        if row["total"] != total:
            problems.append(f"eps {eps_text(eps)}: total {row['total']} != {total} clips in "
                            "the pruning tables")
        if row["removed"] != removed:
            problems.append(f"eps {eps_text(eps)}: removed {row['removed']} != {removed} rows "
                            f"of unique_ids_{eps_text(eps)}")
    return Outcome(DEDUP_SUMMARY, TOTALS_CHECK, not problems,
                   "; ".join(problems) or f"{len(cfg.eps_to_extract)} eps, {total:,} clips",
                   {"total": total})


def summary_outcomes(cfg: DedupConfig, out: Storage) -> list[Outcome]:
    return [check_tables_per_shard(out), check_totals(cfg, out)]
