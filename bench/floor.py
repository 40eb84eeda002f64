"""The FLOP-and-I/O floor of a run: the GEMM FLOPs its plan cannot avoid at the measured GEMM
peak, plus reading the input and writing and reading each clip once at the measured storage
speeds. Prints the micro-benchmarks (with the load average, since this machine is shared), then
the floor of a run:

    python bench/floor.py                                  # speeds; floor of 1M x 512, k=1000
    python bench/floor.py --report bench/out/output_1000000x512_k1000.json   # a measured run

`--report` takes the JSON `bench/run_bench.py` leaves beside each run's output folder (its
iterations and cluster sizes; the run's phase seconds are then set against the floor); without
it the floor uses --iterations and a sum of squared cluster sizes of (1 + --size-cv^2) n^2 / k.

FLOPs (2 per multiply-add): K-means fit 2 x sample x k x d x iterations; assignment 2 x n x k x d;
pairwise sum(size^2) x d (the strict lower triangle of each cluster's Gram matrix).
Bytes: the input read once (float32 rows), the shards written once and read once.
"""

import argparse
import json
import os
import time

import numpy as np


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def gemm_gflops(m: int, k: int, n: int, seconds: float = 3.0) -> float:
    """Best float32 GEMM rate over `seconds` of (m, k) @ (k, n) with numpy's BLAS threads."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    c = np.empty((m, n), np.float32)
    np.matmul(a, b, out=c)  # warm up
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 2.0 * m * k * n / best / 1e9


def storage_speeds(folder: str, size: int, cold: bool) -> dict[str, float]:
    """GB/s writing `size` bytes (into the page cache, then to disk with fsync) and reading
    them back (from the page cache; from disk with `cold`, which drops the cache: root).
    The page-cache figures also come per second of this process's CPU time ("cpu"), which a
    loaded machine changes far less than the wall time: copying into and out of the page
    cache is CPU work."""
    path = os.path.join(folder, f".floor-{os.getpid()}.bin")
    chunk = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()
    speeds = {}
    try:
        with open(path, "wb") as f:
            t, cpu = time.perf_counter(), time.process_time()
            for _ in range(size // len(chunk)):
                f.write(chunk)
            cached = time.perf_counter() - t
            speeds["write to page cache (cpu)"] = size / (time.process_time() - cpu) / 1e9
            os.fsync(f.fileno())
            synced = time.perf_counter() - t
        speeds["write to page cache"] = size / cached / 1e9
        speeds["write to disk (fsync)"] = size / synced / 1e9
        for name in ("read from page cache",) + (("read from disk",) if cold else ()):
            if name == "read from disk":
                with open("/proc/sys/vm/drop_caches", "w") as d:
                    d.write("1\n")
            with open(path, "rb", buffering=0) as f:
                t, cpu = time.perf_counter(), time.process_time()
                while f.read(64 << 20):
                    pass
                speeds[name] = size / (time.perf_counter() - t) / 1e9
                if name == "read from page cache":
                    speeds[name + " (cpu)"] = size / (time.process_time() - cpu) / 1e9
    finally:
        os.unlink(path)
    return speeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--report", help="a run's JSON from bench/run_bench.py")
    p.add_argument("--gflops", type=float,
                   help="price the GEMMs at this rate (default: the best measured here)")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--sample-per-cluster", type=int, default=256)
    p.add_argument("--iterations", type=int, default=7,
                   help="K-means iterations (7 at 1M x 512, k=1000 in the README's run)")
    p.add_argument("--size-cv", type=float, default=0.5,
                   help="coefficient of variation of the cluster sizes (without --report)")
    p.add_argument("--dir", default=os.path.join(os.path.dirname(__file__), "out"),
                   help="where the storage test writes (the disk the runs use)")
    p.add_argument("--io-gib", type=float, default=2.0, help="bytes of the storage test")
    p.add_argument("--cold", action="store_true", help="also read from disk (root)")
    p.add_argument("--cpu-speeds", action="store_true",
                   help="price the I/O at the page-cache speeds per CPU second (on a loaded "
                        "machine: what a quiet one would see)")
    a = p.parse_args()

    print(load(), flush=True)
    gemms = {"assign (16384 x 512 @ 512 x 1000)": gemm_gflops(16384, 512, 1000),
             "pairwise tile (2048 x 512 @ 512 x 2048)": gemm_gflops(2048, 512, 2048),
             "square (4096 x 512 @ 512 x 4096)": gemm_gflops(4096, 512, 4096)}
    for name, rate in gemms.items():
        print(f"GEMM {name}: {rate:.0f} GFLOP/s", flush=True)
    peak = a.gflops or max(gemms.values())
    os.makedirs(a.dir, exist_ok=True)
    speeds = storage_speeds(a.dir, int(a.io_gib * 2**30) // (64 << 20) * (64 << 20), a.cold)
    for name, gbs in speeds.items():
        print(f"{name}: {gbs:.2f} GB/s", flush=True)
    print(load())

    run = None
    if a.report:
        with open(a.report) as f:
            run = json.load(f)
        n, d, k = run["n_rows"], run["dim"], run["n_clusters"]
        sample, iters = run["sample_rows"], run["kmeans_iterations"]
        sq = float(np.square(np.asarray(run["cluster_sizes"], np.float64)).sum())
    else:
        n, d, k, iters = a.rows, a.dim, a.clusters, a.iterations
        sample = min(n, a.sample_per_cluster * k)
        sq = (1 + a.size_cv ** 2) * n * n / k
    flops = {"kmeans_fit": 2.0 * sample * k * d * iters, "assign": 2.0 * n * k * d,
             "pairwise": sq * d}
    row = 4 * d + 40  # float32 vector and a uuid
    # The input once (from the page cache: it was just written or scanned), the shards written
    # once (into the page cache; the kernel writes them back) and read once.
    cpu = " (cpu)" if a.cpu_speeds else ""
    read, write = speeds["read from page cache" + cpu], speeds["write to page cache" + cpu]
    io = {"read input": n * row / read / 1e9, "write shards": n * row / write / 1e9,
          "read shards": n * row / read / 1e9}
    gemm_s = sum(flops.values()) / peak / 1e9
    floor = gemm_s + sum(io.values())
    print(f"\nfloor of {n:,} x {d}, k={k} ({iters} iterations on {sample:,} clips, "
          f"sum(size^2) {sq:.3g}):")
    for name, f in flops.items():
        print(f"  {name}: {f / 1e12:.2f} TFLOP = {f / peak / 1e9:.1f} s at {peak:.0f} GFLOP/s")
    for name, s in io.items():
        print(f"  {name}: {n * row / 1e9:.2f} GB = {s:.2f} s")
    print(f"  floor: {floor:.1f} s (GEMMs {gemm_s:.1f} s + I/O {sum(io.values()):.1f} s); "
          f"1.3 x floor = {1.3 * floor:.1f} s")
    if run is not None:
        total = sum(run["seconds"].values())
        print(f"  the run: {total:.1f} s of phases (wall {run['wall']:.1f} s) = "
              f"{total / floor:.2f} x floor")


if __name__ == "__main__":
    main()
