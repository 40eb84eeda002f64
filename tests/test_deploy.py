"""deploy/: static checks of the compose file, dagster.yaml (Dagster's own validation) and the
Helm values; then the production shape for real, on this machine: a PostgreSQL server as the
instance storage, compute logs on the S3 API server, the code location as a gRPC server, and
dagster-webserver and dagster-daemon as separate processes. A drop put into S3 is picked up by
the sensor and run to the complete layout by the daemon; a run that failed part-way is resumed
from failure without redoing the finished centroids."""

import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib

import pytest
import yaml

from semdedup_dagster.config import run_config_for
from tests.conftest import REPO, DagsterWeb, free_port, upload_folder

DEPLOY = os.path.join(REPO, "deploy")
BIN = os.path.dirname(sys.executable)
PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def load_yaml(name):
    with open(os.path.join(DEPLOY, name)) as f:
        return yaml.safe_load(f)


# -- static checks -------------------------------------------------------------------------------
PG_ENV = {"DAGSTER_POSTGRES_HOST": "db", "DAGSTER_POSTGRES_PORT": "5432",
          "DAGSTER_POSTGRES_USER": "u", "DAGSTER_POSTGRES_PASSWORD": "p",
          "DAGSTER_POSTGRES_DB": "d", "SEMDEDUP_COMPUTE_LOG_BUCKET": "logs"}


def test_dagster_yaml_passes_dagster_validation(monkeypatch):
    from dagster._core.instance.config import dagster_instance_config

    for k, v in PG_ENV.items():
        monkeypatch.setenv(k, v)
    config, _ = dagster_instance_config(DEPLOY)
    assert "postgres" in config["storage"]
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    limits = {item["key"] for item in config["concurrency"]["runs"]["tag_concurrency_limits"]}
    assert limits == {"semdedup/drop", "semdedup/output", "semdedup/corpus", "semdedup/backend"}
    assert config["compute_logs"]["class"] == "S3ComputeLogManager"


def test_compose_file_shape():
    compose = load_yaml("docker-compose.yaml")
    services = compose["services"]
    assert set(services) == {"postgres", "code", "webserver", "daemon"}
    assert services["code"]["command"][:3] == ["dagster", "code-server", "start"]
    assert "semdedup_dagster.definitions" in services["code"]["command"]
    for name in ("webserver", "daemon"):
        assert "/opt/dagster/dagster_home/workspace.yaml" in services[name]["command"]
        assert set(PG_ENV) - {"SEMDEDUP_COMPUTE_LOG_BUCKET"} <= set(services[name]["environment"])
    workspace = load_yaml("workspace.yaml")["load_from"][0]["grpc_server"]
    assert (workspace["host"], workspace["port"]) == ("code", 4000)
    assert services["postgres"]["healthcheck"]
    # One S3 endpoint for the code (layout) and the webserver and daemon (compute logs).
    for name in ("code", "webserver", "daemon"):
        assert "AWS_ENDPOINT_URL" in services[name]["environment"]
    # Immutable tags: the project version.
    version = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["project"]["version"]
    assert {services[n]["image"] for n in ("code", "webserver", "daemon")} == \
        {f"semdedup:{version}-cpu"}


def test_images_use_the_project_pins():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    pins = [d for d in project["dependencies"] + project["optional-dependencies"]["deploy"]
            if d.startswith("dagster")]
    assert all("==" in p for p in pins)
    assert len({p.split("==")[1].split(".")[-1] for p in pins}) == 1  # one 1.13.N / 0.29.N family
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = open(os.path.join(DEPLOY, "docker", name)).read()
        assert 'pip install ".[deploy]"' in text  # versions come from pyproject.toml only
        assert not re.search(r"dagster[-\w]*==", text)
    assert "rapidsai/base" in open(os.path.join(DEPLOY, "docker", "Dockerfile.gpu")).read()


def test_images_run_as_a_non_root_user_on_a_small_context():
    ignore = [line.strip() for line in open(os.path.join(REPO, ".dockerignore"))
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # everything out of the build context but what is let back in
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        lines = open(os.path.join(DEPLOY, "docker", name)).read().splitlines()
        users = [line.split()[1] for line in lines if line.startswith("USER ")]
        assert users[-1].isdigit() and users[-1] != "0", name  # numeric, for runAsNonRoot
        sources = {src for line in lines if line.startswith("COPY ") for src in line.split()[1:-1]}
        assert sources <= kept, name


def test_helm_values_shape():
    values = load_yaml("helm/values.yaml")
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    deployment = values["dagster-user-deployments"]["deployments"][0]
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["SEMDEDUP_EXECUTOR"] == "k8s"
    step = json.loads(env["SEMDEDUP_STEP_K8S_CONFIG"])
    assert step["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert step["pod_spec_config"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert step["pod_spec_config"]["node_selector"]
    assert {"name": "semdedup-aws"} in deployment["envSecrets"]
    assert values["postgresql"]["enabled"] is False
    assert values["computeLogManager"]["type"] == "S3ComputeLogManager"
    json.loads(env["SEMDEDUP_EXTRA_ARGS"])


# -- the real thing ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def postgres():
    if not PG_BIN:
        pytest.skip("PostgreSQL is not installed (scripts/install-test-deps installs it)")
    # Not under pytest's tmp folders: those are private to root, and the server runs as postgres.
    root = pathlib.Path(tempfile.mkdtemp(prefix="semdedup-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    as_user = []
    if os.geteuid() == 0:  # postgres refuses to run as root: use Debian's postgres user
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    bindir = PG_BIN[-1]
    subprocess.run(as_user + [f"{bindir}/initdb", "-D", str(data), "-U", "postgres",
                              "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
    port = free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(as_user + [f"{bindir}/postgres", "-D", str(data), "-p", str(port),
                                       "-h", "127.0.0.1", "-k", str(sock)],
                            stdout=log, stderr=log)
    deadline = time.time() + 60
    while subprocess.run([f"{bindir}/pg_isready", "-h", "127.0.0.1", "-p", str(port)],
                         capture_output=True).returncode != 0:
        assert time.time() < deadline and proc.poll() is None, (root / "server.log").read_text()
        time.sleep(0.3)
    subprocess.run([f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                    "dagster"], check=True)
    yield {"host": "127.0.0.1", "port": port}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def deployment(postgres, s3_endpoint, tmp_path_factory):
    """deploy/dagster.yaml on Postgres + S3 compute logs; code server, webserver, daemon."""
    import boto3

    home = tmp_path_factory.mktemp("deploy_home")
    shutil.copy(os.path.join(DEPLOY, "dagster.yaml"), home / "dagster.yaml")
    creds = {"AWS_ACCESS_KEY_ID": "deploy-key", "AWS_SECRET_ACCESS_KEY": "deploy-secret",
             "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="deploy-key", aws_secret_access_key="deploy-secret")
    for bucket in ("dagster-logs", "curation"):
        s3.create_bucket(Bucket=bucket)
    code_port = free_port()
    env = {**os.environ, **creds, "DAGSTER_HOME": str(home),
           "DAGSTER_POSTGRES_HOST": postgres["host"], "DAGSTER_POSTGRES_PORT": str(postgres["port"]),
           "DAGSTER_POSTGRES_USER": "postgres", "DAGSTER_POSTGRES_PASSWORD": "",
           "DAGSTER_POSTGRES_DB": "dagster", "SEMDEDUP_COMPUTE_LOG_BUCKET": "dagster-logs",
           "AWS_ENDPOINT_URL": s3_endpoint, "SEMDEDUP_AWS_ENDPOINT_URL": s3_endpoint,
           "SEMDEDUP_WATCH_PATH": "s3://curation/incoming",
           "SEMDEDUP_OUTPUT_ROOT": "s3://curation/dedup", "SEMDEDUP_N_CLUSTERS": "6",
           "SEMDEDUP_SETTLE_SECONDS": "1", "SEMDEDUP_SENSOR_INTERVAL_SECONDS": "5",
           "SEMDEDUP_EXTRA_ARGS": json.dumps({"centroids_per_step": 2}),
           "DAGSTER_EVENT_BATCH_SIZE": "1000"}
    for var in ("AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        env.pop(var, None)
    log = open(home / "code.log", "wb")  # noqa: SIM115
    code = subprocess.Popen([os.path.join(BIN, "dagster"), "code-server", "start", "-h",
                             "127.0.0.1", "-p", str(code_port), "-m",
                             "semdedup_dagster.definitions"], env=env, cwd=home, stdout=log,
                            stderr=log)
    workspace = home / "workspace.yaml"
    spec = load_yaml("workspace.yaml")
    spec["load_from"][0]["grpc_server"].update(host="127.0.0.1", port=code_port)
    workspace.write_text(yaml.safe_dump(spec))
    web = DagsterWeb(home, home / "processes.log", workspace=str(workspace), env=env)
    try:
        web.nodes = web.wait_ready()
        web.s3 = s3
        yield web
    finally:
        web.stop()
        code.terminate()
        code.wait(timeout=30)
        log.close()


def selector(web):
    return {"repositoryLocationName": "semdedup", "repositoryName": web.nodes[0]["name"]}


@pytest.mark.slow
def test_drop_is_picked_up_by_the_daemon_on_postgres(deployment, planted):
    folder, _ = planted
    web = deployment
    upload_folder(web.s3, "curation", "incoming/day1/iv2_embd_parquet", folder)
    started = web.graphql("""mutation($s: SensorSelector!) { startSensor(sensorSelector: $s) {
        __typename ... on Sensor { sensorState { status } } ... on PythonError { message } } }""",
                          {"s": {**selector(web), "sensorName": "embedding_drop_sensor"}})
    assert started["data"]["startSensor"]["sensorState"]["status"] == "RUNNING", started
    deadline, runs = time.time() + 240, []
    while time.time() < deadline and not runs:
        runs = web.graphql('{ runsOrError(filter: {pipelineName: "semdedup"}) { ... on Runs '
                           '{ results { runId status tags { key value } } } } }'
                           )["data"]["runsOrError"]["results"]
        time.sleep(2)
    assert len(runs) == 1, open(web.logs).read()[-3000:]
    run = web.wait_for_run(runs[0]["runId"])
    assert run["status"] == "SUCCESS", open(web.logs).read()[-3000:]
    tags = {t["key"]: t["value"] for t in runs[0]["tags"]}
    assert tags["semdedup/drop"] == "s3://curation/incoming/day1/iv2_embd_parquet"
    assert tags["semdedup/output"] == "s3://curation/dedup/day1/iv2_embd_parquet"
    assert tags["dagster/sensor_name"] == "embedding_drop_sensor"
    keys = [o["Key"] for o in web.s3.list_objects_v2(
        Bucket="curation", Prefix="dedup/day1/iv2_embd_parquet/")["Contents"]]
    parts = [k for k in keys if "/unique_ids_0.01.parquet/part." in k]
    tables = [k for k in keys if "/semdedup_pruning_tables/cluster_" in k]
    assert len(parts) == len(tables) > 0
    assert any(k.endswith("extraction/dedup_summary_0.01.csv") for k in keys)
    # Compute logs went to S3, and the run history is in Postgres.
    logs = web.s3.list_objects_v2(Bucket="dagster-logs").get("Contents", [])
    assert any("dagster-compute-logs" in o["Key"] for o in logs)
    # The next ticks find nothing new: still exactly one run for the drop.
    time.sleep(12)
    again = web.graphql('{ runsOrError(filter: {pipelineName: "semdedup", tags: [{key: '
                        '"dagster/sensor_name", value: "embedding_drop_sensor"}]}) { ... on Runs '
                        '{ results { runId } } } }')["data"]["runsOrError"]["results"]
    assert len(again) == 1


@pytest.mark.slow
def test_failed_run_resumes_without_redoing_finished_centroids(deployment, planted, tmp_path):
    folder, _ = planted
    web = deployment
    out = tmp_path / "out"
    # Block one centroid's pruning table with a folder: that step fails, the others finish.
    blocker = out / "extraction/semdedup_pruning_tables/cluster_3.parquet"
    blocker.mkdir(parents=True)
    (blocker / "keep").write_text("x")
    args = {"input_embeddings_path": str(folder), "output_path": str(out), "n_clusters": 6}
    launched = web.graphql("""mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
        __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""",
                           {"p": {"selector": {**selector(web), "jobName": "semdedup"},
                                  "runConfigData": run_config_for(args, centroids_per_step=2)}})
    run_id = launched["data"]["launchRun"]["run"]["runId"]
    first = web.wait_for_run(run_id)
    assert first["status"] == "FAILURE"
    failed = [s["stepKey"] for s in first["stepStats"] if s["status"] == "FAILURE"]
    done = [s["stepKey"] for s in first["stepStats"]
            if s["status"] == "SUCCESS" and s["stepKey"].startswith("dedup_clusters[")]
    assert len(failed) == 1 and failed[0].startswith("dedup_clusters[") and done
    # The failed step's batch (`dedup_clusters[clusters_<first>_<last>]`) is redone whole;
    # every cluster of the steps that finished must be left alone.
    first_k, last_k = map(int, re.search(r"clusters_(\d+)_(\d+)", failed[0]).groups())
    finished = {p: p.stat().st_mtime_ns
                for p in (out / "extraction/semdedup_pruning_tables").glob("cluster_*.parquet")
                if p.is_file() and not first_k <= int(p.stem.split("_")[1]) <= last_k}
    assert finished

    shutil.rmtree(blocker)
    again = web.graphql("""mutation($p: ReexecutionParams!) {
        launchRunReexecution(reexecutionParams: $p) {
        __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""",
                        {"p": {"parentRunId": run_id, "strategy": "FROM_FAILURE"}})
    child = web.wait_for_run(again["data"]["launchRunReexecution"]["run"]["runId"])
    assert child["status"] == "SUCCESS", open(web.logs).read()[-3000:]
    ran = {s["stepKey"] for s in child["stepStats"] if s["status"] == "SUCCESS"}
    assert ran == {failed[0], "summarize_run"}  # no refit, no reassignment, no finished centroid
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path.name} was rewritten"
    assert (out / "extraction/semdedup_pruning_tables/cluster_3.parquet").is_file()
    assert (out / "extraction/dedup_summary_0.01.csv").exists()


def postgres_sql(port: int, sql: str):
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone() if cur.description else None
    finally:
        conn.close()


@pytest.mark.parametrize("batch", ["1000", "0"])
def test_job_reports_every_partition_in_batches_on_postgres(postgres, planted, tmp_path,
                                                            monkeypatch, batch):
    """On deploy/'s Postgres storage with deploy/'s DAGSTER_EVENT_BATCH_SIZE, the job reports
    every non-empty cluster's partition of the shards, pruning tables and unique ids, and
    writes them in batches: the run's database commits are fewer than the partitions reported
    (one write per event would take two commits each). Without the batch size the same run
    reports none (more than UNBATCHED_MAX_CLUSTERS clusters)."""
    from dagster import AssetKey, DagsterInstance

    from semdedup_dagster.definitions import defs
    from semdedup_dagster.reporting import UNBATCHED_MAX_CLUSTERS

    db = f"batch_{batch}"  # its own database: the commits counted are this run's alone
    postgres_sql(postgres["port"], f"CREATE DATABASE {db}")
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(
        {"storage": load_yaml("dagster.yaml")["storage"]}))
    for var, value in {"DAGSTER_POSTGRES_HOST": postgres["host"],
                       "DAGSTER_POSTGRES_PORT": str(postgres["port"]),
                       "DAGSTER_POSTGRES_USER": "postgres", "DAGSTER_POSTGRES_PASSWORD": "",
                       "DAGSTER_POSTGRES_DB": db, "DAGSTER_EVENT_BATCH_SIZE": batch}.items():
        monkeypatch.setenv(var, value)
    folder, _ = planted
    k = UNBATCHED_MAX_CLUSTERS + 20
    out = tmp_path / "out"
    with DagsterInstance.from_config(str(home)) as instance:
        commits = f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{db}'"
        before = postgres_sql(postgres["port"], commits)[0]
        result = defs.resolve_job_def("semdedup").execute_in_process(
            run_config=run_config_for({"input_embeddings_path": str(folder),
                                       "output_path": str(out), "n_clusters": k}),
            instance=instance)
        # The statistics collector reports a backend's counts when it goes idle: wait for them.
        time.sleep(1)
        commits = postgres_sql(postgres["port"], commits)[0] - before
        assert result.success
        clusters = {p.name.split("=")[1] for p in
                    (out / "clustering_results/embs_by_nearest_center").iterdir()}
        reported = {a: instance.get_materialized_partitions(AssetKey(a))
                    for a in ("embs_by_nearest_center", "semdedup_pruning_tables", "unique_ids")}
    partitions = [e for e in result.all_events
                  if e.event_type_value == "ASSET_MATERIALIZATION" and e.partition is not None]
    if batch == "0":
        assert partitions == []
        return
    assert len(partitions) == 3 * len(clusters)
    assert all(r == clusters for r in reported.values()), reported
    assert commits < 3 * len(clusters), commits
