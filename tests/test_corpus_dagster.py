"""The corpus on Dagster: the sensor turns each new drop into one run of `corpus_<name>_add`,
drop partitions follow the commits, centroid partitions are fixed at the fit, and on a real
instance with its daemon two drops are added in order, one run at a time."""

import json
import os
import subprocess
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, DagsterRunStatus, Definitions, RunsFilter, build_sensor_context

from semdedup_core.corpus import read_manifest
from semdedup_core.storage import Storage
from semdedup_dagster.corpus import (
    CorpusSpec,
    corpus_definitions,
    corpus_specs_from_env,
    drop_name,
)
from semdedup_dagster.resources import LayoutStorage
from tests.conftest import BIN, REPO

DATA = "/work/shared/data/pypi_minilm_embd_parquet"


def write_drops(watch, rows_per_drop=400, days=("2026-11-29", "2026-11-30")):
    """Drops of real embeddings as a curation pipeline delivers them: <day>/iv2_embd_parquet/."""
    table = pq.read_table(os.path.join(DATA, "part-00002.parquet"))
    rows = np.random.default_rng(11).permutation(table.num_rows)
    for i, day in enumerate(days):
        folder = watch / day / "iv2_embd_parquet"
        folder.mkdir(parents=True)
        part = np.sort(rows[i * rows_per_drop:(i + 1) * rows_per_drop])
        pq.write_table(table.take(pa.array(part)), folder / "part-0.parquet")


def test_specs_and_names():
    env = {"SEMDEDUP_CORPORA": json.dumps([{"name": "clips", "watch_path": "s3://b/in",
                                            "corpus_path": "s3://b/corpus", "n_clusters": 8,
                                            "eps_to_extract": [0.01, 0.05]}])}
    [spec] = corpus_specs_from_env(env)
    assert spec.corpus_path == "s3://b/corpus" and spec.eps_to_extract == (0.01, 0.05)
    assert corpus_specs_from_env({}) == []
    with pytest.raises(ValueError, match="SEMDEDUP_CORPORA"):
        corpus_specs_from_env({"SEMDEDUP_CORPORA": "{not json"})
    with pytest.raises(ValueError, match="corpus name 'a b'"):
        CorpusSpec("a b", "x", "y")
    assert drop_name("2026-11-30/iv2_embd_parquet") == "2026-11-30.iv2_embd_parquet"
    assert drop_name("batch 7/clips.zip") == "batch-7.clips"


def test_sensor_runs_add_drops_in_order_with_partitions(tmp_path):
    watch, corpus = tmp_path / "incoming", tmp_path / "incoming" / "corpus"
    write_drops(watch)
    spec = CorpusSpec("clips", str(watch), str(corpus), n_clusters=6, eps_to_extract=(0.01, 0.05),
                      settle_seconds=0)
    parts = corpus_definitions(spec)
    defs = Definitions(assets=parts["assets"], jobs=parts["jobs"], sensors=parts["sensors"],
                       resources={"layout_storage": LayoutStorage()})
    instance = DagsterInstance.ephemeral()
    sensor = defs.resolve_sensor_def("corpus_clips_sensor")
    with build_sensor_context(instance=instance, resources={"layout_storage": LayoutStorage()},
                              definitions=defs) as ctx:
        result = sensor(ctx)
        cursor = ctx.cursor
    names = ["2026-11-29.iv2_embd_parquet", "2026-11-30.iv2_embd_parquet"]
    assert [r.partition_key for r in result.run_requests] == names
    assert [r.tags["semdedup/corpus"] for r in result.run_requests] == [str(corpus)] * 2
    assert result.dynamic_partitions_requests[0].partition_keys == names
    instance.add_dynamic_partitions("corpus_clips_drops", names)
    job = defs.resolve_job_def("corpus_clips_add")
    for request in result.run_requests:
        run = job.execute_in_process(instance=instance, partition_key=request.partition_key,
                                     run_config=request.run_config, tags=request.tags)
        assert run.success
    manifest = read_manifest(Storage(str(corpus)))
    assert [d["name"] for d in manifest["drops"]] == names
    assert manifest["drops"][1]["input"] == str(watch / "2026-11-30" / "iv2_embd_parquet")
    # Partitions tell the truth: both drops materialised, six centroids registered at the fit.
    status = instance.get_materialized_partitions
    from dagster import AssetKey

    assert status(AssetKey(["corpus", "clips", "drops"])) == set(names)
    assert instance.get_dynamic_partitions("corpus_clips_centroids") == [str(k) for k in range(6)]
    assert status(AssetKey(["corpus", "clips", "centroids"])) == {str(k) for k in range(6)}
    event = instance.get_latest_materialization_event(AssetKey(["corpus", "clips", "drops"]))
    meta = event.asset_materialization.metadata
    second = manifest["drops"][1]["eps"]["0.05"]
    assert meta["clips"].value == 400 and meta["drop"].value == 2
    assert meta["removed_inside_0.05"].value == second["inside"]
    assert meta["removed_earlier_0.05"].value == second["earlier"]
    assert "data:image/png;base64," in meta["removed_vs_eps_plot"].value
    growth = instance.get_latest_materialization_event(AssetKey(["corpus", "clips", "growth"]))
    assert growth.asset_materialization.metadata["clips"].value == 800
    # The corpus folder inside the watched folder is not taken for drops; nothing new.
    with build_sensor_context(instance=instance, cursor=cursor,
                              resources={"layout_storage": LayoutStorage()},
                              definitions=defs) as ctx:
        assert not getattr(sensor(ctx), "run_requests", None)
    # Re-running a committed drop fails in one line and changes nothing.
    again = job.execute_in_process(instance=instance, partition_key=names[0],
                                   run_config=result.run_requests[0].run_config,
                                   raise_on_error=False)
    assert not again.success
    failure = again.get_step_failure_events()[0].step_failure_data.error
    assert f"drop '{names[0]}' is already committed" in failure.message
    assert read_manifest(Storage(str(corpus))) == manifest


@pytest.mark.slow
def test_daemon_adds_two_drops_in_order_one_at_a_time(tmp_path):
    """A real instance and its daemon (queued runs limited per corpus tag as in
    deploy/dagster.yaml): the sensor (configured running) starts one run per drop, the queue
    runs them one after the other, and the corpus lists the drops in order."""
    home, watch, corpus = tmp_path / "home", tmp_path / "incoming", tmp_path / "corpus"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "concurrency:\n  runs:\n    tag_concurrency_limits:\n      - key: semdedup/corpus\n"
        "        value:\n          applyLimitPerUniqueValue: true\n        limit: 1\n"
        "telemetry:\n  enabled: false\n")
    write_drops(watch)
    env = {**os.environ, "DAGSTER_HOME": str(home), "SEMDEDUP_SENSOR_INTERVAL_SECONDS": "1",
           "SEMDEDUP_CORPORA": json.dumps([{"name": "clips", "watch_path": str(watch),
                                            "corpus_path": str(corpus), "n_clusters": 6,
                                            "settle_seconds": 0, "sensor_running": True}])}
    with open(home / "daemon.log", "wb") as log:
        daemon = subprocess.Popen([os.path.join(BIN, "dagster-daemon"), "run", "-w",
                                   os.path.join(REPO, "workspace.yaml")], env=env, cwd=home,
                                  stdout=log, stderr=log)
        try:
            with DagsterInstance.from_config(str(home)) as instance:
                deadline, runs = time.time() + 300, []
                while time.time() < deadline:
                    runs = instance.get_runs(RunsFilter(job_name="corpus_clips_add"))
                    if len(runs) == 2 and all(r.is_finished for r in runs):
                        break
                    time.sleep(1)
                assert [r.status for r in runs] == [DagsterRunStatus.SUCCESS] * 2, \
                    (home / "daemon.log").read_text()[-3000:]
                first, second = sorted((instance.get_run_record_by_id(r.run_id) for r in runs),
                                       key=lambda r: r.start_time)
                assert second.start_time >= first.end_time  # the queue held the second run
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
    assert [d["name"] for d in read_manifest(Storage(str(corpus)))["drops"]] == [
        "2026-11-29.iv2_embd_parquet", "2026-11-30.iv2_embd_parquet"]
