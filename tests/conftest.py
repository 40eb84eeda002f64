import os

# OpenBLAS picks its kernels for the CPU it finds. A forced kernel family (this project's
# machine image sets OPENBLAS_CORETYPE=Haswell on AVX-512 hosts) computes a GEMM row with bits
# that depend on the call's shape and thread count, so the bit-for-bit tests would measure
# that setting, not semdedup (README: "OpenBLAS kernels"). Unset before numpy loads, for this
# process and every process the tests start.
for _var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
    os.environ.pop(_var, None)

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from semdedup_core.sample import write_sample


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """3,000 clips x 64-d with planted duplicate groups, in 3 files."""
    folder = tmp_path_factory.mktemp("planted") / "iv2_embd_parquet"
    info = write_sample(str(folder), rows=3000, dim=64, n_topics=8, files=3, seed=3)
    return folder, info


@pytest.fixture(scope="session")
def s3_server_log(tmp_path_factory):
    """The S3 server's log: a line per request ("GET /bucket/key HTTP/1.1" ...)."""
    return tmp_path_factory.mktemp("moto") / "server.log"


@pytest.fixture(scope="session")
def s3_endpoint(s3_server_log):
    """A real S3 API server (moto_server) on loopback, for the whole session."""
    port = free_port()
    log = open(s3_server_log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def aws_profile(tmp_path, monkeypatch):
    """Credentials only in a profile file (with its region), none in the environment."""
    creds = tmp_path / "credentials"
    creds.write_text("[semdedup-test]\naws_access_key_id = testing-key\n"
                     "aws_secret_access_key = testing-secret\nregion = us-east-1\n")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    return "semdedup-test"


@pytest.fixture
def s3_requests(s3_endpoint, s3_server_log):
    """`since()`: (method, path) of every request the S3 server logged since this fixture was
    set up, in order. The server logs a request after answering it, so `since()` first sends
    a request of its own and reads the log once that one is in it."""
    import re
    import uuid

    start = s3_server_log.stat().st_size
    pattern = re.compile(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) (/\S*) HTTP/')

    def since() -> list[tuple[str, str]]:
        mark = f"/moto-api/?mark={uuid.uuid4().hex}"
        urllib.request.urlopen(s3_endpoint + mark, timeout=10).read()
        deadline = time.time() + 30
        while True:
            with open(s3_server_log, "rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
            if mark in text or time.time() > deadline:
                break
            time.sleep(0.05)
        assert mark in text, "the S3 server did not log its requests"
        return [(method, path) for method, path in
                (m.groups() for m in pattern.finditer(text.split(mark, 1)[0]))
                if not path.startswith("/moto-api/")]  # (the marks)

    return since


@pytest.fixture
def s3_client(s3_endpoint, aws_profile):
    import boto3

    return boto3.Session(profile_name=aws_profile).client("s3", endpoint_url=s3_endpoint)


def upload_folder(client, bucket: str, prefix: str, folder) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            key = f"{prefix}/{os.path.relpath(path, folder)}"
            client.upload_file(path, bucket, key)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


class DagsterWeb:
    """dagster-webserver and dagster-daemon as separate processes on a fresh SQLite instance."""

    def __init__(self, home, logs, workspace=None, env=None):
        self.home, self.logs = home, logs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = env or {**os.environ, "DAGSTER_HOME": str(home)}
        workspace = workspace or os.path.join(REPO, "workspace.yaml")
        log = open(logs, "wb")  # noqa: SIM115 - closed in stop()
        self._log = log
        # Create the instance's storage once before both processes open it: started together
        # on a fresh DAGSTER_HOME, they race to create the SQLite schema (alembic then fails in
        # one of them).
        subprocess.run([sys.executable, "-c", "from dagster import DagsterInstance; "
                        "DagsterInstance.get().get_runs(limit=1)"],
                       env=env, cwd=home, stdout=log, stderr=log, check=True)
        self.procs = [
            subprocess.Popen([os.path.join(BIN, "dagster-webserver"), "-w", workspace, "-h",
                              "127.0.0.1", "-p", str(self.port)], env=env, cwd=home,
                             stdout=log, stderr=log),
            subprocess.Popen([os.path.join(BIN, "dagster-daemon"), "run", "-w", workspace],
                             env=env, cwd=home, stdout=log, stderr=log),
        ]

    def graphql(self, query, variables=None):
        import json

        req = urllib.request.Request(self.url + "/graphql",
                                     data=json.dumps({"query": query,
                                                      "variables": variables or {}}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # GraphQL validation errors come back as 400
            raise AssertionError(f"GraphQL {exc.code}: {exc.read().decode()[:2000]}") from None

    def wait_for_run(self, run_id, timeout=300) -> dict:
        """Poll until the run ends; returns {status, stepStats}."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            run = self.graphql("query($id: ID!) { runOrError(runId: $id) { ... on Run { status "
                               "stepStats { stepKey status } } } }",
                               {"id": run_id})["data"]["runOrError"]
            if run["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
                return run
            time.sleep(1)
        raise AssertionError(f"run {run_id} did not finish:\n" + open(self.logs).read()[-3000:])

    def wait_ready(self, timeout=180):
        deadline = time.time() + timeout
        query = ("{ repositoriesOrError { ... on RepositoryConnection "
                 "{ nodes { name location { name } jobs { name } } } } }")
        while True:
            try:
                nodes = self.graphql(query)["data"]["repositoriesOrError"]["nodes"]
                if nodes:
                    return nodes
            except Exception:
                pass
            if time.time() > deadline:
                raise RuntimeError("webserver not ready:\n" + open(self.logs).read()[-3000:])
            time.sleep(1)

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        self._log.close()


@pytest.fixture(scope="session")
def dagster_web(tmp_path_factory):
    home = tmp_path_factory.mktemp("dagster_home")
    web = DagsterWeb(home, home / "processes.log")
    try:
        web.nodes = web.wait_ready()
        yield web
    finally:
        web.stop()
