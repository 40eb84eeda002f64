"""The layout-aware IO manager: lets downstream assets take the semdedup assets as inputs.

The semdedup assets write the SPEC layout themselves (through `LayoutStorage`) and return only
metadata, so there is nothing to store on output. On input, the artifact of the latest
materialisation of the asset (and partition) is read back from the path its metadata recorded:
`kmeans_centroids` -> float32 ndarray (k, d); `embs_by_nearest_center`,
`semdedup_pruning_tables` -> pyarrow Table; `unique_ids` -> {eps text: pyarrow Table} of the
clips to remove; `dedup_summary` -> {eps text: {"kept", "removed", "total"}}. Several
partitions come as a dict keyed by partition.
"""

import io
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dagster import (
    AssetRecordsFilter,
    ConfigurableIOManager,
    DagsterInvariantViolationError,
    Failure,
    InputContext,
    OutputContext,
    ResourceDependency,
)

from semdedup_core import layout, run_record
from semdedup_core.inspection import summaries
from semdedup_dagster.resources import LayoutStorage


class LayoutIOManager(ConfigurableIOManager):
    layout_storage: ResourceDependency[LayoutStorage]

    def handle_output(self, context: OutputContext, obj) -> None:
        if obj is not None:
            raise DagsterInvariantViolationError(
                f"{context.asset_key.to_user_string()}: semdedup assets write the output layout "
                "themselves and return MaterializeResult; nothing else is stored")

    def load_input(self, context: InputContext):
        if not context.has_asset_partitions:
            return self._load(context, None)
        loaded = {k: self._load(context, k) for k in context.asset_partition_keys}
        return loaded if len(loaded) > 1 else next(iter(loaded.values()))

    def _load(self, context: InputContext, partition: str | None):
        key = context.asset_key
        flt = AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None)
        records = context.instance.fetch_materializations(flt, limit=1).records
        if not records:
            raise DagsterInvariantViolationError(
                f"{key.to_user_string()}{f'[{partition}]' if partition else ''} has not been "
                "materialised yet")
        meta = records[0].asset_materialization.metadata
        name = key.to_user_string()
        any_path = next((v.value for k, v in sorted(meta.items()) if k.startswith("path")), None)
        if any_path is not None:  # a half-written folder must not feed downstream assets
            reason = run_record.incomplete_reason(
                self.layout_storage.location(layout.output_root_of(any_path)))
            if reason is not None:
                raise Failure(description=reason)
        if name == "unique_ids":
            return {k[len("path_"):]: self._table(meta[k].value)
                    for k in sorted(meta) if k.startswith("path_")}
        path = meta["path"].value
        if name == "kmeans_centroids":
            return np.load(io.BytesIO(self._file(path)))
        if name == "embs_by_nearest_center":
            if partition is not None and not posixpath.basename(path).startswith("nearest_cent="):
                path = posixpath.join(path, f"nearest_cent={partition}")  # a range's shared path
            folder = self.layout_storage.location(path)
            return pa.concat_tables(pq.read_table(folder.open_input(rel))
                                    for rel in folder.list_files())
        if name == "dedup_summary":
            # path: <output>/extraction/dedup_summary_<eps>.csv
            out = self.layout_storage.location(posixpath.dirname(posixpath.dirname(path)))
            return {repr(r["eps"]): {k: r[k] for k in ("kept", "removed", "total")}
                    for r in summaries(out)}
        return self._table(path)

    def _file(self, uri: str) -> bytes:
        parent, name = posixpath.split(uri)
        return self.layout_storage.location(parent).read_bytes(name)

    def _table(self, uri: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self._file(uri)))
