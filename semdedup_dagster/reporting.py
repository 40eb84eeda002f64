"""What the `semdedup` job tells Dagster's event log about the centroid partitions it writes, at
a cost that stays small next to the run.

Every partition shown as materialised in the UI is one ASSET_MATERIALIZATION row of the event log
(Dagster has no range materialisation), and one row is expensive where each is its own write:
on the default SQLite instance a write opens the run's and the index's database and commits to
both (README, Performance: the measured cost). On Postgres, with DAGSTER_EVENT_BATCH_SIZE set (as
deploy/ sets it), Dagster writes a batch of materialisations of one asset in one statement.

So the job reports every partition where that is cheap: when the instance batches writes, or the
run has few clusters (UNBATCHED_MAX_CLUSTERS). Otherwise it reports none, and each step's
figures go into one table event instead. Partition status stays true either way: a partition is
only ever reported after its file has been written whole.
"""

import os

from dagster import (
    AssetMaterialization,
    DagsterInstance,
    MetadataValue,
    OpExecutionContext,
    TableColumn,
    TableRecord,
    TableSchema,
)
# Private, pinned with dagster==1.13.27: `context.log_event` has no way to mark a batch, and the
# batch is what makes a thousand partitions one write on Postgres.
from dagster._core.events import DagsterEvent, DagsterEventBatchMetadata, generate_event_batch_id
from dagster._core.storage.event_log.base import EventLogStorage

# Runs with at most this many clusters report every partition on any instance (3 events per
# cluster: on SQLite about 10-50 ms each, i.e. seconds at this size).
UNBATCHED_MAX_CLUSTERS = 100
# A step reports what it has written at least this often, so a step that fails later still
# shows the partitions it finished.
FLUSH_EVERY = 250


def batches_event_writes(instance: DagsterInstance) -> bool:
    """Whether the instance writes batches of asset events in one go (Postgres, MySQL) and
    batching is on (DAGSTER_EVENT_BATCH_SIZE > 0)."""
    size = os.environ.get("DAGSTER_EVENT_BATCH_SIZE", "0").strip() or "0"
    storage = type(instance.event_log_storage)
    return int(size) > 0 and storage.store_event_batch is not EventLogStorage.store_event_batch


def reports_partitions(instance: DagsterInstance, n_clusters: int, asked: bool | None) -> bool:
    """Whether the job's steps report each centroid partition (`asked`: the run's choice, None
    for: where it is cheap)."""
    if asked is not None:
        return asked
    return n_clusters <= UNBATCHED_MAX_CLUSTERS or batches_event_writes(instance)


class PartitionReport:
    """Partition materialisations of one step, logged in batches per asset (Dagster's batched
    path: one write per batch where the instance batches, one per event elsewhere); a no-op when
    not `enabled`. Use as a context manager: what is pending is logged on the way out, also when
    the step fails (the files reported are written whole)."""

    def __init__(self, context: OpExecutionContext, enabled: bool):
        self.context = context
        self.enabled = enabled
        self.pending: dict[str, list[AssetMaterialization]] = {}

    def __enter__(self) -> "PartitionReport":
        return self

    def add(self, asset: str, cluster: int, metadata: dict) -> None:
        if not self.enabled:
            return
        pending = self.pending.setdefault(asset, [])
        pending.append(AssetMaterialization(asset, partition=str(cluster), metadata=metadata))
        if len(pending) >= FLUSH_EVERY:
            self.flush(asset)

    def flush(self, asset: str) -> None:
        mats = self.pending.pop(asset, [])
        batch = generate_event_batch_id()
        step = self.context._step_execution_context  # noqa: SLF001 (see the import above)
        for i, mat in enumerate(mats):
            # Logged on creation, like context.log_event; kept as a step event like it too.
            event = DagsterEvent.asset_materialization(
                step, mat, DagsterEventBatchMetadata(batch, i == len(mats) - 1))
            self.context._events.append(event)  # noqa: SLF001

    def __exit__(self, *exc) -> None:
        for asset in list(self.pending):
            self.flush(asset)


def figures_table(rows: list[dict]) -> MetadataValue:
    """Per-cluster figures (dicts with the same keys, in column order) as one table value."""
    if not rows:
        return MetadataValue.table(records=[], schema=TableSchema(columns=[]))
    kinds = {int: "int", float: "float", str: "string", bool: "bool"}
    columns = [TableColumn(name, kinds.get(type(value), "string"))
               for name, value in rows[0].items()]
    return MetadataValue.table(records=[TableRecord(r) for r in rows],
                               schema=TableSchema(columns=columns))
