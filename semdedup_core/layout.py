"""Every artifact path of the output layout (SPEC.md), relative to `output_path`, and the column
names of its tables, in one place."""

import re

from semdedup_core.config import eps_text

CLUSTERING = "clustering_results"
CENTROIDS = f"{CLUSTERING}/kmeans_centroids.npy"
SHARDS = f"{CLUSTERING}/embs_by_nearest_center"
EXTRACTION = "extraction"
PRUNING_TABLES = f"{EXTRACTION}/semdedup_pruning_tables"
CROSS_TABLES = f"{EXTRACTION}/semdedup_cross_cluster_tables"  # only with cross_cluster
AUDIT = f"{EXTRACTION}/audit.json"  # the kept-pairs audit of the last run or sweep

# Beside the layout (names starting with `_`, which dataset readers skip): semdedup_core/run_record.py
RUN_LOCK = "_semdedup.lock"  # who is writing the folder now
RUN_RECORD = "_semdedup_run.json"  # written last: the folder holds one finished run


def output_root_of(uri: str) -> str:
    """The output folder holding an artifact path (a local path or an s3:// URI)."""
    for top in (f"/{CLUSTERING}/", f"/{EXTRACTION}/"):
        if top in uri + "/":
            return (uri + "/").rsplit(top, 1)[0]
    return uri

# Columns. Shards: ID, EMBEDDING, L2_DIST, COSINE_DIST. Pruning tables: ID, MAX_ID, SCORE.
# Cross-cluster tables: ID, MAX_ID, MAX_CLUSTER, SCORE. unique_ids parts: ID, COSINE_DIST,
# CLUSTER. Summaries: SUMMARY_COLUMNS.
ID = "id"
EMBEDDING = "embedding"
L2_DIST = "l2_dist_to_cent"
COSINE_DIST = "cosine_dist_to_cent"
MAX_ID = "max_id"
SCORE = "cosine_sim_score"
CLUSTER = "cluster"
MAX_CLUSTER = "max_cluster"
SUMMARY_COLUMNS = ("eps", "kept", "removed", "total")


def shard_dir(cluster: int) -> str:
    return f"{SHARDS}/nearest_cent={cluster}"


def shard_file(cluster: int, sha: str) -> str:
    return f"{shard_dir(cluster)}/{sha}.parquet"


def is_shard_file(rel: str) -> bool:
    """A whole shard file: a folder holds several (`<sha>.parquet` each), and may hold the
    hidden `.<name>.<uuid>.tmp` of a write that was cut short, which is never read."""
    name = rel.rsplit("/", 1)[-1]
    return name.endswith(".parquet") and not name.startswith(".")


def pruning_table(cluster: int) -> str:
    return f"{PRUNING_TABLES}/cluster_{cluster}.parquet"


def cross_table(cluster: int) -> str:
    return f"{CROSS_TABLES}/cluster_{cluster}.parquet"


def unique_ids_dir(eps: float) -> str:
    return f"{EXTRACTION}/unique_ids_{eps_text(eps)}.parquet"


def unique_ids_part(eps: float, cluster: int) -> str:
    return f"{unique_ids_dir(eps)}/part.{cluster}.parquet"


def summary_csv(eps: float) -> str:
    return f"{EXTRACTION}/dedup_summary_{eps_text(eps)}.csv"


# A corpus of drops (semdedup_core.corpus): the centroids at its root (CENTROIDS), one complete
# layout as above per committed drop under DROPS/<name>/, the store of every committed clip by
# cluster, and the manifest (written last: the commit), `_`-prefixed so readers skip it.
CORPUS_MANIFEST = "_corpus.json"
CORPUS_PENDING = "_corpus_pending.json"  # the add in progress, for clean-up after a crash
DROPS = "drops"
STORE = "store"
# In a drop's layout: for every row of its pruning tables (cluster by cluster, rank order), the
# drop of its max_id's clip. One file per drop, not per cluster: an add writes few files.
MAX_DROP_TABLE = f"{EXTRACTION}/_corpus_max_drop.parquet"
MAX_DROP = "max_drop"
CROSS_MAX_DROP = "cross_max_drop"  # with cross_cluster: the drop of the cross table's max_id


def drop_dir(name: str) -> str:
    return f"{DROPS}/{name}"


def store_segment(first: int, last: int, token: str) -> str:
    """The committed clips of drops first..last (positions in the manifest), grouped by cluster;
    `token` is the add (of drop `last`) that wrote it (semdedup_core/corpus_store.py)."""
    return f"{STORE}/{first:08d}-{last:08d}-{token}.seg"


_STORE_SEGMENT_RE = re.compile(r"^(\d{8})-(\d{8})-([0-9a-f]+)\.seg$")


def parse_store_segment(name: str) -> tuple[int, int, str] | None:
    m = _STORE_SEGMENT_RE.match(name)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


_SHARD_DIR_RE = re.compile(r"^nearest_cent=(\d+)$")
_PRUNING_RE = re.compile(r"^cluster_(\d+)\.parquet$")


def cluster_of_shard_dir(name: str) -> int | None:
    m = _SHARD_DIR_RE.match(name)
    return int(m.group(1)) if m else None


def cluster_of_pruning_table(name: str) -> int | None:
    m = _PRUNING_RE.match(name)
    return int(m.group(1)) if m else None
