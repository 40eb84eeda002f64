"""The Dagster job against the command line: the same input and arguments through `semdedup run`
and through `dagster job execute -j semdedup`, one after the other, on each instance storage:

- sqlite:   a fresh default instance (a new DAGSTER_HOME with no dagster.yaml);
- postgres: a throwaway PostgreSQL server started here from /usr/lib/postgresql/*/bin, with the
            storage section of deploy/dagster.yaml and the environment deploy/ sets
            (DAGSTER_EVENT_BATCH_SIZE).

For each it prints the CLI and job wall times, their ratio, the run's events by type, the seconds
of every step (from its STEP_START to its STEP_SUCCESS) and what one partition materialisation
costs on that storage (a separate timed run that reports 500 of them, the way the job does).

    python bench/dagster_vs_cli.py                                         # 200,000 x 512, k=1000
    python bench/dagster_vs_cli.py --rows 20000 --dim 128 --clusters 100   # a quick look
    python bench/dagster_vs_cli.py --rows 1000000 --clusters 5000 --storage postgres
"""

import argparse
import collections
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import yaml

from semdedup_core.sample import write_sample

BIN = os.path.dirname(sys.executable)
DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy")


def timed(cmd: list[str], **kw) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])}... failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.perf_counter() - t


@contextlib.contextmanager
def throwaway_postgres():
    """A PostgreSQL server on a free local port with an empty `dagster` database; removed after."""
    bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bindirs:
        sys.exit("PostgreSQL is not installed (scripts/install-test-deps installs it)")
    bindir = bindirs[-1]
    root = tempfile.mkdtemp(prefix="semdedup-bench-pg-")
    data, sock = os.path.join(root, "data"), os.path.join(root, "sock")
    os.mkdir(sock)
    as_user = []
    if os.geteuid() == 0:  # postgres refuses to run as root: use Debian's postgres user
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(as_user + [f"{bindir}/initdb", "-D", data, "-U", "postgres", "--auth=trust",
                              "-E", "UTF8"], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(as_user + [f"{bindir}/postgres", "-D", data, "-p", str(port),
                                         "-h", "127.0.0.1", "-k", sock],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while subprocess.run([f"{bindir}/pg_isready", "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode != 0:
            if time.time() > deadline or server.poll() is not None:
                sys.exit("the throwaway PostgreSQL server did not start")
            time.sleep(0.3)
        subprocess.run([f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U",
                        "postgres", "dagster"], check=True)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def deploy_instance(home: str, port: int) -> dict:
    """deploy/dagster.yaml's storage in `home`; returns the environment deploy/ gives it (the
    Postgres address and the event batch size of docker-compose.yaml)."""
    with open(os.path.join(DEPLOY, "dagster.yaml")) as f:
        storage = yaml.safe_load(f)["storage"]
    with open(os.path.join(home, "dagster.yaml"), "w") as f:
        yaml.safe_dump({"storage": storage, "telemetry": {"enabled": False}}, f)
    with open(os.path.join(DEPLOY, "docker-compose.yaml")) as f:
        compose = yaml.safe_load(f)
    code_env = compose["services"]["code"]["environment"]
    return {"DAGSTER_POSTGRES_HOST": "127.0.0.1", "DAGSTER_POSTGRES_PORT": str(port),
            "DAGSTER_POSTGRES_USER": "postgres", "DAGSTER_POSTGRES_PASSWORD": "",
            "DAGSTER_POSTGRES_DB": "dagster",
            "DAGSTER_EVENT_BATCH_SIZE": str(code_env["DAGSTER_EVENT_BATCH_SIZE"])}


def job_run(home: str, env: dict, run_yaml: str) -> tuple[float, collections.Counter, dict]:
    """`dagster job execute` on the instance in `home`: seconds, events by type, step seconds."""
    from dagster import DagsterEventType, DagsterInstance

    before = time.time()
    secs = timed([os.path.join(BIN, "dagster"), "job", "execute", "-m",
                  "semdedup_dagster.definitions", "-j", "semdedup", "-c", run_yaml],
                 env={**os.environ, **env, "DAGSTER_HOME": home}, cwd=home)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with DagsterInstance.from_config(home) as instance:
            run = next(r for r in instance.get_runs(limit=5) if r.job_name == "semdedup"
                       and (instance.get_run_stats(r.run_id).start_time or 0) >= before - 1)
            logs = instance.all_logs(run.run_id)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.update({k: v})
    events = collections.Counter(e.dagster_event.event_type_value for e in logs
                                 if e.dagster_event is not None)
    starts, steps = {}, {}
    for e in logs:
        if e.dagster_event is None:
            continue
        if e.dagster_event.event_type == DagsterEventType.STEP_START:
            starts[e.step_key] = e.timestamp
        elif e.dagster_event.event_type == DagsterEventType.STEP_SUCCESS:
            steps[e.step_key] = e.timestamp - starts.get(e.step_key, e.timestamp)
    return secs, events, steps


def event_cost(home: str, env: dict, n: int = 500) -> float:
    """Seconds per partition materialisation reported as the job reports them, on `home`."""
    code = ("import sys, time\n"
            "from dagster import DagsterInstance, job, op\n"
            "from semdedup_dagster.reporting import PartitionReport\n"
            "@op\n"
            "def report(context):\n"
            f"    t = time.perf_counter()\n"
            f"    with PartitionReport(context, True) as rep:\n"
            f"        for k in range({n}):\n"
            f"            rep.add('embs_by_nearest_center', k, {{'rows': 100}})\n"
            f"    print('SECONDS', time.perf_counter() - t)\n"
            "@job\n"
            "def cost():\n"
            "    report()\n"
            "with DagsterInstance.get() as instance:\n"
            "    assert cost.execute_in_process(instance=instance).success\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env, "DAGSTER_HOME": home})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("SECONDS")), None)
    if line is None:
        sys.exit(f"event cost run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return float(line.split()[1]) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--centroids-per-step", type=int, default=None,
                   help="the job's knob (default: the job's default)")
    p.add_argument("--rows-per-file", type=int, default=62500)
    p.add_argument("--storage", default="sqlite,postgres",
                   help="comma-separated: sqlite (fresh default instance), postgres (deploy/)")
    p.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "out"))
    a = p.parse_args()
    storages = [s for s in a.storage.split(",") if s]
    if set(storages) - {"sqlite", "postgres"}:
        p.error("--storage takes sqlite and/or postgres")

    files = max(1, round(a.rows / a.rows_per_file))
    data = os.path.join(a.workdir, f"input_{a.rows}x{a.dim}_{files}files")
    if not os.path.isdir(data):
        write_sample(data + ".tmp", a.rows, a.dim, n_topics=256, files=files, seed=1,
                     keep_groups=False)
        os.rename(data + ".tmp", data)
    args = {"input_embeddings_path": data, "n_clusters": a.clusters, "backend": "cpu"}
    out_cli = os.path.join(a.workdir, f"vs_cli_{a.rows}x{a.dim}_k{a.clusters}")
    shutil.rmtree(out_cli, ignore_errors=True)
    cli = timed([os.path.join(BIN, "semdedup"), "run", "--quiet", "--input-embeddings-path",
                 data, "--output-path", out_cli, "--n-clusters", str(a.clusters),
                 "--backend", "cpu"])
    print(f"{a.rows:,} x {a.dim}, k={a.clusters}, {os.cpu_count()} cores")
    print(f"semdedup run                      {cli:8.1f} s")

    from semdedup_dagster.config import run_config_for

    for storage in storages:
        out = os.path.join(a.workdir, f"vs_dagster_{storage}_{a.rows}x{a.dim}_k{a.clusters}")
        shutil.rmtree(out, ignore_errors=True)
        with tempfile.TemporaryDirectory() as home, contextlib.ExitStack() as stack:
            env = {}
            if storage == "postgres":
                env = deploy_instance(home, stack.enter_context(throwaway_postgres()))
            run_yaml = os.path.join(home, "run.yaml")
            with open(run_yaml, "w") as f:
                yaml.safe_dump(run_config_for({**args, "output_path": out},
                                              a.centroids_per_step), f)
            secs, events, steps = job_run(home, env, run_yaml)
            per_event = event_cost(home, env)
        print(f"dagster job execute ({storage:8s})  {secs:8.1f} s   ({secs / cli:.2f}x the CLI)")
        print(f"  events: {sum(events.values()):,} (" +
              ", ".join(f"{k} {v}" for k, v in events.most_common()) + ")")
        print("  steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in steps.items()))
        print(f"  one partition materialisation on {storage}: {per_event * 1000:.2f} ms (every "
              f"partition of this run, 3 per cluster: {3 * per_event * a.clusters:.1f} s)")


if __name__ == "__main__":
    main()
