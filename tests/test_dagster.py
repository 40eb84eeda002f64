"""The Dagster layer on real Dagster: the whole Definitions, in-process materialisation on an
ephemeral instance (`dagster job execute` against `semdedup run`: tests/test_job_specs.py), re-running one
centroid partition, the drop sensor against a real S3 API server, and a live webserver."""

import json
import logging
import os
import subprocess
import sys
import time
import warnings

import pytest
import yaml
import pyarrow.parquet as pq
from dagster import (
    AssetKey,
    DagsterInstance,
    Definitions,
    asset,
    build_sensor_context,
    materialize,
)

from semdedup_core import layout
from semdedup_core.config import DedupConfig, make_config
from semdedup_core.pipeline import run_pipeline
from semdedup_core.storage import Storage
from semdedup_dagster.assets import (
    cluster_dedup,
    dedup_summary,
    embs_by_nearest_center,
    kmeans_centroids,
)
from semdedup_dagster.config import SemdedupResource, job_spec_to_run_config, run_config_for
from semdedup_dagster.definitions import defs
from semdedup_dagster.io_manager import LayoutIOManager
from semdedup_dagster.jobs import semdedup_job
from semdedup_dagster.partitions import CENTROIDS
from semdedup_dagster.resources import LayoutStorage
from semdedup_dagster.sensors import DropWatch, candidate_files, embedding_drop_sensor, find_drops
from tests.conftest import REPO, upload_folder
from tests.test_end_to_end import tree

warnings.filterwarnings("ignore", category=Warning, module="dagster")

BIN = os.path.dirname(sys.executable)


def args_for(folder, out, **kw):
    return {"input_embeddings_path": str(folder), "output_path": str(out), "n_clusters": 7,
            "eps_to_extract": [0.01, 0.1], **kw}


@pytest.fixture(scope="module")
def reference(planted, tmp_path_factory):
    """`semdedup run` (the engine alone) on the planted sample: what Dagster must reproduce."""
    folder, _ = planted
    out = tmp_path_factory.mktemp("ref") / "out"
    run_pipeline(make_config(**args_for(folder, out)))
    return tree(out)


def test_whole_definitions_load():
    defs.validate_loadable(defs)
    assert {j.name for j in defs.resolve_all_job_defs()} >= {"semdedup", "semdedup_centroid"}
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == {"kmeans_centroids", "embs_by_nearest_center", "semdedup_pruning_tables",
                    "semdedup_cross_cluster_tables", "unique_ids", "dedup_summary"}
    assert defs.resolve_sensor_def("embedding_drop_sensor")
    assert defs.resolve_schedule_def("semdedup_schedule")


def test_command_line_validation_of_the_definitions():
    """`dagster definitions validate` on workspace.yaml and `dg check defs` on the project."""
    env = {**os.environ, "DAGSTER_HOME": ""}
    env.pop("DAGSTER_HOME")
    proc = subprocess.run([os.path.join(BIN, "dagster"), "definitions", "validate", "-w",
                           os.path.join(REPO, "workspace.yaml")], capture_output=True, text=True,
                          cwd=REPO, env=env)
    assert proc.returncode == 0 and "All code locations passed validation" in proc.stderr + \
        proc.stdout, proc.stderr[-2000:]
    proc = subprocess.run([os.path.join(BIN, "dg"), "check", "defs"], capture_output=True,
                          text=True, cwd=REPO, env=env)
    assert proc.returncode == 0 and "All definitions loaded successfully" in proc.stdout + \
        proc.stderr, (proc.stdout + proc.stderr)[-2000:]


def test_run_config_mirrors_the_engine_config():
    fields = SemdedupResource.model_fields
    for name, f in DedupConfig.model_fields.items():
        assert name in fields
        assert fields[name].annotation == f.annotation and fields[name].description
        if not f.is_required():
            assert fields[name].default == f.default
    # The launchpad's schema: enum choices and defaults come through Dagster's config system.
    schema = defs.resolve_job_def("semdedup").run_config_schema.config_type
    op_fields = schema.fields["resources"].config_type.fields["semdedup"].config_type \
        .fields["config"].config_type.fields
    assert op_fields["which_to_keep"].default_value == "hard"
    assert {v.config_value for v in op_fields["which_to_keep"].config_type.enum_values} == \
        {"hard", "easy", "random"}
    assert op_fields["max_iter"].default_value == 100
    assert op_fields["n_clusters"].is_required


def test_job_spec_converts_to_run_config(tmp_path):
    spec = {"pipeline": "semantic-dedup", "args": {"input_embeddings_path": "s3://b/x",
                                                   "output_path": "s3://b/y", "n_clusters": 9}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    expected = {"resources": {"semdedup": {"config": spec["args"]}}}
    assert job_spec_to_run_config(str(path)) == expected
    out = subprocess.run([os.path.join(BIN, "semdedup-dagster-config"), str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert yaml.safe_load(out) == expected
    bad = subprocess.run([os.path.join(BIN, "semdedup-dagster-config"), "/no/such.json"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "/no/such.json" in bad.stderr


def test_job_in_process_equals_engine(planted, reference, tmp_path):
    folder, _ = planted
    instance = DagsterInstance.ephemeral()
    result = defs.resolve_job_def("semdedup").execute_in_process(
        run_config=run_config_for(args_for(folder, tmp_path / "out"), centroids_per_step=2),
        instance=instance)
    assert result.success
    assert tree(tmp_path / "out") == reference
    assert len(instance.get_dynamic_partitions("centroids")) == 7
    mats = [e for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"]
    keys = {(e.asset_key.to_user_string(), e.partition) for e in mats}
    assert ("kmeans_centroids", None) in keys and ("dedup_summary", None) in keys
    assert {p for k, p in keys if k == "unique_ids"} == \
        {p for k, p in keys if k == "embs_by_nearest_center"}
    summary = next(e for e in mats if e.asset_key.to_user_string() == "dedup_summary")
    md = summary.step_materialization_data.materialization.metadata
    assert md["total"].value == 3000 and "removed_vs_eps" in md
    import base64
    import xml.etree.ElementTree as ET

    for picture in ("cluster_size_histogram", "score_distribution", "removed_vs_eps_plot"):
        value = md[picture].value
        assert value.startswith("![") and "data:image/svg+xml;base64," in value
        svg = ET.fromstring(base64.b64decode(value.split("base64,")[1].rstrip(")")))
        assert svg.tag == "{http://www.w3.org/2000/svg}svg" and len(svg) > 10
    assert "| cluster | id | max_id | cosine_sim_score |" in md["example_pairs_0.01"].value
    # Few clusters: every partition of the shards, pruning tables and unique ids is reported,
    # and each step's figures are in one table (checked against the files in
    # test_job_events_per_step_with_every_cluster_in_its_table).
    assert {p for k, p in keys if k == "semdedup_pruning_tables"} == {str(k) for k in range(7)}
    tables = [e.asset_observation_data.asset_observation.metadata["clusters"].value
              for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"
              and e.asset_key.to_user_string() == "semdedup_pruning_tables"]
    assert len(tables) == 4  # 7 clusters, 2 per step
    assert sorted(r.data["cluster"] for t in tables for r in t.records) == list(range(7))
    curve = md["removed_vs_eps"].value  # eps 0.1 removes at least as much as eps 0.01
    row = {line.split("|")[1].strip(): int(line.split("|")[2].replace(",", ""))
           for line in curve.splitlines()[2:]}
    assert row["0.1"] >= row["0.01"] == md["removed_0.01"].value


def test_job_extracts_a_zip_input_once_and_leaves_no_scratch(planted, reference, tmp_path,
                                                             monkeypatch):
    """The fit step keeps its extraction for the assign step of the same run, which removes it."""
    import tempfile
    import zipfile

    from semdedup_core import storage

    folder, _ = planted
    drop = tmp_path / "drop.zip"
    with zipfile.ZipFile(drop, "w") as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"iv2_embd_parquet/{f.name}")
    extractions = []
    real_extract = storage.extract_zip_safely
    monkeypatch.setattr(storage, "extract_zip_safely",
                        lambda *a: extractions.append(a[0]) or real_extract(*a))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    result = defs.resolve_job_def("semdedup").execute_in_process(
        run_config=run_config_for(args_for(drop, tmp_path / "out")),
        instance=DagsterInstance.ephemeral())
    assert result.success
    assert len(extractions) == 1
    assert tree(tmp_path / "out") == reference  # same clips as the folder: same bytes
    assert os.listdir(tmp_path / "scratch" / storage.SHARED_ZIP_DIR) == []


def test_fit_step_reports_a_forced_openblas_kernel_family(planted, tmp_path, monkeypatch):
    """The job's and the asset's fit step say in the run's log (the launchpad user's only view)
    what `semdedup run` says: OPENBLAS_CORETYPE forces the kernels."""
    folder, _ = planted
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")  # read at the warning; BLAS loaded already
    instance = DagsterInstance.ephemeral()
    resources = {"semdedup": SemdedupResource.configure_at_launch(),
                 "layout_storage": LayoutStorage(),
                 "semdedup_layout": LayoutIOManager(layout_storage=LayoutStorage())}
    runs = [materialize([kmeans_centroids], instance=instance, resources=resources,
                        run_config=run_config_for(args_for(folder, tmp_path / "a"))),
            defs.resolve_job_def("semdedup").execute_in_process(
                run_config=run_config_for(args_for(folder, tmp_path / "b")), instance=instance)]
    for result in runs:
        assert result.success
        warned = [e for e in instance.all_logs(result.run_id) if e.dagster_event is None
                  and "OPENBLAS_CORETYPE=Haswell forces" in e.user_message]
        assert len(warned) == 1 and warned[0].level == logging.WARNING
        assert warned[0].step_key.startswith(("kmeans_centroids", "fit_centroids"))


def test_assets_materialise_one_by_one_and_one_partition_alone(planted, reference, tmp_path):
    folder, _ = planted
    out = tmp_path / "out"
    instance = DagsterInstance.ephemeral()
    resources = {"semdedup": SemdedupResource.configure_at_launch(),
                 "layout_storage": LayoutStorage(),
                 "semdedup_layout": LayoutIOManager(layout_storage=LayoutStorage())}
    cfg = args_for(folder, out)

    def config(*names):  # the same run config for every asset: the `semdedup` resource's
        return run_config_for(cfg)

    assert materialize([kmeans_centroids], run_config=config("kmeans_centroids"),
                       instance=instance, resources=resources).success
    keys = instance.get_dynamic_partitions("centroids")
    assert keys == [str(k) for k in range(7)]
    # All shards in one run (a single-run backfill of the range, as the UI launches it).
    assert materialize([embs_by_nearest_center], run_config=config("embs_by_nearest_center"),
                       instance=instance, resources=resources,
                       tags={"dagster/asset_partition_range_start": "0",
                             "dagster/asset_partition_range_end": "6"}).success
    for k in keys:
        assert materialize([cluster_dedup], partition_key=k, run_config=config("cluster_dedup"),
                           instance=instance, resources=resources).success
    assert materialize([dedup_summary], run_config=config("dedup_summary"), instance=instance,
                       resources=resources).success
    assert tree(out) == reference

    # A failed centroid: its pruning table and part vanish; re-materialising that one partition
    # alone restores them byte for byte, and touches nothing else.
    victim = "extraction/semdedup_pruning_tables/cluster_3.parquet"
    (out / victim).unlink()
    (out / "extraction/unique_ids_0.1.parquet/part.3.parquet").unlink()
    assert materialize([cluster_dedup], partition_key="3", run_config=config("cluster_dedup"),
                       instance=instance, resources=resources).success
    # The folder was written to: incomplete until the summary is re-materialised.
    assert layout.RUN_RECORD not in tree(out)
    assert materialize([dedup_summary], run_config=config("dedup_summary"), instance=instance,
                       resources=resources).success
    assert tree(out) == reference

    # unique_ids alone with another which_to_keep: its removals would come from pruning tables
    # ranked the other way, so the step fails naming the table, before it writes anything;
    # with the same settings it writes the same parts.
    every = {"dagster/asset_partition_range_start": "0", "dagster/asset_partition_range_end": "6"}
    failed = materialize([cluster_dedup], selection=["unique_ids"], instance=instance,
                         resources=resources, tags=every, raise_on_error=False,
                         run_config=run_config_for({**cfg, "which_to_keep": "easy"}))
    assert not failed.success
    message = step_failures(failed)[0].error.message
    assert f"{out / layout.pruning_table(0)} is not in this run's rank order (which_to_keep " \
           "'easy', sim_metric 'cosine') of its shard" in message
    assert "materialise semdedup_pruning_tables" in message
    assert {k: v for k, v in tree(out).items() if k != layout.RUN_RECORD} == \
        {k: v for k, v in reference.items() if k != layout.RUN_RECORD}
    assert materialize([cluster_dedup, dedup_summary], selection=["unique_ids", "dedup_summary"],
                       instance=instance, resources=resources, tags=every,
                       run_config=config()).success
    assert tree(out) == reference
    mat = instance.get_latest_materialization_event(AssetKey("semdedup_pruning_tables"))
    assert mat.asset_materialization.partition == "3"

    # Downstream assets read the layout back through the layout IO manager.
    seen = {}

    @asset(partitions_def=CENTROIDS)
    def removed_here(unique_ids, semdedup_pruning_tables, embs_by_nearest_center) -> None:
        seen.update(unique_ids=unique_ids, pruning=semdedup_pruning_tables,
                    shard=embs_by_nearest_center)

    @asset
    def dedup_report(kmeans_centroids, dedup_summary) -> None:
        seen.update(centroids=kmeans_centroids, summary=dedup_summary)

    upstream = [kmeans_centroids, embs_by_nearest_center, cluster_dedup, dedup_summary]
    assert materialize([*upstream, removed_here], selection=[removed_here], partition_key="3",
                       instance=instance, resources=resources, run_config=config()).success
    assert materialize([*upstream, dedup_report], selection=[dedup_report], instance=instance,
                       resources=resources, run_config=config()).success
    part = pq.read_table(out / "extraction/unique_ids_0.1.parquet/part.3.parquet")
    assert set(seen["unique_ids"]) == {"0.01", "0.1"} and seen["unique_ids"]["0.1"].equals(part)
    assert seen["pruning"].column_names == ["id", "max_id", "cosine_sim_score"]
    assert seen["shard"].num_rows == seen["pruning"].num_rows
    assert seen["centroids"].shape == (7, 64)
    assert seen["summary"]["0.01"]["total"] == 3000

    # A folder without its completion record does not feed downstream assets.
    (out / layout.RUN_RECORD).unlink()
    failed = materialize([*upstream, dedup_report], selection=[dedup_report], instance=instance,
                         resources=resources, raise_on_error=False)
    assert not failed.success
    text = " ".join(str(e.event_specific_data) for e in failed.all_events if e.is_failure)
    assert "incomplete: no completion record" in text


def test_drop_sensor_does_not_walk_output_folders(planted, tmp_path, monkeypatch):
    """Outputs beside a drop (`*_semdedup`) or under an output root inside the watched folder
    hold parquet in drop-like folders; the sensor must neither list them nor take them for
    drops."""
    import shutil

    folder, _ = planted
    watch_dir = tmp_path / "incoming"
    shutil.copytree(folder, watch_dir / "day1" / "ce1_embd_parquet")
    shutil.copytree(folder, watch_dir / "day1" / "ce1_embd_parquet_semdedup" / "x_embd_parquet")
    shutil.copytree(folder, watch_dir / "dedup" / "day1" / "ce1_embd_parquet")
    watch = Storage(str(watch_dir))
    drop_watch = DropWatch(watch_path=str(watch_dir), output_root=str(watch_dir / "dedup"))
    skip = drop_watch.output_root_inside(watch)
    assert skip == "dedup"
    assert list(find_drops(watch, time.time(), 0, skip=skip)) == ["day1/ce1_embd_parquet"]
    listed = {f[0].split("/")[0] + "/" + f[0].split("/")[1] for f in candidate_files(watch, skip)}
    assert listed == {"day1/ce1_embd_parquet"}
    # Without knowing the output root, its copy of the drop's name would be taken for a drop.
    assert "dedup/day1/ce1_embd_parquet" in find_drops(watch, time.time(), 0)
    assert DropWatch(watch_path=str(watch_dir), output_root="s3://elsewhere/dedup") \
        .output_root_inside(watch) is None
    # A relative watch path (or output root) is the daemon's folder's; the run gets absolute paths.
    monkeypatch.chdir(tmp_path)
    for root, output in (("", f"{watch_dir}/day1/ce1_embd_parquet_semdedup"),
                         ("out", f"{tmp_path}/out/day1/ce1_embd_parquet")):
        args = DropWatch(watch_path="incoming", output_root=root).args_for(
            Storage("incoming"), "day1/ce1_embd_parquet")
        assert args["input_embeddings_path"] == f"{watch_dir}/day1/ce1_embd_parquet"
        assert args["output_path"] == output


def test_drop_sensor_against_s3(planted, s3_client, s3_endpoint, aws_profile):
    folder, _ = planted
    s3_client.create_bucket(Bucket="drops")
    upload_folder(s3_client, "drops", "incoming/2026-11-25/iv2_embd_parquet", folder)
    s3_client.put_object(Bucket="drops", Key="incoming/notes.txt", Body=b"not a drop")
    storage = LayoutStorage(aws_profile=aws_profile, aws_endpoint_url=s3_endpoint)
    # The job's own knobs may ride in SEMDEDUP_EXTRA_ARGS beside the engine's arguments.
    watch = DropWatch(watch_path="s3://drops/incoming", n_clusters=5, settle_seconds=0,
                      output_root="s3://drops/dedup",
                      extra_args_json='{"centroids_per_step": 2, "report_partitions": false}')
    instance = DagsterInstance.ephemeral()

    def evaluate(cursor, watch=watch):
        ctx = build_sensor_context(instance=instance, cursor=cursor,
                                   resources={"drop_watch": watch, "layout_storage": storage})
        return embedding_drop_sensor(ctx), ctx

    def tick(cursor, watch=watch):
        result, ctx = evaluate(cursor, watch)
        return result if isinstance(result, list) else [], ctx.cursor

    # Still being written (changed within settle_seconds): nothing yet, and the skip names it.
    skipped, _ = evaluate(None, DropWatch(watch_path="s3://drops/incoming", settle_seconds=3600))
    assert skipped.skip_message.startswith("no drop ready under s3://drops/incoming; still being "
                                           "written: 2026-11-25/iv2_embd_parquet changed ")
    assert skipped.skip_message.endswith("starts once unchanged for 3600 s")
    runs, cursor = tick(None)
    assert len(runs) == 1
    args = runs[0].run_config["resources"]["semdedup"]["config"]
    assert args["input_embeddings_path"] == "s3://drops/incoming/2026-11-25/iv2_embd_parquet"
    assert args["output_path"] == "s3://drops/dedup/2026-11-25/iv2_embd_parquet"
    assert args["n_clusters"] == 5
    assert runs[0].run_config["ops"] == {"assign_shards": {"config": {
        "centroids_per_step": 2, "report_partitions": False}}}
    assert runs[0].run_key.startswith("2026-11-25/iv2_embd_parquet@")
    assert tick(cursor)[0] == []  # picked once
    # A zip drop next to it is a new drop; the folder is not started again.
    s3_client.put_object(Bucket="drops", Key="incoming/late.zip", Body=b"PK")
    runs, cursor = tick(cursor)
    assert [r.run_config["resources"]["semdedup"]["config"]["input_embeddings_path"]
            for r in runs] == ["s3://drops/incoming/late.zip"]
    # Rewriting a file of the folder drop picks it up again, with a new run key.
    first_key = json.loads(cursor)["2026-11-25/iv2_embd_parquet"]
    time.sleep(1.1)  # S3 LastModified has one-second resolution
    name = sorted(os.listdir(folder))[0]
    s3_client.upload_file(str(folder / name), "drops",
                          f"incoming/2026-11-25/iv2_embd_parquet/{name}")
    runs, cursor = tick(cursor)
    assert len(runs) == 1 and runs[0].run_key.endswith("@" + json.loads(cursor)[
        "2026-11-25/iv2_embd_parquet"])
    assert first_key != json.loads(cursor)["2026-11-25/iv2_embd_parquet"]
    # The run request is a valid run of the job: execute it in process against the S3 server.
    s3_defs = Definitions(jobs=[semdedup_job], resources={
        "semdedup": SemdedupResource.configure_at_launch(), "layout_storage": storage})
    result = s3_defs.resolve_job_def("semdedup").execute_in_process(
        run_config=runs[0].run_config, instance=instance)
    assert result.success
    keys = [o["Key"] for o in s3_client.list_objects_v2(
        Bucket="drops", Prefix="dedup/2026-11-25/iv2_embd_parquet/extraction/")["Contents"]]
    assert any(k.endswith("dedup_summary_0.01.csv") for k in keys)


@pytest.mark.slow
def test_webserver_launches_the_documented_config(planted, dagster_web, tmp_path):
    """dagster-webserver and dagster-daemon as separate processes on a SQLite instance; a run
    launched over GraphQL with the documented job spec's config succeeds."""
    folder, _ = planted
    nodes = dagster_web.nodes
    assert "semdedup" in {j["name"] for j in nodes[0]["jobs"]}
    spec = {"pipeline": "semantic-dedup",
            "args": args_for(folder, tmp_path / "ui-out", which_to_keep="easy")}
    launched = dagster_web.graphql("""
        mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
          __typename ... on LaunchRunSuccess { run { runId } }
          ... on PythonError { message } ... on RunConfigValidationInvalid { errors { message } }
        } }""", {"params": {"selector": {"repositoryLocationName": "semdedup",
                                         "repositoryName": nodes[0]["name"],
                                         "jobName": "semdedup"},
                            "runConfigData": job_spec_to_run_config(spec)}})
    payload = launched["data"]["launchRun"]
    assert payload["__typename"] == "LaunchRunSuccess", payload
    run_id = payload["run"]["runId"]
    status = dagster_web.wait_for_run(run_id)["status"]
    assert status == "SUCCESS", open(dagster_web.logs).read()[-3000:]
    assert (tmp_path / "ui-out/extraction/dedup_summary_0.1.csv").exists()


def test_schedule_runs_the_configured_job_spec(tmp_path, monkeypatch):
    from dagster import build_schedule_context

    from semdedup_dagster.schedules import semdedup_schedule

    monkeypatch.delenv("SEMDEDUP_SCHEDULE_JOB_SPEC", raising=False)
    ctx = build_schedule_context(scheduled_execution_time=None)
    assert "SEMDEDUP_SCHEDULE_JOB_SPEC" in semdedup_schedule(ctx).skip_message
    spec = tmp_path / "nightly.json"
    spec.write_text(json.dumps({"pipeline": "dedup", "args": {
        "input_embeddings_path": "s3://b/daily/iv2_embd_parquet", "output_path": "s3://b/out",
        "n_clusters": 50}}))
    monkeypatch.setenv("SEMDEDUP_SCHEDULE_JOB_SPEC", str(spec))
    import datetime

    ctx = build_schedule_context(
        scheduled_execution_time=datetime.datetime(2026, 11, 26, 2, tzinfo=datetime.timezone.utc))
    request = semdedup_schedule(ctx)
    assert request.run_config == {"resources": {"semdedup": {"config": {
        "input_embeddings_path": "s3://b/daily/iv2_embd_parquet", "output_path": "s3://b/out",
        "n_clusters": 50}}}}
    assert request.run_key.startswith("2026-11-26T02:00")
    assert defs.resolve_schedule_def("semdedup_schedule").default_status.value == "STOPPED"


def test_cross_cluster_job_and_partition_equal_engine(planted, tmp_path):
    """With cross_cluster, the `semdedup` job writes the cross tables (one materialisation per
    centroid partition, with its metadata) and the same output as `semdedup run`; one
    partition of the cross-table asset re-materialised alone comes back byte for byte."""
    from semdedup_dagster.assets import cross_cluster_tables_asset

    folder, _ = planted
    args = args_for(folder, tmp_path / "out", cross_cluster=True, eps_to_extract=[0.1, 0.3])
    report = run_pipeline(make_config(**{**args, "output_path": str(tmp_path / "ref")}))
    reference = tree(tmp_path / "ref")
    assert any(k.startswith("extraction/semdedup_cross_cluster_tables/") for k in reference)
    instance = DagsterInstance.ephemeral()
    result = defs.resolve_job_def("semdedup").execute_in_process(
        run_config=run_config_for(args), instance=instance)
    assert result.success
    assert tree(tmp_path / "out") == reference
    mats = [e.step_materialization_data.materialization for e in result.all_events
            if e.event_type_value == "ASSET_MATERIALIZATION"]
    cross = [m for m in mats if m.asset_key.to_user_string() == "semdedup_cross_cluster_tables"]
    assert sorted(int(m.partition) for m in cross) == list(range(7))
    for m in cross:
        table = pq.read_table(tmp_path / "out" / "extraction/semdedup_cross_cluster_tables" /
                              f"cluster_{m.partition}.parquet")
        scores = table.column("cosine_sim_score").to_numpy()
        assert m.metadata["rows"].value == table.num_rows
        assert m.metadata["max_cross_score"].value == round(float(scores.max()), 6)
        assert m.metadata["cross_removed_0.3"].value == int((scores >= 0.7).sum())
        assert m.metadata["candidates_compared"].value >= 0
    parts = [m for m in mats if m.asset_key.to_user_string() == "unique_ids"]
    assert len(parts) == 7
    for e in ("0.1", "0.3"):  # what the option added, per partition, as the CLI's total
        for m in parts:
            ext = tmp_path / "out" / "extraction"
            pruning, cross = (pq.read_table(ext / f"{name}/cluster_{m.partition}.parquet")
                              .column("cosine_sim_score").to_numpy().astype("float64")
                              for name in ("semdedup_pruning_tables",
                                           "semdedup_cross_cluster_tables"))
            assert m.metadata[f"removed_by_cross_only_{e}"].value == int(
                ((cross >= 1 - float(e)) & (pruning < 1 - float(e))).sum())
        assert sum(m.metadata[f"removed_by_cross_only_{e}"].value for m in parts) == \
            report.by_cross_only[float(e)]
    summary = next(m for m in mats if m.asset_key.to_user_string() == "dedup_summary")
    assert "| eps | kept | sampled |" in summary.metadata["kept_pairs_audit"].value
    victim = tmp_path / "out" / "extraction/semdedup_cross_cluster_tables/cluster_3.parquet"
    victim.unlink()
    resources = {"semdedup": SemdedupResource.configure_at_launch(),
                 "layout_storage": LayoutStorage(),
                 "semdedup_layout": LayoutIOManager(layout_storage=LayoutStorage())}
    assert materialize([cross_cluster_tables_asset], partition_key="3", instance=instance,
                       run_config=run_config_for(args), resources=resources).success
    # Written to: incomplete until the summary is re-materialised; then the same bytes.
    assert layout.RUN_RECORD not in tree(tmp_path / "out")
    assert materialize([dedup_summary], instance=instance, resources=resources,
                       run_config=run_config_for(args)).success
    assert tree(tmp_path / "out") == reference


def test_cross_cluster_assets_without_the_cross_tables_fail_naming_them(planted, tmp_path):
    """With cross_cluster, materialising the removals without the cross tables selected (the
    README's asset command before it named them) fails in one line naming the missing table,
    instead of writing removals without the cross-cluster rule; with them selected, the same
    materialisation gives the engine's bytes."""
    from semdedup_dagster.assets import cross_cluster_tables_asset

    folder, _ = planted
    args = args_for(folder, tmp_path / "out", cross_cluster=True, eps_to_extract=[0.1, 0.3])
    run_pipeline(make_config(**{**args, "output_path": str(tmp_path / "ref")}))
    instance = DagsterInstance.ephemeral()
    resources = {"semdedup": SemdedupResource.configure_at_launch(),
                 "layout_storage": LayoutStorage(),
                 "semdedup_layout": LayoutIOManager(layout_storage=LayoutStorage())}
    every = {"dagster/asset_partition_range_start": "0", "dagster/asset_partition_range_end": "6"}
    assert materialize([kmeans_centroids], instance=instance, resources=resources,
                       run_config=run_config_for(args)).success
    upstream = [kmeans_centroids, embs_by_nearest_center, cross_cluster_tables_asset]
    failed = materialize([*upstream, cluster_dedup], selection=[embs_by_nearest_center,
                         cluster_dedup], instance=instance, resources=resources,
                         run_config=run_config_for(args), tags=every, raise_on_error=False)
    assert not failed.success
    message = step_failures(failed)[0].error.message
    missing = tmp_path / "out" / "extraction/semdedup_cross_cluster_tables/cluster_0.parquet"
    assert f"{missing}: not found, and cross_cluster is on" in message
    assert "materialise semdedup_cross_cluster_tables" in message
    assert not (tmp_path / "out" / "extraction").exists()  # nothing written: checked first
    ranged = materialize([*upstream, cluster_dedup, dedup_summary],
                         selection=[cross_cluster_tables_asset, cluster_dedup, dedup_summary],
                         instance=instance, resources=resources, run_config=run_config_for(args),
                         tags=every)
    assert ranged.success
    assert tree(tmp_path / "out") == tree(tmp_path / "ref")
    # Materialised as a range, each partition has its own table's figures (not the run's).
    tables = tmp_path / "out" / "extraction/semdedup_cross_cluster_tables"
    cross_mats = ranged.asset_materializations_for_node("semdedup_cross_cluster_tables")
    assert sorted(int(m.partition) for m in cross_mats) == list(range(7))
    for m in cross_mats:
        table = pq.read_table(tables / f"cluster_{m.partition}.parquet")
        scores = table.column("cosine_sim_score").to_numpy()
        assert m.metadata["path"].value == str(tables / f"cluster_{m.partition}.parquet")
        assert m.metadata["rows"].value == table.num_rows
        assert m.metadata["cross_removed_0.3"].value == int((scores >= 0.7).sum())
    # ... which a downstream asset reads back through the layout IO manager.
    seen = {}

    @asset(partitions_def=CENTROIDS)
    def cross_here(semdedup_cross_cluster_tables) -> None:
        seen["cross"] = semdedup_cross_cluster_tables

    assert materialize([*upstream, cross_here], selection=[cross_here], partition_key="2",
                       instance=instance, resources=resources,
                       run_config=run_config_for(args)).success
    assert seen["cross"].equals(pq.read_table(tables / "cluster_2.parquet"))

    # The dedup assets again, with other settings but without the cross tables selected: the
    # cross tables on storage are the earlier config's, so the step fails naming the table and
    # what differs, before anything is written (they were once combined silently: a run that
    # showed Success with wrong removals, or a traceback where the clusters differed).
    made = tmp_path / "out" / "extraction/semdedup_cross_cluster_tables/cluster_0.parquet"

    def extraction():
        return {k: v for k, v in tree(tmp_path / "out").items() if k.startswith("extraction/")}

    # One table that is not this config's among good ones (not the first): its metadata
    # stripped by another tool, or made with another cap for its partition alone. Every table
    # is checked before anything is written, so the folder keeps its completion record.
    odd = tables / "cluster_3.parquet"
    good = odd.read_bytes()
    meta = pq.read_table(odd).schema.metadata
    altered = json.loads(meta[b"semdedup.cross_cluster.made_from"])
    altered["cross_cluster_max_probes"] = 5
    for new_meta, says in ((None, "does not record what it was made from"),
                           ({**meta, b"semdedup.cross_cluster.made_from":
                             json.dumps(altered).encode()},
                            "cross_cluster_max_probes 5 (this run: 3)")):
        pq.write_table(pq.read_table(odd).replace_schema_metadata(new_meta), odd)
        before = tree(tmp_path / "out")
        failed = materialize([*upstream, cluster_dedup], selection=[cluster_dedup],
                             instance=instance, resources=resources, tags=every,
                             run_config=run_config_for(args), raise_on_error=False)
        assert not failed.success
        message = step_failures(failed)[0].error.message
        assert f"{odd} " in message and says in message, message
        assert tree(tmp_path / "out") == before and layout.RUN_RECORD in before
    odd.write_bytes(good)

    for change, says, redo in (
            (dict(which_to_keep="easy"), "which_to_keep 'hard' (this run: 'easy')", []),
            (dict(cross_cluster_max_probes=2), "cross_cluster_max_probes 3 (this run: 2)", []),
            (dict(eps_to_extract=[0.1, 0.4]),
             "searched up to eps 0.3, this run's largest eps is 0.4", []),
            # a new clustering (centroids and shards redone in the same run)
            (dict(random_state=7), "centroids '", [kmeans_centroids, embs_by_nearest_center])):
        before = extraction()
        failed = materialize([*upstream, cluster_dedup], selection=[*redo, cluster_dedup],
                             instance=instance, resources=resources, tags=every,
                             run_config=run_config_for({**args, **change}), raise_on_error=False)
        assert not failed.success
        message = step_failures(failed)[0].error.message
        assert f"{made} " in message and says in message, message
        assert "materialise semdedup_cross_cluster_tables" in message
        assert extraction() == before


def step_failures(result):
    return [e.step_failure_data for e in result.all_events if e.event_type_value == "STEP_FAILURE"]


def test_user_errors_fail_the_step_with_the_command_lines_one_line(tmp_path, capsys):
    """A NaN clip: the job's first step fails with dagster.Failure carrying exactly the line
    `semdedup run` prints, the file and the clip in metadata, no engine stack; nothing written.
    A bad value the launchpad cannot check (eps 0) fails the first step the same way."""
    import numpy as np
    import pyarrow as pa

    from semdedup_core.cli import main as cli_main

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((20, 8)).astype(np.float32)
    emb[3] = np.nan
    bad = tmp_path / "in" / "a.parquet"
    bad.parent.mkdir()
    pq.write_table(pa.table({"id": [f"c{i}" for i in range(20)],
                             "embedding": pa.array(list(emb), pa.list_(pa.float32()))}), bad)
    args = {"input_embeddings_path": str(tmp_path / "in"), "output_path": str(tmp_path / "out"),
            "n_clusters": 2}
    assert cli_main(["run", "--input-embeddings-path", args["input_embeddings_path"],
                     "--output-path", args["output_path"], "--n-clusters", "2"]) == 1
    cli_line = capsys.readouterr().err.strip().splitlines()[-1].removeprefix("semdedup: error: ")
    job = defs.resolve_job_def("semdedup")
    result = job.execute_in_process(run_config=run_config_for(args),
                                    instance=DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    [failure] = step_failures(result)
    assert failure.user_failure_data.description == cli_line
    assert cli_line == f"{bad}: embedding of id 'c3' contains NaN or inf"
    meta = failure.user_failure_data.metadata
    assert meta["path"].value == str(bad) and meta["clip"].value == "c3"
    assert failure.error.cause is None and "semdedup_core" not in failure.error.to_string()
    # Nothing of the layout was written, and the failed run gave the folder back (no lock left
    # for other runs to wait on).
    assert not (tmp_path / "out/clustering_results").exists()
    assert not (tmp_path / "out/extraction").exists()
    assert not (tmp_path / "out" / layout.RUN_LOCK).exists()

    # Dagster's schema cannot say eps >= 1e-4: the first step says it, in the CLI's words.
    config = {"resources": {"semdedup": {"config": {**args, "eps_to_extract": [0.0]}}}}
    result = job.execute_in_process(run_config=config, instance=DagsterInstance.ephemeral(),
                                    raise_on_error=False)
    [failure] = step_failures(result)
    assert failure.user_failure_data.description == \
        "invalid arguments: eps_to_extract: eps 0.0 is outside [0.0001, 1)"
    # Required fields and enums are the launchpad's own validation.
    from dagster._core.system_config.objects import ResolvedRunConfig

    with pytest.raises(Exception, match="n_clusters"):
        ResolvedRunConfig.build(job, {"resources": {"semdedup": {"config": {
            "input_embeddings_path": "x"}}}})


def test_partitions_follow_the_latest_fit_and_the_summary_checks_what_it_reads(planted, tmp_path):
    """After a fit with 7 then 4 clusters, partitions 4-6 are gone. The
    summary refuses an output whose clusters lack pruning tables; the checks catch a lost
    part."""
    folder, _ = planted
    instance = DagsterInstance.ephemeral()
    job = defs.resolve_job_def("semdedup")
    assert job.execute_in_process(run_config=run_config_for(args_for(folder, tmp_path / "a")),
                                  instance=instance).success
    out = tmp_path / "b"
    assert job.execute_in_process(run_config=run_config_for(
        args_for(folder, out, n_clusters=4)), instance=instance).success
    assert instance.get_dynamic_partitions("centroids") == ["0", "1", "2", "3"]

    resources = {"semdedup": SemdedupResource.configure_at_launch(),
                 "layout_storage": LayoutStorage(),
                 "semdedup_layout": LayoutIOManager(layout_storage=LayoutStorage())}
    config = run_config_for(args_for(folder, out, n_clusters=4))
    (out / "extraction/semdedup_pruning_tables/cluster_2.parquet").unlink()
    summary_csv = (out / "extraction/dedup_summary_0.01.csv").read_bytes()
    result = materialize([dedup_summary], run_config=config, instance=instance,
                         resources=resources, raise_on_error=False)
    [failure] = step_failures(result)
    assert failure.user_failure_data.description == (
        f"{out}/extraction/semdedup_pruning_tables: no pruning table for 1 of the 4 clusters "
        "with shards (clusters 2); materialise semdedup_pruning_tables for those partitions "
        "first")
    assert (out / "extraction/dedup_summary_0.01.csv").read_bytes() == summary_csv

    assert materialize([cluster_dedup], partition_key="2", run_config=config, instance=instance,
                       resources=resources).success
    result = materialize([dedup_summary], run_config=config, instance=instance,
                         resources=resources)
    checks = {e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data
              for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}
    assert set(checks) == {"one_pruning_table_per_shard", "kept_plus_removed_is_total"}
    assert all(c.passed for c in checks.values())
    # What the checks catch: a part that lost rows, a pruning table that lost its shard.
    from semdedup_dagster.checks import check_tables_per_shard, check_totals

    part = out / "extraction/unique_ids_0.1.parquet/part.1.parquet"
    pq.write_table(pq.read_table(part).slice(0, 0), part)
    storage = Storage(str(out))
    outcome = check_totals(make_config(**args_for(folder, out, n_clusters=4)), storage)
    assert not outcome.passed and "rows of unique_ids_0.1" in outcome.description
    import shutil

    shutil.rmtree(out / "clustering_results/embs_by_nearest_center/nearest_cent=3")
    outcome = check_tables_per_shard(storage)
    assert not outcome.passed and outcome.description == \
        "pruning tables without a shard: clusters 3"


def test_job_events_per_step_with_every_cluster_in_its_table(planted, tmp_path):
    """Above UNBATCHED_MAX_CLUSTERS on the default SQLite instance (each event its own write),
    the job's events do not grow with the clusters: no partition is reported as materialised,
    and each dedup step logs one table with every cluster's rows, best score and removals per
    eps, as the files have them."""
    from semdedup_dagster.reporting import UNBATCHED_MAX_CLUSTERS

    folder, _ = planted
    k = UNBATCHED_MAX_CLUSTERS + 20
    out = tmp_path / "out"
    (tmp_path / "home").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "home")) as instance:
        result = defs.resolve_job_def("semdedup").execute_in_process(
            run_config=run_config_for(args_for(folder, out, n_clusters=k),
                                      centroids_per_step=50), instance=instance)
        assert result.success
        counts = {}
        for e in instance.all_logs(result.run_id):
            if e.dagster_event is not None:
                counts[e.dagster_event.event_type_value] = \
                    counts.get(e.dagster_event.event_type_value, 0) + 1
        steps = counts["STEP_SUCCESS"]
        assert steps == 2 + -(-k // 50) + 1  # fit, assign, the dedup steps (k/50), summary
        assert counts["ASSET_MATERIALIZATION"] == 2  # kmeans_centroids, dedup_summary
        assert counts["ASSET_OBSERVATION"] == steps - 2  # the shards' table + one per dedup step
        assert sum(counts.values()) < 20 * steps  # per step, not per cluster
        for asset in ("embs_by_nearest_center", "semdedup_pruning_tables", "unique_ids"):
            assert instance.get_materialized_partitions(AssetKey(asset)) == set()
    rows = [r.data for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"
            and e.asset_key.to_user_string() == "semdedup_pruning_tables"
            for r in e.asset_observation_data.asset_observation.metadata["clusters"].value.records]
    clusters = sorted(int(p.name.split("=")[1]) for p in
                      (out / "clustering_results/embs_by_nearest_center").iterdir())
    assert sorted(r["cluster"] for r in rows) == clusters and len(clusters) > UNBATCHED_MAX_CLUSTERS
    for r in rows:
        table = pq.read_table(out / f"extraction/semdedup_pruning_tables/cluster_{r['cluster']}"
                                    ".parquet")
        assert r["rows"] == table.num_rows
        assert r["max_cosine_sim_score"] == round(float(table["cosine_sim_score"].to_numpy().max()), 6)
        for eps in ("0.01", "0.1"):
            part = out / f"extraction/unique_ids_{eps}.parquet/part.{r['cluster']}.parquet"
            assert r[f"removed_{eps}"] == pq.read_metadata(part).num_rows


def test_a_failed_run_gives_the_output_folder_back(planted, tmp_path):
    """A run whose steps run one at a time gives the folder back when a step fails after it
    has written: the lock is marked failed with its lease over, so another run takes the folder
    at once instead of waiting 5 minutes; re-executing the failed centroid then succeeds."""
    from semdedup_core import run_record

    folder, _ = planted
    out = tmp_path / "out"
    instance = DagsterInstance.ephemeral()
    assert defs.resolve_job_def("semdedup").execute_in_process(
        run_config=run_config_for(args_for(folder, out)), instance=instance).success
    shard = next((out / layout.shard_dir(3)).iterdir())
    good = shard.read_bytes()
    shard.write_bytes(b"not parquet")
    resources = {"semdedup": SemdedupResource.configure_at_launch(),
                 "layout_storage": LayoutStorage(),
                 "semdedup_layout": LayoutIOManager(layout_storage=LayoutStorage())}
    failed = materialize([cluster_dedup], partition_key="3", instance=instance,
                         run_config=run_config_for(args_for(folder, out)), resources=resources,
                         raise_on_error=False)
    assert not failed.success
    holder = run_record.read_holder(Storage(str(out)))
    assert holder.state == "failed" and holder.is_stale()
    other = run_record.acquire(Storage(str(out)), "another-run", wait=False)  # not OutputBusy
    other.release(ok=True)
    shard.write_bytes(good)
    assert materialize([cluster_dedup], partition_key="3", instance=instance,
                       run_config=run_config_for(args_for(folder, out)),
                       resources=resources).success
