"""Prune speed on real, skewed clusters: a full run over real embeddings (k=100 by default, the
project's own fit), then the prune phase again alone on the finished output, then the pairwise
pass alone on the same ranked clusters: today's kernel as the prune phase runs it against an
earlier one (its `pairwise.py` taken from git into a temporary module).

Useful work is sum over clusters of n^2 x d (2 FLOPs for each of the n(n-1)/2 pairs below the
diagonal, x d); every GFLOP/s printed is useful work over seconds. It prints:
- each phase's seconds in the full run, and its prune row's useful GFLOP/s;
- the prune phase alone (reads, ranking, pairwise, writes; best of --repeats): seconds, useful
  GFLOP/s and the process's CPU seconds;
- where its CPU goes: the same work on one thread (BLAS too), cluster after cluster, CPU seconds
  per piece (read + decode + rank, pairwise, write) and what creating its files costs in the
  output folder's file system (--workdir);
- the pairwise pass alone, each kernel (the baseline as the phase runs today's when it takes the
  compute threads, else one cluster after another with BLAS on every core): seconds, useful
  GFLOP/s and CPU seconds, and whether both give the same bytes;
- a plain GEMM's GFLOP/s on the same machine (BLAS on every core), for scale.

    python bench/prune_bench.py                           # the 80k MiniLM set, k=100
    python bench/prune_bench.py --baseline-ref main~5 --repeats 5

The output goes under --workdir (default: the system's temporary folder). The prune phase
creates two files per cluster (pruning table, one unique_ids part per eps), and on this sandbox's
disk creating a file costs from 0.024 to 0.8 ms of CPU depending on the folder and the moment
(measured): the figure printed for the output's folder says how much of the phase that is.
"""

import argparse
import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from semdedup_core import layout
from semdedup_core.backends import get_backend
from semdedup_core.config import DedupConfig
from semdedup_core.pairwise import max_similarity_to_earlier
from semdedup_core.pipeline import (PhaseTimer, nonempty_clusters, output_storage, prune_all,
                                    ranked_shard, run_pipeline, score_shard,
                                    write_cluster_outputs)
from semdedup_core.threads import host_threads, ordered_map, single_threaded_blas

DATA = "/work/shared/data/pypi_minilm_embd_parquet"
# The kernel before a row block's own square went by OpenBLAS's ssyrk (its diagonal by matmuls
# of quarter blocks). `--baseline-ref 056c470~1`: the kernel before those quarters.
BASELINE_REF = "77c76d4~1"


def module_at(ref: str):
    """semdedup_core/pairwise.py as of git `ref`, loaded as a module of its own."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "-C", root, "show", f"{ref}:semdedup_core/pairwise.py"],
                         check=True, capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "pairwise_baseline.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("pairwise_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def best_of(repeats: int, fn) -> tuple[float, object, float]:
    """Best wall seconds, the last result, and the CPU seconds of the best run."""
    best, result, cpu = float("inf"), None, 0.0
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        result = fn()
        if time.perf_counter() - t < best:
            best, cpu = time.perf_counter() - t, time.process_time() - c
    return best, result, cpu


def gemm_gflops(dim: int, n: int = 2048, repeats: int = 10) -> float:
    a = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    seconds, _, _ = best_of(repeats, lambda: a @ a.T)
    return 2 * n * n * dim / seconds / 1e9


def set_aside(out: str) -> None:
    """Move the output's extraction folder aside (removed with the whole output at the end), so
    that the next pass writes its tables anew: removing it instead would make each file the
    next pass creates scan past the inodes just freed (ext4 here: see run_bench.remove_output;
    measured, ~10x the cost of creating a file)."""
    extraction = os.path.join(out, layout.EXTRACTION)
    os.rename(extraction, tempfile.mkdtemp(prefix="set_aside_", dir=out) + "/extraction")


def cpu_by_piece(cfg: DedupConfig, store, clusters: list[int], backend) -> dict[str, float]:
    """The prune phase's work on this thread alone (BLAS on one thread), cluster after cluster:
    CPU seconds (this process's, so Arrow's own threads count) of each piece."""
    set_aside(cfg.output_path)
    pieces = dict.fromkeys(["read + decode + rank", "pairwise", "write tables and parts"], 0.0)
    with single_threaded_blas():
        for k in clusters:
            t0 = time.process_time()
            ranked = ranked_shard(cfg, store, k)
            t1 = time.process_time()
            scored = score_shard(cfg, backend, ranked)
            t2 = time.process_time()
            write_cluster_outputs(cfg, store, scored, extract=True)
            t3 = time.process_time()
            for name, seconds in zip(pieces, (t1 - t0, t2 - t1, t3 - t2)):
                pieces[name] += seconds
    return pieces


def file_creation_ms(folder: str, files: int = 200) -> float:
    """CPU milliseconds to create (and fill with 1 kB) one new file in `folder`."""
    scratch = tempfile.mkdtemp(prefix="create_", dir=folder)
    try:
        start = time.process_time()
        for i in range(files):
            with open(os.path.join(scratch, f"f{i}"), "wb") as f:
                f.write(b"x" * 1024)
        return (time.process_time() - start) / files * 1e3
    finally:
        shutil.rmtree(scratch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", default=DATA)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--tile", type=int, default=2048, help="pairwise_tile_size")
    p.add_argument("--baseline-ref", default=BASELINE_REF,
                   help="git ref whose semdedup_core/pairwise.py is the baseline kernel")
    p.add_argument("--repeats", type=int, default=3,
                   help="prune phases and pairwise passes per kernel (best kept)")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--workdir", default=None,
                   help="folder for the run's output (default: the system's temporary folder)")
    a = p.parse_args()
    backend = get_backend(a.backend)

    with tempfile.TemporaryDirectory(prefix="prune_bench_", dir=a.workdir) as out:
        cfg = DedupConfig(input_embeddings_path=a.input, output_path=out, n_clusters=a.clusters,
                          pairwise_tile_size=a.tile, backend=a.backend)
        report = run_pipeline(cfg)
        sizes = report.cluster_sizes[report.cluster_sizes > 0].astype(np.float64)
        useful = float((sizes ** 2).sum()) * report.dim

        def gflops(seconds: float) -> float:
            return useful / seconds / 1e9

        print(f"{report.n_rows:,} x {report.dim}, k={a.clusters}: clusters of {int(sizes.min()):,} "
              f"to {int(sizes.max()):,} clips; useful pairwise work {useful / 1e9:.1f} GFLOP; "
              f"{os.cpu_count()} cores\n")
        print(f"{'phase':<12}{'seconds':>9}")
        for name, seconds in report.timer.seconds.items():
            print(f"{name:<12}{seconds:9.2f}")
        print(f"prune row: {gflops(report.timer.seconds['prune']):.1f} useful GFLOP/s "
              "(reads, ranking and writes included)\n")

        store = output_storage(cfg)
        clusters = nonempty_clusters(store)
        best, cpu = float("inf"), 0.0
        for _ in range(a.repeats):  # the prune phase again, writing its tables and parts anew
            set_aside(out)
            timer, start_cpu = PhaseTimer(), time.process_time()
            prune_all(cfg, store, clusters, backend, timer)
            if timer.seconds["prune"] < best:
                best, cpu = timer.seconds["prune"], time.process_time() - start_cpu
        print(f"prune phase alone       {best:7.3f} s  {gflops(best):6.1f} useful GFLOP/s  "
              f"({cpu:.2f} CPU s)")
        pieces = cpu_by_piece(cfg, store, clusters, backend)
        print(f"the same on one thread, CPU s: {sum(pieces.values()):.3f} = " + " + ".join(
            f"{seconds:.3f} {name}" for name, seconds in pieces.items()))
        files = len(clusters) * (1 + len(cfg.eps_to_extract))
        print(f"  creating a file under {os.path.dirname(out)}: {file_creation_ms(out):.3f} ms CPU "
              f"(the phase creates {files:,})")
        ranked = [ranked_shard(cfg, store, k) for k in clusters]

    def as_the_phase(kernel):  # clusters side by side, row blocks on the compute threads
        with backend.compute_pool() as pool:
            return list(ordered_map(
                lambda r: tuple(backend.to_numpy(x) for x in kernel(
                    backend, backend.asarray(r.emb), a.tile, pool=pool)),
                ranked, 2 * host_threads()))

    def one_after_another(kernel):  # a kernel from before the compute threads, BLAS on all cores
        return [tuple(backend.to_numpy(x) for x in kernel(backend, backend.asarray(r.emb), a.tile))
                for r in ranked]

    old = module_at(a.baseline_ref).max_similarity_to_earlier
    old_pass = as_the_phase if "pool" in inspect.signature(old).parameters else one_after_another
    results = {}
    for name, one_pass in [(f"baseline {a.baseline_ref}", lambda: old_pass(old)),
                           ("today", lambda: as_the_phase(max_similarity_to_earlier))]:
        seconds, results[name], cpu = best_of(a.repeats, one_pass)
        print(f"pairwise alone, {name:<22}{seconds:7.3f} s  {gflops(seconds):6.1f} useful GFLOP/s  "
              f"({cpu:.3f} CPU s)")
    first, second = results.values()
    same = all(s1.tobytes() == s2.tobytes() and m1.tobytes() == m2.tobytes()
               for (s1, m1), (s2, m2) in zip(first, second))
    print(f"same scores and matches, bit for bit: {same}")
    print(f"plain GEMM (2048 x 2048 x {report.dim}, float32): {gemm_gflops(report.dim):.0f} GFLOP/s")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
