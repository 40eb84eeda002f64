"""The Dagster job against the command line: the same input and arguments through `semdedup run`
and through `dagster job execute -j semdedup` (a fresh SQLite instance, or the instance of
$DAGSTER_HOME with --instance existing), one after the other. Prints both wall times, the ratio,
and the run's event counts by type (what the event log had to store).

    python bench/dagster_vs_cli.py                                  # 200,000 x 512, k=1000
    python bench/dagster_vs_cli.py --rows 20000 --clusters 100      # a quick look
"""

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time

import yaml

from semdedup_core.sample import write_sample

BIN = os.path.dirname(sys.executable)


def timed(cmd: list[str], **kw) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])}... failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--centroids-per-step", type=int, default=250)
    p.add_argument("--rows-per-file", type=int, default=62500)
    p.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "out"))
    p.add_argument("--instance", choices=["fresh", "existing"], default="fresh",
                   help="fresh: a new SQLite DAGSTER_HOME per run; existing: $DAGSTER_HOME "
                        "(e.g. the Postgres instance of deploy/)")
    a = p.parse_args()

    files = max(1, round(a.rows / a.rows_per_file))
    data = os.path.join(a.workdir, f"input_{a.rows}x{a.dim}_{files}files")
    if not os.path.isdir(data):
        write_sample(data + ".tmp", a.rows, a.dim, n_topics=256, files=files, seed=1,
                     keep_groups=False)
        os.rename(data + ".tmp", data)
    args = {"input_embeddings_path": data, "n_clusters": a.clusters, "backend": "cpu"}
    outs = {name: os.path.join(a.workdir, f"vs_{name}_{a.rows}x{a.dim}_k{a.clusters}")
            for name in ("cli", "dagster")}
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)

    cli = timed([os.path.join(BIN, "semdedup"), "run", "--quiet", "--input-embeddings-path",
                 data, "--output-path", outs["cli"], "--n-clusters", str(a.clusters),
                 "--backend", "cpu"])

    from semdedup_dagster.config import run_config_for

    with tempfile.TemporaryDirectory() as tmp:
        home = os.environ.get("DAGSTER_HOME") if a.instance == "existing" else tmp
        run_yaml = os.path.join(tmp, "run.yaml")
        with open(run_yaml, "w") as f:
            yaml.safe_dump(run_config_for({**args, "output_path": outs["dagster"]},
                                          a.centroids_per_step), f)
        before = time.time()
        dg = timed([os.path.join(BIN, "dagster"), "job", "execute", "-m",
                    "semdedup_dagster.definitions", "-j", "semdedup", "-c", run_yaml],
                   env={**os.environ, "DAGSTER_HOME": home}, cwd=tmp)
        from dagster import DagsterInstance

        with DagsterInstance.from_config(home) as instance:
            run = next(r for r in instance.get_runs(limit=5)
                       if r.job_name == "semdedup" and instance.get_run_stats(r.run_id).start_time
                       and instance.get_run_stats(r.run_id).start_time >= before - 1)
            events = collections.Counter(
                e.dagster_event.event_type_value for e in instance.all_logs(run.run_id)
                if e.dagster_event is not None)
    print(f"{a.rows:,} x {a.dim}, k={a.clusters}, {os.cpu_count()} cores")
    print(f"semdedup run              {cli:8.1f} s")
    print(f"dagster job execute       {dg:8.1f} s   ({dg / cli:.2f}x)")
    print("events: " + ", ".join(f"{k} {v}" for k, v in events.most_common()))


if __name__ == "__main__":
    main()
