"""The one `Definitions` object (loaded by workspace.yaml, `dagster job execute -m ...`,
`dagster definitions validate` and `dg check defs`)."""

import os

from dagster import Definitions

from semdedup_dagster.assets import ASSETS
from semdedup_dagster.assets import IO_MANAGER
from semdedup_dagster.io_manager import LayoutIOManager
from semdedup_dagster.jobs import JOBS
from semdedup_dagster.resources import layout_storage_from_env
from semdedup_dagster.schedules import semdedup_schedule
from semdedup_dagster.sensors import drop_watch_from_env, embedding_drop_sensor

LAYOUT_STORAGE = layout_storage_from_env()

defs = Definitions(
    assets=ASSETS,
    jobs=JOBS,
    sensors=[embedding_drop_sensor],
    schedules=[semdedup_schedule],
    resources={"layout_storage": LAYOUT_STORAGE,
               IO_MANAGER: LayoutIOManager(layout_storage=LAYOUT_STORAGE),
               "drop_watch": drop_watch_from_env(os.environ)},
)
