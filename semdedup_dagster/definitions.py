"""The one `Definitions` object (loaded by workspace.yaml, `dagster job execute -m ...`,
`dagster definitions validate` and `dg check defs`)."""

import os

from dagster import Definitions, in_process_executor

from semdedup_dagster.assets import ASSETS, IO_MANAGER
from semdedup_dagster.config import RESOURCE_KEY, SemdedupResource
from semdedup_dagster.corpus import corpora_definitions, corpus_specs_from_env
from semdedup_dagster.io_manager import LayoutIOManager
from semdedup_dagster.jobs import JOBS
from semdedup_dagster.resources import (
    OP_OUTPUT_PATH_ENV,
    layout_storage_from_env,
    op_output_io_manager,
)
from semdedup_dagster.schedules import semdedup_schedule
from semdedup_dagster.sensors import drop_watch_from_env, embedding_drop_sensor

LAYOUT_STORAGE = layout_storage_from_env()
OP_OUTPUTS = op_output_io_manager(LAYOUT_STORAGE)
if OP_OUTPUTS is None and os.environ.get("SEMDEDUP_EXECUTOR") == "k8s":
    # Each step is its own pod there, with its own disk: the default IO manager would lose them.
    raise ValueError(f"SEMDEDUP_EXECUTOR=k8s runs every step in its own pod: set "
                     f"{OP_OUTPUT_PATH_ENV}=s3://bucket/prefix for the outputs they pass on")

# A corpus per watched folder (SEMDEDUP_CORPORA, see semdedup_dagster/corpus.py).
CORPORA = corpora_definitions(corpus_specs_from_env(os.environ))

defs = Definitions(
    assets=ASSETS + CORPORA["assets"],
    jobs=JOBS + CORPORA["jobs"],
    sensors=[embedding_drop_sensor, *CORPORA["sensors"]],
    schedules=[semdedup_schedule],
    # Asset runs are a chain (centroids -> shards -> pruning -> summary; a range of partitions
    # is one step), so separate step processes would add start-up time and no parallelism. The
    # `semdedup` job, which fans clusters out, keeps its own (multiprocess or k8s) executor.
    executor=in_process_executor,
    # The run's arguments: given once per run under `resources: semdedup: config:`.
    resources={RESOURCE_KEY: SemdedupResource.configure_at_launch(),
               "layout_storage": LAYOUT_STORAGE,
               IO_MANAGER: LayoutIOManager(layout_storage=LAYOUT_STORAGE),
               "drop_watch": drop_watch_from_env(os.environ),
               **({"io_manager": OP_OUTPUTS} if OP_OUTPUTS else {})},
)
