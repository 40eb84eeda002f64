"""End-to-end benchmark: synthetic clips with planted duplicates -> a whole `semdedup run`.

Each run is a child process (generation does not count) that prints seconds, GFLOP/s and CPU
seconds per phase, clips/s and its own peak RSS.

    python bench/run_bench.py                       # 1,000,000 x 512, k=1000
    python bench/run_bench.py --rows 200000 --clusters 200

Scale mode (`--fit-rows`): runs at --fit-rows for every k in --clusters fit a cost model per
phase, which then predicts each phase at --rows; the runs at --rows are measured against it:

    python bench/run_bench.py --rows 5000000 --fit-rows 1000000 --clusters 1000 5000 \\
        --workdir /data/semdedup-bench --cold

Cost model (seconds per phase = sum of coefficients x counts, `PHASE_TERMS`; n clips of d
dims, k clusters, the fit's sample and iterations, the clusters' sizes as each run found them):
scan ~ n.d (reads); kmeans_fit ~ sample.k.iterations.d + k^2.d (the k-means++ init);
assign ~ n.k.d (the GEMM) + n.d (reads and writes); prune ~ sum(size^2).d (pairwise) + n.d;
audit ~ n.d (its sample against the clusters the bisector bound leaves) + k (bookkeeping per
cluster); summary ~ k + n. The coefficients
are fitted (non-negative least squares) on the --fit-rows runs; with fewer fit runs than a
phase has terms, only its leading terms are used. A phase is within the model when measured /
predicted lies in [0.8, 1.25]. The input at --rows is generated once, file by file (memory:
one file), and reused; the --fit-rows input is its first files (symbolic links).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

PHASES = ("scan", "kmeans_fit", "assign", "cross", "prune", "audit", "summary")
PHASE_TERMS = {
    "scan": ("n.d",),
    "kmeans_fit": ("sample.k.iters.d", "k^2.d"),
    "assign": ("n.k.d", "n.d"),
    "prune": ("sum(size^2).d", "n.d"),
    "audit": ("n.d", "k"),
    "summary": ("k", "n"),
}
WITHIN = (0.8, 1.25)


def counts(run: dict) -> dict[str, float]:
    """The counts a run's phases are modelled on."""
    n, d, k = run["n_rows"], run["dim"], run["n_clusters"]
    sizes = np.asarray(run["cluster_sizes"], np.float64)
    sq = float((sizes ** 2).sum())
    return {"n.d": n * d, "n": n, "k": k, "n.k.d": n * k * d, "k^2.d": k * k * d,
            "sample.k.iters.d": run["sample_rows"] * k * run["kmeans_iterations"] * d,
            "sum(size^2).d": sq * d}


def fit_model(fit_runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per phase {term: seconds per unit}, fitted on `fit_runs` (non-negative least squares;
    as many leading terms as there are runs)."""
    from scipy.optimize import nnls

    model = {}
    for phase, terms in PHASE_TERMS.items():
        terms = terms[:len(fit_runs)]
        x = np.array([[counts(r)[t] for t in terms] for r in fit_runs])
        y = np.array([r["seconds"].get(phase, 0.0) for r in fit_runs])
        scale = x.max(axis=0)  # columns of ~1, for the solver's sake
        coef, _ = nnls(x / scale, y)
        model[phase] = {t: float(c / s) for t, c, s in zip(terms, coef, scale)}
    return model


def predict(model: dict[str, dict[str, float]], run: dict) -> dict[str, float]:
    c = counts(run)
    return {phase: sum(coef * c[t] for t, coef in terms.items())
            for phase, terms in model.items()}


def scale_table(model, fit_runs: list[dict], run: dict) -> tuple[str, bool]:
    """Predicted against measured seconds per phase for `run`; whether all lie within."""
    pred = predict(model, run)
    fit = next((r for r in fit_runs if r["n_clusters"] == run["n_clusters"]), fit_runs[0])
    fitted_on = ", ".join(f"k={r['n_clusters']}" for r in fit_runs)
    lines = [f"{run['n_rows']:,} x {run['dim']}, k={run['n_clusters']} "
             f"(model fitted on {fitted_on} at "
             f"{fit_runs[0]['n_rows']:,}); iterations {run['kmeans_iterations']}, "
             f"sum(size^2) {float(np.square(np.asarray(run['cluster_sizes'], float)).sum()):.3g}",
             f"{'phase':<12}{'fit run s':>11}{'predicted s':>13}{'measured s':>12}{'ratio':>8}"]
    ok = True
    for phase in PHASE_TERMS:
        m, p = run["seconds"].get(phase, 0.0), pred[phase]
        ratio = m / p if p > 0 else float("nan")
        inside = p <= 0.05 and m <= 0.05 or WITHIN[0] <= ratio <= WITHIN[1]  # ~0 both: fine
        ok &= inside
        lines.append(f"{phase:<12}{fit['seconds'].get(phase, 0.0):>11.2f}{p:>13.2f}{m:>12.2f}"
                     f"{ratio:>8.2f}{'' if inside else '  OUTSIDE'}")
    total_p, total_m = sum(pred.values()), sum(run["seconds"].get(p, 0.0) for p in PHASE_TERMS)
    lines.append(f"{'all phases':<12}{sum(fit['seconds'].get(p, 0.0) for p in PHASE_TERMS):>11.2f}"
                 f"{total_p:>13.2f}{total_m:>12.2f}{total_m / total_p:>8.2f}")
    lines.append(f"wall {run['wall']:.1f}s; peak RSS {run['peak_rss_gib']:.2f} GiB against "
                 f"{fit['peak_rss_gib']:.2f} GiB at {fit['n_rows']:,} "
                 f"({run['peak_rss_gib'] / fit['peak_rss_gib']:.2f}x)")
    if run.get("peak_anon_gib") and fit.get("peak_anon_gib"):  # (reports from before lack it)
        lines.append(f"peak anonymous memory {run['peak_anon_gib']:.2f} GiB against "
                     f"{fit['peak_anon_gib']:.2f} GiB "
                     f"({run['peak_anon_gib'] / fit['peak_anon_gib']:.2f}x; the rest of the RSS "
                     "is mapped file pages)")
    return "\n".join(lines), ok


# -- runs ---------------------------------------------------------------------------------------
class AnonPeak:
    """The process's peak anonymous memory (RssAnon, sampled every 50 ms; Linux): its own
    memory. The peak RSS also counts the pages of files it has mapped (input and shards are
    read through memory maps), which are the page cache's and grow with the files in flight,
    not with the clips."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def now() -> int:
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f
                            if line.startswith("RssAnon:"))
        except (OSError, StopIteration):  # not Linux
            return 0

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.now())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def child(json_path: str, flags: list[str]) -> None:
    """In the child process: one run with `semdedup run` flags; its report as JSON."""
    from semdedup_core.cli import build_parser, config_from_args
    from semdedup_core.pipeline import run_pipeline

    cfg = config_from_args(build_parser().parse_args(["run", *flags]))
    t = time.perf_counter()
    with AnonPeak() as anon:
        report = run_pipeline(cfg)
    wall = time.perf_counter() - t
    with open(json_path, "w") as f:
        json.dump({"n_rows": report.n_rows, "dim": report.dim, "n_clusters": report.n_clusters,
                   "sample_rows": report.sample_rows,
                   "kmeans_iterations": report.kmeans_iterations,
                   "cluster_sizes": report.cluster_sizes.tolist(),
                   "seconds": report.timer.seconds, "cpu_seconds": report.timer.cpu_seconds,
                   "flops": report.timer.flops, "wall": wall,
                   "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                   "peak_anon_gib": anon.peak / 2**30},
                  f)


def drop_caches() -> None:
    """Empty the page cache (root only), so every run reads its input from disk."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        sys.exit(f"--cold needs root to drop the page cache: {exc}")


SETTLE_S = 61


def remove_output(path: str) -> None:
    """Remove an earlier run's output; when there was one, sync and wait SETTLE_S seconds.
    Why: on ext4 without a journal (these machines' root filesystem), creating a file skips,
    one by one, the free inodes of its group deleted less than 60 s ago (5 min while their
    inode-table block is unwritten), so each of the next run's thousands of shard and output
    files scans past the thousands just deleted. Measured at 200k x 512, k=1000 (assign alone):
    `__ext4_new_inode` took 5-20% of the phase's CPU right after removing an earlier output,
    0.2% after a sync and 65 s. A run on a fresh disk does not pay it; the benchmark should not
    either (upstream's runs get the same wait)."""
    if not os.path.lexists(path):
        return
    shutil.rmtree(path, ignore_errors=True)
    os.sync()
    time.sleep(SETTLE_S)


def measure(data: str, out: str, clusters: int, backend: str, extra: list[str],
            cold: bool, keep: bool) -> dict:
    """One run in a child process; its report, and the output removed unless `keep`."""
    remove_output(out)
    if cold:
        drop_caches()
    report_path = out + ".json"
    flags = ["--input-embeddings-path", data, "--output-path", out, "--n-clusters",
             str(clusters), "--backend", backend, *extra]
    subprocess.run([sys.executable, os.path.abspath(__file__), "--child-json", report_path,
                    "--", *flags], check=True)
    with open(report_path) as f:
        run = json.load(f)
    if not keep:
        remove_output(out)
    return run


def input_folder(workdir: str, rows: int, dim: int, rows_per_file: int, dtype: str) -> str:
    """The generated input of `rows` clips (made once, file by file, then reused)."""
    files = max(1, round(rows / rows_per_file))
    suffix = "" if dtype == "float32" else "_f16"
    data = os.path.join(workdir, f"input_{rows}x{dim}_{files}files{suffix}")
    if not os.path.isdir(data):
        from semdedup_core.sample import write_sample

        t = time.perf_counter()
        shutil.rmtree(data + ".tmp", ignore_errors=True)
        write_sample(data + ".tmp", rows, dim, n_topics=256, files=files, seed=1, dtype=dtype,
                     keep_groups=False)
        os.rename(data + ".tmp", data)
        print(f"generated {rows:,} x {dim} in {time.perf_counter() - t:.1f}s", flush=True)
    return data


def first_files(data: str, rows: int, rows_per_file: int) -> str:
    """A folder of links to the first files of `data` holding about `rows` clips."""
    names = sorted(n for n in os.listdir(data) if n.endswith(".parquet"))
    take = max(1, round(rows / rows_per_file))
    if take > len(names):
        sys.exit(f"--fit-rows {rows} is more than the {len(names)} files of {data} hold")
    sub = f"{data}_first{take}"
    if not os.path.isdir(sub):
        os.makedirs(sub + ".tmp", exist_ok=True)
        for n in names[:take]:
            link = os.path.join(sub + ".tmp", n)
            if not os.path.lexists(link):
                os.symlink(os.path.join(data, n), link)
        os.rename(sub + ".tmp", sub)
    return sub


def phase_line(run: dict) -> str:
    """Each phase's seconds, GFLOP/s where it has FLOPs, and the process's CPU seconds while it
    ran (on a loaded machine those move far less than the wall time)."""
    parts = []
    cpu = run.get("cpu_seconds", {})
    for phase in PHASES:
        if phase in run["seconds"]:
            s = run["seconds"][phase]
            fl = run["flops"].get(phase)
            extra = [f"{fl / s / 1e9:.0f} GFLOP/s"] if fl and s else []
            if phase in cpu:
                extra.append(f"{cpu[phase]:.1f} CPU-s")
            parts.append(f"{phase} {s:.1f}s" + (f" ({', '.join(extra)})" if extra else ""))
    return "  ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, nargs="+", default=[1000])
    p.add_argument("--fit-rows", type=int,
                   help="scale mode: fit the cost model on runs of this many clips (one per k), "
                        "then predict and measure --rows")
    p.add_argument("--scale-clusters", type=int, nargs="+", default=None,
                   help="with --fit-rows: the k of the --rows runs (default: every --clusters; "
                        "the model is fitted on every --clusters run at --fit-rows)")
    p.add_argument("--rows-per-file", type=int, default=62500,
                   help="input file size (a drop's files have a fixed size; memory per batch "
                        "follows it, so keep it fixed when comparing input sizes)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="input embedding type (Cosmos-Embed1 drops are float16: half the disk)")
    p.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "out"),
                   help="where inputs are generated (and reused) and outputs written")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--cold", action="store_true",
                   help="drop the page cache before each run (root): every run reads from disk")
    p.add_argument("--keep-outputs", action="store_true",
                   help="keep each run's output folder (default: removed after the run)")
    p.add_argument("--child-json", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="more `semdedup run` flags, after --")
    a = p.parse_args()
    if a.child_json:
        child(a.child_json, a.extra)
        return

    os.makedirs(a.workdir, exist_ok=True)
    data = input_folder(a.workdir, a.rows, a.dim, a.rows_per_file, a.dtype)

    def run(folder: str, rows: int, k: int) -> dict:
        out = os.path.join(a.workdir, f"output_{rows}x{a.dim}_k{k}")
        r = measure(folder, out, k, a.backend, a.extra, a.cold, a.keep_outputs)
        print(f"{phase_line(r)}\n{rows:,} x {a.dim}, k={k}: wall {r['wall']:.1f}s  "
              f"throughput {rows / r['wall']:,.0f} clips/s  peak RSS {r['peak_rss_gib']:.2f} GiB"
              f" (anonymous {r.get('peak_anon_gib', 0):.2f})"
              f"  ({os.cpu_count()} cores)", flush=True)  # the summary last (scripts/gpu-check)
        return r

    if a.fit_rows is None:
        for k in a.clusters:
            run(data, a.rows, k)
        return
    fit_data = first_files(data, a.fit_rows, a.rows_per_file)
    fit_runs = [run(fit_data, a.fit_rows, k) for k in a.clusters]
    model = fit_model(fit_runs)
    print("\ncost model (seconds per unit): " + "; ".join(
        f"{ph}: " + ", ".join(f"{c:.3g} x {t}" for t, c in terms.items())
        for ph, terms in model.items()), flush=True)
    all_ok = True
    for k in a.scale_clusters or a.clusters:
        table, ok = scale_table(model, fit_runs, run(data, a.rows, k))
        all_ok &= ok
        print("\n" + table, flush=True)
    print(f"\nevery phase within {WITHIN[0]}-{WITHIN[1]}x of the model: "
          f"{'yes' if all_ok else 'NO'}")


if __name__ == "__main__":
    main()
