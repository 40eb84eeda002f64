"""End-to-end benchmark: synthetic clips with planted duplicates -> `semdedup run`.

Prints seconds and GFLOP/s per phase (from the command's own table), clips/s, and the peak RSS
of the run (the command runs as a child process, so generation does not count).

    python bench/run_bench.py                       # 1,000,000 x 512, k=1000
    python bench/run_bench.py --rows 200000 --clusters 200
"""

import argparse
import os
import resource
import subprocess
import sys
import time

from semdedup_core.sample import write_sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--rows-per-file", type=int, default=62500,
                   help="input file size (a drop's files have a fixed size; memory per batch "
                        "follows it, so keep it fixed when comparing input sizes)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="input embedding type (Cosmos-Embed1 drops are float16: half the disk)")
    p.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "out"))
    p.add_argument("--backend", default="cpu")
    p.add_argument("extra", nargs="*", help="more `semdedup run` flags, after --")
    a = p.parse_args()

    files = max(1, round(a.rows / a.rows_per_file))
    suffix = "" if a.dtype == "float32" else "_f16"
    data = os.path.join(a.workdir, f"input_{a.rows}x{a.dim}_{files}files{suffix}")
    if not os.path.isdir(data):
        t = time.perf_counter()
        write_sample(data + ".tmp", a.rows, a.dim, n_topics=256, files=files, seed=1,
                     dtype=a.dtype, keep_groups=False)
        os.rename(data + ".tmp", data)
        print(f"generated {a.rows:,} x {a.dim} in {time.perf_counter() - t:.1f}s", flush=True)
    out = os.path.join(a.workdir, f"output_{a.rows}x{a.dim}_k{a.clusters}")
    cmd = [sys.executable, "-m", "semdedup_core.cli", "run", "--input-embeddings-path", data,
           "--output-path", out, "--n-clusters", str(a.clusters), "--backend", a.backend,
           "--quiet", *a.extra]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    print(f"\nwall {wall:.1f}s  throughput {a.rows / wall:,.0f} clips/s  peak RSS {peak:.2f} GiB  "
          f"({a.rows:,} x {a.dim}, k={a.clusters}, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
