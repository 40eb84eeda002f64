"""A Kubernetes cluster on loopback, just large enough for dagster-k8s: the batch API that
K8sRunLauncher and the k8s job executor call (create a Job, read its status, delete it), and a
"kubelet" that runs each Job's container as a local process.

Every pod gets what a pod of the real cluster gets and nothing more: the Job's args, its env
(values, and `secretKeyRef`s resolved from the secrets given), its `envFrom` config maps and
secrets, and a working directory, HOME and TMPDIR of its own (its own disk). The image is this
checkout's virtualenv. So two steps of a run share only what they would share on Kubernetes:
the Dagster instance's database and the S3 API server.

Also here: what the Dagster Helm chart renders from a values file for the parts a run uses (the
instance's run launcher, concurrency and compute logs; the code location's container context),
following the chart's templates (`dagsterYaml.runLauncher.k8s`, `dagsterYaml.concurrency`,
`dagsterUserDeployments.k8sContainerContext`, `dagsterYaml.computeLogManager.s3`); the chart
itself is not run here.
"""

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

BIN = os.path.dirname(sys.executable)
RELEASE, NAMESPACE = "semdedup", "semdedup"
FULLNAME = "semdedup-dagster"  # the chart's dagster.fullname for release "semdedup"
DAGSTER_HOME = "/opt/dagster/dagster_home"  # the chart's global.dagsterHome
JOBS = re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs(?:/([^/]+))?(/status)?$")


class LocalCluster:
    def __init__(self, root, config_maps: dict, secrets: dict):
        self.root, self.config_maps, self.secrets = str(root), config_maps, secrets
        self.jobs: dict[str, dict] = {}  # name -> the Job as dagster-k8s sent it
        self.pods: dict[str, subprocess.Popen] = {}
        self.unknown: list[str] = []  # API calls this stand-in does not serve
        cluster = self

        class Api(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self):
                m = JOBS.match(self.path.split("?")[0])
                if not m:
                    cluster.unknown.append(f"{self.command} {self.path}")
                return m

            def do_POST(self):
                m = self._route()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not m or m.group(2):
                    return self._reply(404, {"kind": "Status", "code": 404})
                cluster.start(body)
                self._reply(201, body)

            def do_GET(self):
                m = self._route()
                name = m and m.group(2)
                if name not in cluster.jobs:
                    return self._reply(404, {"kind": "Status", "code": 404})
                self._reply(200, {**cluster.jobs[name], "status": cluster.status(name)})

            def do_DELETE(self):
                m = self._route()
                name = m and m.group(2)
                if name in cluster.pods and cluster.pods[name].poll() is None:
                    cluster.pods[name].terminate()
                self._reply(200, {"kind": "Status", "status": "Success"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.kubeconfig = os.path.join(self.root, "kubeconfig")
        with open(self.kubeconfig, "w") as f:
            yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "local",
                "clusters": [{"name": "local", "cluster": {"server": self.url}}],
                "users": [{"name": "local", "user": {"token": "local"}}],
                "contexts": [{"name": "local", "context": {"cluster": "local", "user": "local",
                                                           "namespace": NAMESPACE}}]}, f)

    def pod_env(self, container: dict) -> dict:
        env = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self.config_maps[source["configMapRef"]["name"]])
            else:
                env.update(self.secrets[source["secretRef"]["name"]])
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            elif "secretKeyRef" in var.get("valueFrom", {}):
                ref = var["valueFrom"]["secretKeyRef"]
                env[var["name"]] = self.secrets[ref["name"]][ref["key"]]
        return env

    def start(self, job: dict) -> None:
        name = job["metadata"]["name"]
        container = job["spec"]["template"]["spec"]["containers"][0]
        disk = os.path.join(self.root, "pods", name)
        os.makedirs(os.path.join(disk, "tmp"))
        # The "image": this virtualenv, and no environment but the pod's.
        env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": disk, "TMPDIR": os.path.join(disk, "tmp"),
               "LANG": "C.UTF-8", **self.pod_env(container)}
        self.jobs[name] = job
        with open(os.path.join(disk, "pod.log"), "wb") as log:
            self.pods[name] = subprocess.Popen(container.get("command", []) + container["args"],
                                               cwd=disk, env=env, stdout=log,
                                               stderr=subprocess.STDOUT)

    def status(self, name: str) -> dict:
        rc = self.pods[name].poll()
        return {"active": 1} if rc is None else {"succeeded": 1} if rc == 0 else {"failed": 1}

    def logs(self) -> str:
        out = []
        for name in self.jobs:
            with open(os.path.join(self.root, "pods", name, "pod.log"), errors="replace") as f:
                out.append(f"--- {name}\n{f.read()[-3000:]}")
        return "\n".join(out + [f"unserved API calls: {self.unknown}"])

    def stop(self) -> None:
        for pod in self.pods.values():
            if pod.poll() is None:
                pod.terminate()
                pod.wait(timeout=30)
        self.server.shutdown()


# -- what the chart renders from the values ------------------------------------------------------
def user_deployment(values: dict) -> dict:
    return values["dagster-user-deployments"]["deployments"][0]


def image(values: dict) -> str:
    img = user_deployment(values)["image"]
    return f"{img['repository']}:{img['tag']}"


def container_context(values: dict) -> dict:
    """DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT of the code server: what its runs inherit while
    `includeConfigInLaunchedRuns` is on (the chart's default)."""
    dep = user_deployment(values)
    assert dep.get("includeConfigInLaunchedRuns", {"enabled": True})["enabled"]
    ctx = {"image_pull_policy": dep["image"]["pullPolicy"],
           "env_config_maps": [f"{FULLNAME}-{dep['name']}-user-env"],
           "namespace": NAMESPACE, "service_account_name": f"{FULLNAME}-user-deployments"}
    if dep.get("envSecrets"):
        ctx["env_secrets"] = [s["name"] for s in dep["envSecrets"]]
    if dep.get("resources"):
        ctx["resources"] = dep["resources"]
    if isinstance(dep.get("env"), list):
        ctx["env"] = dep["env"]
    return {"k8s": ctx}


def _snake(text: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", text).lower()


def instance_yaml(values: dict, kubeconfig: str, database_dir: str) -> dict:
    """The chart's dagster.yaml for these values, with two stand-ins: SQLite for Postgres (one
    database shared by every pod) and the kubeconfig of the loopback cluster for the in-cluster
    config. The local artifact storage is relative, so it lands on each pod's own disk, as
    /opt/dagster/dagster_home does in each pod of the cluster."""
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    run_launcher = {
        "load_incluster_config": False, "kubeconfig_file": kubeconfig,
        "job_namespace": NAMESPACE, "image_pull_policy": launcher.get("imagePullPolicy", "Always"),
        "service_account_name": FULLNAME,
        "dagster_home": DAGSTER_HOME, "instance_config_map": f"{FULLNAME}-instance",
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
    }
    for key, out in (("envConfigMaps", "env_config_maps"), ("envSecrets", "env_secrets")):
        if launcher.get(key):
            run_launcher[out] = [item["name"] for item in launcher[key]]
    for key in ("envVars", "volumeMounts", "volumes", "labels", "resources"):
        if launcher.get(key):
            run_launcher[_snake(key)] = launcher[key]
    if launcher.get("runK8sConfig"):
        run_launcher["run_k8s_config"] = {_snake(k): v for k, v in launcher["runK8sConfig"].items()}
    instance = {
        "storage": {"sqlite": {"base_dir": database_dir}},
        "local_artifact_storage": {"module": "dagster.core.storage.root",
                                   "class": "LocalArtifactStorage",
                                   "config": {"base_dir": "dagster_home"}},
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher",
                         "config": run_launcher},
        "telemetry": {"enabled": values["telemetry"]["enabled"]},
    }
    logs = values["computeLogManager"]
    if logs["type"] == "S3ComputeLogManager":
        instance["compute_logs"] = {
            "module": "dagster_aws.s3.compute_log_manager", "class": "S3ComputeLogManager",
            "config": {_snake(k): v for k, v in logs["config"]["s3ComputeLogManager"].items()}}
    if values.get("concurrency", {}).get("enabled"):
        instance["concurrency"] = chart_concurrency(values["concurrency"])
    return instance


def chart_concurrency(section: dict) -> dict:
    """The chart's `concurrency` values as the instance's `concurrency` section."""
    out = {}
    pools = {_snake(k): v for k, v in section.get("pools", {}).items() if v is not None}
    if pools:
        out["pools"] = pools
    runs = section.get("runs", {})
    if runs.get("maxConcurrentRuns") is not None or runs.get("tagConcurrencyLimits"):
        out["runs"] = {_snake(k): v for k, v in runs.items() if v not in (None, [])}
    return out


def config_maps(values: dict) -> dict:
    """The config maps the chart creates that launched pods read: the deployment's env when it
    is a map (ours is a list, so it travels in the container context instead)."""
    dep = user_deployment(values)
    env = dep.get("env") if isinstance(dep.get("env"), dict) else {}
    return {f"{FULLNAME}-{dep['name']}-user-env": {k: str(v) for k, v in env.items()}}


def launch(home: str, run_config_json: str) -> str:
    """What the webserver does on "Launch run" (run in a process with the code location's
    environment): create the run with the code server's origin (its image and container
    context), then hand it to the instance's run launcher. Prints the run id."""
    from dagster import DagsterInstance
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    with open(os.path.join(home, "values.yaml")) as f:
        values = yaml.safe_load(f)
    repo = ReconstructableRepository.for_module(
        "semdedup_dagster.definitions", "defs", container_image=image(values),
        container_context=container_context(values))
    recon = repo.get_reconstructable_job("semdedup")
    job = recon.get_definition()
    with DagsterInstance.from_config(home) as instance:
        run = instance.create_run_for_job(job, run_config=json.loads(run_config_json),
                                          tags=job.run_tags,
                                          job_code_origin=recon.get_python_origin())
        instance.launch_run(run.run_id, workspace=None)
    print(run.run_id)
    return run.run_id
