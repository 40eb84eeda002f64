"""Every artifact path of the output layout (SPEC.md), relative to `output_path`, and the column
names of its tables, in one place."""

import re

from semdedup_core.config import eps_text

CLUSTERING = "clustering_results"
CENTROIDS = f"{CLUSTERING}/kmeans_centroids.npy"
SHARDS = f"{CLUSTERING}/embs_by_nearest_center"
EXTRACTION = "extraction"
PRUNING_TABLES = f"{EXTRACTION}/semdedup_pruning_tables"

# Columns. Shards: ID, EMBEDDING, L2_DIST, COSINE_DIST. Pruning tables: ID, MAX_ID, SCORE.
# unique_ids parts: ID, COSINE_DIST, CLUSTER. Summaries: SUMMARY_COLUMNS.
ID = "id"
EMBEDDING = "embedding"
L2_DIST = "l2_dist_to_cent"
COSINE_DIST = "cosine_dist_to_cent"
MAX_ID = "max_id"
SCORE = "cosine_sim_score"
CLUSTER = "cluster"
SUMMARY_COLUMNS = ("eps", "kept", "removed", "total")


def shard_dir(cluster: int) -> str:
    return f"{SHARDS}/nearest_cent={cluster}"


def shard_file(cluster: int, sha: str) -> str:
    return f"{shard_dir(cluster)}/{sha}.parquet"


def pruning_table(cluster: int) -> str:
    return f"{PRUNING_TABLES}/cluster_{cluster}.parquet"


def unique_ids_dir(eps: float) -> str:
    return f"{EXTRACTION}/unique_ids_{eps_text(eps)}.parquet"


def unique_ids_part(eps: float, cluster: int) -> str:
    return f"{unique_ids_dir(eps)}/part.{cluster}.parquet"


def summary_csv(eps: float) -> str:
    return f"{EXTRACTION}/dedup_summary_{eps_text(eps)}.csv"


_SHARD_DIR_RE = re.compile(r"^nearest_cent=(\d+)$")
_PRUNING_RE = re.compile(r"^cluster_(\d+)\.parquet$")
_PART_RE = re.compile(r"^part\.(\d+)\.parquet$")


def cluster_of_shard_dir(name: str) -> int | None:
    m = _SHARD_DIR_RE.match(name)
    return int(m.group(1)) if m else None


def cluster_of_pruning_table(name: str) -> int | None:
    m = _PRUNING_RE.match(name)
    return int(m.group(1)) if m else None


def cluster_of_part(name: str) -> int | None:
    m = _PART_RE.match(name)
    return int(m.group(1)) if m else None
