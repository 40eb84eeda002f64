"""The Kubernetes path of deploy/helm/values.yaml, run end to end without a cluster.

A run of `semdedup` is launched as the chart would launch it: the instance's K8sRunLauncher and,
inside the run, the k8s job executor, both dagster-k8s's own code, unmodified, build every pod's
Kubernetes Job and send it to a loopback cluster (tests/k8s_cluster.py) that runs each Job's
container as a process on a disk of its own. The steps therefore share only the instance's
database and S3 (the moto server), and the test checks what each Job asks for (GPU, node
selector, tolerations, resources, env, secrets) and that the result equals `semdedup run`'s.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from semdedup_dagster.config import run_config_for
from tests.conftest import BIN, REPO
from tests.k8s_cluster import (
    FULLNAME,
    LocalCluster,
    chart_concurrency,
    config_maps,
    container_context,
    image,
    instance_yaml,
    user_deployment,
)
from tests.test_end_to_end import tree

DEPLOY = os.path.join(REPO, "deploy")
COMPUTING_STEPS = ("fit_centroids", "assign_shards", "dedup_clusters")


def load_values() -> dict:
    with open(os.path.join(DEPLOY, "helm", "values.yaml")) as f:
        return yaml.safe_load(f)


def deployment_env(values) -> dict:
    return {e["name"]: e["value"] for e in user_deployment(values)["env"]}


# -- static: what the values say, against dagster.yaml and Dagster's own loading ---------------
def test_chart_concurrency_matches_dagster_yaml():
    """The run limits and the gpu pool are the same on Kubernetes (the chart's `concurrency`)
    as in deploy/dagster.yaml, and the chart's run coordinator adds no limits of its own (the
    chart refuses both at once)."""
    values = load_values()
    with open(os.path.join(DEPLOY, "dagster.yaml")) as f:
        instance = yaml.safe_load(f)
    assert values["concurrency"]["enabled"] is True
    assert chart_concurrency(values["concurrency"]) == instance["concurrency"]
    assert "config" not in values["dagsterDaemon"]["runCoordinator"]
    assert values["telemetry"]["enabled"] == instance["telemetry"]["enabled"] is False


def test_values_pin_image_and_chart():
    values = load_values()
    tag = str(user_deployment(values)["image"]["tag"])
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        version = next(line.split('"')[1] for line in f if line.startswith("version"))
    assert tag.startswith(version) or "@sha256:" in tag
    readme = open(os.path.join(REPO, "README.md")).read()
    dagster_pin = next(line for line in open(os.path.join(REPO, "pyproject.toml"))
                       if '"dagster==' in line).split("==")[1].split('"')[0]
    assert f"dagster/dagster --version {dagster_pin}" in readme


def test_k8s_executor_needs_an_s3_prefix_for_op_outputs():
    env = {**os.environ, **deployment_env(load_values())}
    env.pop("SEMDEDUP_OP_OUTPUT_PATH")
    proc = subprocess.run([sys.executable, "-c", "import semdedup_dagster.definitions"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "SEMDEDUP_EXECUTOR=k8s runs every step in its own pod: set SEMDEDUP_OP_OUTPUT_PATH" \
        in proc.stderr.splitlines()[-1]
    code = ("from semdedup_dagster.definitions import defs; "
            "r = defs.resources['io_manager']; "
            "print(type(r).__name__, r.s3_bucket, r.s3_prefix)")
    env = {**os.environ, **deployment_env(load_values())}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["S3PickleIOManager", "curation", "dagster-op-outputs"]


# -- the run on the loopback cluster -----------------------------------------------------------
def s3_tree(client, bucket, prefix, dest):
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            path = dest / obj["Key"][len(prefix):].lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(path))
    return tree(dest)


@pytest.fixture(scope="module")
def k8s_run(planted, s3_endpoint, tmp_path_factory):
    """One `semdedup` run over the planted sample (a .zip on S3), launched into the loopback
    cluster."""
    import boto3
    from dagster import DagsterInstance

    folder, _ = planted
    root = tmp_path_factory.mktemp("k8s")
    values = load_values()
    keys = {"AWS_ACCESS_KEY_ID": "k8s-key", "AWS_SECRET_ACCESS_KEY": "k8s-secret"}
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                      aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])
    # The values' buckets: outputs and op outputs, compute logs.
    for bucket in ("curation", values["computeLogManager"]["config"]["s3ComputeLogManager"]
                   ["bucket"]):
        s3.create_bucket(Bucket=bucket)
    # A zip: the fit and the assignment each extract it on their own pod's disk.
    archive = shutil.make_archive(str(root / "day1"), "zip", root_dir=folder.parent,
                                  base_dir=folder.name)
    s3.upload_file(archive, "curation", "incoming/day1.zip")

    home = root / "dagster_home"  # the webserver's instance: the chart's dagster.yaml
    home.mkdir()
    secrets = {  # what the operator creates beside the chart
        "semdedup-aws": {**keys, "AWS_ENDPOINT_URL": s3_endpoint},
        values["global"]["postgresqlSecretName"]: {"postgresql-password": "unused-by-sqlite"}}
    cluster = LocalCluster(root, config_maps(values), secrets)
    (home / "dagster.yaml").write_text(yaml.safe_dump(
        instance_yaml(values, cluster.kubeconfig, str(root / "database"))))
    (home / "values.yaml").write_text(yaml.safe_dump(values))
    args = {"input_embeddings_path": "s3://curation/incoming/day1.zip",
            "output_path": "s3://curation/dedup/k8s-day1", "n_clusters": 6,
            "eps_to_extract": [0.01, 0.1], "backend": "cpu"}
    # The launching process (the webserver, with the code location's definitions): the
    # deployment's env and secrets.
    env = {"PATH": os.environ["PATH"], "HOME": str(root), "DAGSTER_HOME": str(home),
           **deployment_env(values), **secrets["semdedup-aws"]}
    try:
        launched = subprocess.run(
            [sys.executable, "-c", "import sys; from tests.k8s_cluster import launch; "
                                   "launch(sys.argv[1], sys.argv[2])",
             str(home), json.dumps(run_config_for(args, centroids_per_step=3))],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert launched.returncode == 0, launched.stderr[-3000:]
        run_id = launched.stdout.split()[-1]
        with DagsterInstance.from_config(str(home)) as instance:
            deadline = time.time() + 300
            while not instance.get_run_by_id(run_id).is_finished:
                assert time.time() < deadline, cluster.logs()
                time.sleep(1)
            run = instance.get_run_by_id(run_id)
            assert run.status.value == "SUCCESS", cluster.logs()
        yield {"values": values, "cluster": cluster, "run_id": run_id, "s3": s3, "args": args,
               "root": root, "folder": folder}
    finally:
        cluster.stop()


def quantities(resources: dict) -> dict:
    """Resources as Kubernetes writes them (every quantity a string)."""
    return {kind: {k: str(v) for k, v in amounts.items()} for kind, amounts in resources.items()}


def pod_spec(job):
    return job["spec"]["template"]["spec"]


def step_jobs(k8s_run) -> dict:
    """step key -> its Job."""
    jobs = {}
    for job in k8s_run["cluster"].jobs.values():
        env = {e["name"]: e.get("value") for e in pod_spec(job)["containers"][0].get("env", [])}
        if "DAGSTER_RUN_STEP_KEY" in env:
            jobs[env["DAGSTER_RUN_STEP_KEY"]] = job
    return jobs


@pytest.mark.slow
def test_every_step_pod_gets_what_its_step_runs(k8s_run):
    values = k8s_run["values"]
    env = deployment_env(values)
    gpu = json.loads(env["SEMDEDUP_STEP_K8S_CONFIG"])
    jobs = step_jobs(k8s_run)
    assert {k.split("[")[0] for k in jobs} == {*COMPUTING_STEPS, "summarize_run"}
    assert sum(k.startswith("dedup_clusters[") for k in jobs) == 2  # 6 clusters, 3 per step
    for key, job in jobs.items():
        spec = pod_spec(job)
        container = spec["containers"][0]
        assert container["image"] == image(values)
        # The deployment's env, its AWS secret, its env config map, on every pod.
        pod_env = {e["name"]: e.get("value") for e in container["env"]}
        assert {k: pod_env.get(k) for k in env} == env
        sources = container["envFrom"]
        assert {"secretRef": {"name": "semdedup-aws"}} in sources
        assert {"configMapRef": {"name": f"{FULLNAME}-semdedup-user-env"}} in sources
        if key.split("[")[0] in COMPUTING_STEPS:
            # The GPU, its node pool and toleration, on fit and assign as on dedup.
            assert container["resources"] == quantities(gpu["container_config"]["resources"])
            assert spec["nodeSelector"] == gpu["pod_spec_config"]["node_selector"]
            assert spec["tolerations"] == gpu["pod_spec_config"]["tolerations"]
        else:  # summarize_run reads footers: the deployment's own resources, no GPU
            assert container["resources"] == quantities(user_deployment(values)["resources"])
            assert "nodeSelector" not in spec and "tolerations" not in spec


@pytest.mark.slow
def test_run_pod_gets_its_own_resources(k8s_run):
    values = k8s_run["values"]
    env = deployment_env(values)
    runs = [j for j in k8s_run["cluster"].jobs.values()
            if j["metadata"]["labels"].get("app.kubernetes.io/component") == "run_worker"]
    assert len(runs) == 1
    container = pod_spec(runs[0])["containers"][0]
    assert container["args"][-3:-1] == ["api", "execute_run"]
    assert container["image"] == image(values)
    # SEMDEDUP_RUN_K8S_CONFIG wins over the deployment's resources that the chart passes on.
    wanted = json.loads(env["SEMDEDUP_RUN_K8S_CONFIG"])["container_config"]["resources"]
    assert container["resources"] == quantities(wanted)
    assert wanted != user_deployment(values)["resources"]
    assert "nodeSelector" not in pod_spec(runs[0])  # no GPU node for the coordinator
    assert {"secretRef": {"name": "semdedup-aws"}} in container["envFrom"]
    pod_env = {e["name"]: e.get("value") for e in container["env"]}
    assert pod_env["SEMDEDUP_EXECUTOR"] == "k8s"
    assert container_context(values)["k8s"]["env"] == user_deployment(values)["env"]


@pytest.mark.slow
def test_steps_share_only_s3_and_equal_semdedup_run(k8s_run, tmp_path):
    cluster, run_id, s3 = k8s_run["cluster"], k8s_run["run_id"], k8s_run["s3"]
    # Each pod ran in its own folder, and no step's output is on any pod's disk: they went
    # through S3, under SEMDEDUP_OP_OUTPUT_PATH.
    disks = [os.path.join(k8s_run["root"], "pods", name) for name in cluster.jobs]
    assert len(set(disks)) == len(cluster.jobs) == len(step_jobs(k8s_run)) + 1
    for disk in disks:
        for _, _, files in os.walk(disk):
            assert not [f for f in files if f == "result"], disk
    keys = [o["Key"] for o in s3.list_objects_v2(
        Bucket="curation", Prefix=f"dagster-op-outputs/storage/{run_id}/")["Contents"]]
    # (fit_centroids and summarize_run return nothing, so store nothing: the run's arguments
    # reach every step through the `semdedup` resource of the run config.)
    assert {k.split("/")[3].split("--")[0] for k in keys} == {"assign_shards", "dedup_clusters"}
    # The steps' compute logs went to the values' bucket too.
    logs = k8s_run["values"]["computeLogManager"]["config"]["s3ComputeLogManager"]
    assert s3.list_objects_v2(Bucket=logs["bucket"], Prefix=logs["prefix"])["KeyCount"] > 0
    # The same files as the engine alone, byte for byte.
    env = {**os.environ, "AWS_ENDPOINT_URL": s3.meta.endpoint_url,
           "AWS_ACCESS_KEY_ID": "k8s-key", "AWS_SECRET_ACCESS_KEY": "k8s-secret",
           "AWS_REGION": "us-east-1"}
    args = k8s_run["args"]
    cli = subprocess.run([os.path.join(BIN, "semdedup"), "run", "--input-embeddings-path",
                          args["input_embeddings_path"], "--output-path", str(tmp_path / "cli"),
                          "--n-clusters", "6", "--eps-to-extract", "0.01", "0.1",
                          "--backend", "cpu"], capture_output=True, text=True, env=env)
    assert cli.returncode == 0, cli.stderr
    # (Its own prefix: test_deploy writes dedup/day1/iv2_embd_parquet/ into the same bucket.)
    assert s3_tree(s3, "curation", "dedup/k8s-day1/", tmp_path / "k8s") == tree(tmp_path / "cli")
